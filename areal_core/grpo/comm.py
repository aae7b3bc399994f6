"""The few collectives the loop needs, over torch.distributed when there are several ranks."""

from __future__ import annotations

from typing import Any


class Comm:
    def __init__(self):
        import torch.distributed as dist

        self._dist = dist
        self.active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.active else 0
        self.world_size = dist.get_world_size() if self.active else 1

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (the others pass anything, e.g. None)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        self._dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        """Element-wise sum over ranks of a dict with the same keys on every rank."""
        if self.world_size == 1:
            return dict(values)
        import torch

        keys = sorted(values)
        tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
        self._dist.all_reduce(tensor)
        return dict(zip(keys, tensor.tolist()))
