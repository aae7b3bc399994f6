"""A diagnostic for the weight-sync benchmark: the adapter gathered with ONE all-gather.

The fsdp2 plugin gathers the adapter one tensor at a time (one collective per lora_A/lora_B,
336 for a 24-layer model), so on a busy machine the export is dominated by collective latency.
This gathers the same tensors by concatenating each rank's shards into one flat buffer: the
benchmark times both to show what the per-tensor gather costs. Not used by the project's path.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard


def coalesced_gather_trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full copies of the trainable parameters on rank 0 (``{}`` elsewhere); collective.

    Supports parameters sharded on their first dimension (FSDP2's layout) or not sharded
    (then rank 0's copy is taken), all of one dtype.
    """
    names, pieces, sharded = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_dtensor = isinstance(param, DTensor)
        if is_dtensor and tuple(param.placements) != (Shard(0),):
            raise ValueError(f"{name} is placed as {param.placements}; only Shard(0) is handled")
        pieces.append(param.to_local().detach() if is_dtensor else param.detach())
        names.append(name)
        sharded.append(is_dtensor)
    if len({piece.dtype for piece in pieces}) > 1:
        raise ValueError("the trainable parameters have several dtypes; gather them one by one")
    shapes = [tuple(piece.shape) for piece in pieces]
    flat = torch.cat([piece.reshape(-1) for piece in pieces]) if pieces else torch.empty(0)
    world = dist.get_world_size()
    every_shapes: list = [None] * world
    dist.all_gather_object(every_shapes, shapes)
    sizes = [sum(int(torch.Size(s).numel()) for s in rank_shapes) for rank_shapes in every_shapes]
    longest = max(sizes)
    padded = torch.zeros(longest, dtype=flat.dtype, device=flat.device)
    padded[: flat.numel()] = flat
    gathered = torch.empty(world * longest, dtype=flat.dtype, device=flat.device)
    dist.all_gather_into_tensor(gathered, padded)
    if dist.get_rank() != 0:
        return {}
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for rank, rank_shapes in enumerate(every_shapes):
        offset = rank * longest
        for name, shape in zip(names, rank_shapes):
            count = int(torch.Size(shape).numel())
            parts[name].append(gathered[offset: offset + count].view(shape))
            offset += count
    return {name: (torch.cat(parts[name], dim=0) if split else parts[name][0].clone()).cpu()
            for name, split in zip(names, sharded)}
