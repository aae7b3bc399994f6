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


def local_shard(param: DTensor, name: str) -> tuple[torch.Tensor, list[int], int]:
    """``(this rank's local tensor, each rank's number of rows, this rank's index in the mesh)``
    of ``param``; ArealError unless it is sharded on dimension 0 and this rank holds the
    ``torch.chunk`` share. (One ``to_local`` and one mesh lookup: exports call it per tensor.)"""
    if tuple(param.placements) != (Shard(0),):
        raise ArealError(f"{name}: placed as {param.placements}; expected Shard(0)")
    mesh = param.device_mesh
    rank = mesh.get_local_rank()
    counts = rows_per_rank(param.shape[0], mesh.size())
    local = param.to_local()
    if local.shape[0] != counts[rank]:
        raise ArealError(
            f"{name}: this rank holds {local.shape[0]} of {param.shape[0]} rows, not the torch.chunk "
            f"share FSDP2 uses ({counts[rank]})"
        )
    return local, counts, rank


def local_rows(param: torch.Tensor, name: str) -> tuple[int, int]:
    """``(start, stop)`` of the rows of dimension 0 this rank holds (all of a plain tensor)."""
    if not isinstance(param, DTensor):
        return 0, param.shape[0]
    _, counts, rank = local_shard(param, name)
    start = sum(counts[:rank])
    return start, start + counts[rank]
