"""Process groups of the megatron engine: the default group, megatron-core's TP x DP grid, RNG.

Layout: ``world_size = tensor_parallel_size x data_parallel_size`` (no pipeline parallelism
yet). megatron-core's ``parallel_state`` groups consecutive ranks into tensor-parallel groups,
so ranks ``0..TP-1`` hold one copy of the model, ``TP..2TP-1`` the next, and so on.
"""

from __future__ import annotations

import os

import attrs
import torch
import torch.distributed as dist

from areal_core.errors import ArealError

#: The megatron-core RNG-tracker stream used inside tensor-parallel regions (attention dropout).
MODEL_PARALLEL_RNG = "model-parallel-rng"


@attrs.define
class ParallelLayout:
    """This rank's place in the grid, and what the engine created (and so must release)."""

    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    dp_rank: int
    dp_size: int
    device: torch.device
    owns_default_group: bool = False
    owns_model_parallel: bool = False

    @property
    def tp_group(self):
        from megatron.core import parallel_state

        return parallel_state.get_tensor_model_parallel_group()

    @property
    def dp_group(self):
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_group()


def resolve_device(requested: str, cpu_mode: bool) -> torch.device:
    """``cpu`` in CPU mode, else this rank's GPU; raises when the choice cannot work."""
    if cpu_mode:
        return torch.device("cpu")
    if requested == "cpu" or not torch.cuda.is_available():
        from areal_megatron import cpu_mode as workaround

        raise ArealError(
            "megatron-core calls torch.cuda directly and no GPU is available; to run it on the CPU "
            f"anyway (tests, debugging, demos) opt in to the plugin's CPU mode: set "
            f"{workaround.ENV_VAR}=1 or actor.device=cpu"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_parallel(tp_size: int, device: torch.device, seed: int) -> ParallelLayout:
    """Join (or create) the default process group and megatron-core's TP x DP groups.

    With no process group yet, a one-process group is created (gloo on CPU, nccl on GPU).
    An existing megatron-core grid is reused when its TP size matches, refused otherwise.
    """
    from megatron.core import parallel_state, tensor_parallel

    owns_default = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        owns_default = True
    world, rank = dist.get_world_size(), dist.get_rank()
    if tp_size < 1 or world % tp_size:
        raise ArealError(
            f"actor.tensor_parallel_size={tp_size} does not divide the {world} training ranks; "
            f"choose a divisor of the world size (data parallel size = world size / TP)"
        )
    owns_mp = False
    if parallel_state.model_parallel_is_initialized():
        have = parallel_state.get_tensor_model_parallel_world_size()
        if have != tp_size:
            raise ArealError(
                f"megatron-core is already initialised with tensor parallel size {have}, but "
                f"actor.tensor_parallel_size={tp_size}; use one TP size per process"
            )
    else:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp_size)
        owns_mp = True
    tracker = tensor_parallel.get_cuda_rng_tracker()
    if MODEL_PARALLEL_RNG not in tracker.get_states():
        # Different per TP rank, as megatron-core's model_parallel_cuda_manual_seed does.
        tracker.add(MODEL_PARALLEL_RNG, seed + 2718 + parallel_state.get_tensor_model_parallel_rank())
    return ParallelLayout(
        rank=rank,
        world_size=world,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        tp_size=tp_size,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        device=device,
        owns_default_group=owns_default,
        owns_model_parallel=owns_mp,
    )


def release(layout: ParallelLayout) -> None:
    """Undo what ``init_parallel`` created (the megatron grid, a one-process default group)."""
    from megatron.core import parallel_state, tensor_parallel

    if layout.owns_model_parallel and parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
        tensor_parallel.get_cuda_rng_tracker().reset()
        layout.owns_model_parallel = False
    if layout.owns_default_group and dist.is_initialized():
        dist.destroy_process_group()
        layout.owns_default_group = False


def gather_tp(tensor: torch.Tensor, layout: ParallelLayout) -> list[torch.Tensor]:
    """Every TP rank's ``tensor`` (same shape on all), in TP rank order."""
    if layout.tp_size == 1:
        return [tensor]
    parts = [torch.empty_like(tensor) for _ in range(layout.tp_size)]
    dist.all_gather(parts, tensor.contiguous(), group=layout.tp_group)
    return parts


def gather_tp_objects(obj, layout: ParallelLayout) -> list:
    """Every TP rank's picklable ``obj``, in TP rank order."""
    if layout.tp_size == 1:
        return [obj]
    out = [None] * layout.tp_size
    dist.all_gather_object(out, obj, group=layout.tp_group)
    return out
