"""Where each rank's rows of an FSDP2-sharded parameter lie, known without asking the others.

FSDP2 shards dimension 0 the way ``torch.chunk`` does: ``ceil(rows / world)`` rows per rank,
the last ranks shorter or empty.
"""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor, Shard

from areal_core.errors import ArealError


def rows_per_rank(rows: int, world: int) -> list[int]:
    """The dimension-0 length of each rank's shard under ``torch.chunk``."""
    chunk = math.ceil(rows / world) if rows else 0
    return [max(0, min(chunk, rows - rank * chunk)) for rank in range(world)]


def shard_rows(param: DTensor, name: str) -> list[int]:
    """Each rank's number of rows of ``param``; ArealError unless it is sharded on dimension 0
    and this rank holds the ``torch.chunk`` share."""
    if tuple(param.placements) != (Shard(0),):
        raise ArealError(f"{name}: placed as {param.placements}; expected Shard(0)")
    mesh = param.device_mesh
    counts = rows_per_rank(param.shape[0], mesh.size())
    local = param.to_local().shape[0]
    if local != counts[mesh.get_local_rank()]:
        raise ArealError(
            f"{name}: this rank holds {local} of {param.shape[0]} rows, not the torch.chunk "
            f"share FSDP2 uses ({counts[mesh.get_local_rank()]})"
        )
    return counts


def local_rows(param: torch.Tensor, name: str) -> tuple[int, int]:
    """``(start, stop)`` of the rows of dimension 0 this rank holds (all of a plain tensor)."""
    if not isinstance(param, DTensor):
        return 0, param.shape[0]
    counts = shard_rows(param, name)
    start = sum(counts[: param.device_mesh.get_local_rank()])
    return start, start + counts[param.device_mesh.get_local_rank()]
