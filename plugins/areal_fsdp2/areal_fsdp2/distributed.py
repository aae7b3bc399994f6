"""The process group, the device of this rank, and the few small collectives the engine uses.

Every function here is collective where it says so: all ranks call it, in the same order.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from areal_core.errors import ArealError


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def device_type(requested: str) -> str:
    """``"cuda"`` or ``"cpu"`` for ``actor.device`` ("auto": cuda when one is visible)."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ArealError(
            "actor.device is 'cuda' but no CUDA device is visible to this process; "
            "use actor.device: cpu (or auto)"
        )
    if requested not in ("cpu", "cuda"):
        raise ArealError(f"actor.device {requested!r} is unknown; use auto, cpu or cuda")
    return requested


def ensure_process_group(kind: str, attempts: int = 3) -> bool:
    """Initialise a one-process group when none exists; True when this call created it.

    gloo on CPU, nccl on CUDA, rendezvous on a free loopback port (retried if another
    process takes the port first).
    """
    if dist.is_initialized():
        return False
    backend = "nccl" if kind == "cuda" else "gloo"
    for attempt in range(attempts):
        try:
            dist.init_process_group(
                backend, init_method=f"tcp://127.0.0.1:{free_loopback_port()}", rank=0, world_size=1
            )
            return True
        except (RuntimeError, OSError):
            if attempt == attempts - 1:
                raise
    return False


def rank_device(kind: str) -> torch.device:
    """This rank's device: the CPU, or the CUDA device of its local rank (which it selects)."""
    if kind == "cpu":
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank() % torch.cuda.device_count()))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def all_reduce_max(values: list[int], device: torch.device) -> list[int]:
    """Element-wise maximum of integer lists over all ranks (collective)."""
    tensor = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [int(v) for v in tensor.tolist()]


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (collective; pickled, keep it small)."""
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (collective)."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def raise_together(local_error: str | None, error_type: type[Exception] = ArealError) -> None:
    """Raise ``error_type`` on every rank when any rank has an error (collective).

    Each rank raises its own message, or names the first failing rank's, so no rank is left
    waiting in a collective the others will never reach.
    """
    errors = gather_objects(local_error)
    failing = [(rank, error) for rank, error in enumerate(errors) if error]
    if not failing:
        return
    if local_error:
        raise error_type(local_error)
    rank, error = failing[0]
    raise error_type(f"rank {rank} failed: {error}")


def sum_replicated_gradients(params: list[torch.nn.Parameter], device: torch.device) -> None:
    """Sum over ranks the gradients of the parameters FSDP2 does not shard (collective).

    FSDP2 reduce-scatters the gradients of what it shards; a parameter kept whole on every rank
    (``actor.replicate_adapter``) has only this rank's gradient. One all-reduce of one flat
    buffer per dtype; a missing gradient counts as zero, so every rank sends the same layout.
    """
    whole = [p for p in params if not isinstance(p, DTensor)]
    if dist.get_world_size() == 1 or not whole:
        return
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for param in whole:
        by_dtype.setdefault(param.dtype, []).append(param)
    for dtype, group in by_dtype.items():
        flat = torch.cat([
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(device) for p in group
        ])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for param in group:
            count = param.numel()
            param.grad = flat[offset: offset + count].view_as(param).to(param.device)
            offset += count
