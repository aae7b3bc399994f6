"""Megatron's fused layouts: linear_qkv (q, k, v interleaved per query group) and linear_fc1 (gate, up).

These functions work on any tensor whose first dimension is the output dimension of the fused
layer: weights ``[out, in]``, biases ``[out]`` and LoRA B matrices ``[out, rank]`` alike.

linear_qkv: for each of the ``G`` query groups (= key/value heads), the rows of the group's
``H/G`` query heads, then its key head, then its value head::

    [q_0 .. q_{H/G-1}, k_0, v_0,  q_{H/G} .. , k_1, v_1,  ...]     (each block head_dim rows)

Tensor parallelism splits this into contiguous chunks of whole groups, so the TP layout of
linear_qkv is a plain split of the fused tensor. linear_fc1 is ``[gate; up]`` for the whole
layer, but each tensor-parallel rank holds ``[gate_r; up_r]``: see ``shard_gate_up``.
"""

from __future__ import annotations

import torch


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Interleave unfused q ``[H*d, ...]``, k and v ``[G*d, ...]`` into linear_qkv's order."""
    tail = q.shape[1:]
    q = q.reshape(num_groups, -1, *tail)
    k = k.reshape(num_groups, -1, *tail)
    v = v.reshape(num_groups, -1, *tail)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail)


def split_qkv(fused: torch.Tensor, num_heads: int, num_groups: int, head_dim: int):
    """Undo ``fuse_qkv``: return ``(q, k, v)`` from a fused tensor of one or more whole groups.

    ``num_heads`` and ``num_groups`` are those held by ``fused`` (a TP shard holds
    ``H/TP`` heads and ``G/TP`` groups).
    """
    tail = fused.shape[1:]
    per_group = num_heads // num_groups
    grouped = fused.reshape(num_groups, (per_group + 2) * head_dim, *tail)
    q, k, v = torch.split(grouped, [per_group * head_dim, head_dim, head_dim], dim=1)
    return (q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail))


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """linear_fc1 of the whole layer: ``[gate; up]``."""
    return torch.cat([gate, up], dim=0)


def split_gate_up(fused: torch.Tensor):
    """Undo ``fuse_gate_up`` (also for one TP rank's ``[gate_r; up_r]``): ``(gate, up)``."""
    return torch.chunk(fused, 2, dim=0)


def shard_gate_up(fused: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """The TP shard of a whole-layer linear_fc1 tensor: ``[gate_r; up_r]``."""
    gate, up = split_gate_up(fused)
    return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]], dim=0)


def unshard_gate_up(shards: list[torch.Tensor]) -> torch.Tensor:
    """Whole-layer ``[gate; up]`` from the TP shards ``[gate_r; up_r]`` in rank order."""
    halves = [split_gate_up(s) for s in shards]
    return torch.cat([torch.cat([g for g, _ in halves]), torch.cat([u for _, u in halves])])
