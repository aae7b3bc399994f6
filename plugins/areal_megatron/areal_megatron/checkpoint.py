"""Checkpoint and resume for the megatron engine.

A checkpoint is a directory::

    meta.json     format, TP size, model architecture, LoRA rank/alpha/targets, optimizer steps
    tp<R>.pt      for each tensor-parallel rank R: its adapter shards, its optimizer state and
                  its RNG states (CPU, CUDA, megatron-core's tracker)

That is a run's only adapter (a run without ``adapters:``). A run with ``adapters:`` lists them:
``meta.json`` has ``adapters``, each one's name, LoRA rank/alpha/targets and own steps (in
place of the top-level LoRA settings), and ``tp<R>.pt`` has ``adapters``, each one's shards
and optimizer state by name (in place of ``adapter`` and ``optimizer``).

Data-parallel replicas are identical, so only data-parallel rank 0 of each TP rank writes. The
directory appears under its final name only when complete (staging sibling, then rename); an
existing checkpoint of the same name is replaced only after the new one is complete. Files are
read back with ``torch.load(weights_only=True)``: tensors and plain containers only.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from areal_core.errors import ArealError

FORMAT = "areal-megatron-checkpoint/1"
META = "meta.json"


def _shard_file(tp_rank: int) -> str:
    return f"tp{tp_rank}.pt"


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {"cpu": torch.get_rng_state(), "tracker": dict(tensor_parallel.get_cuda_rng_tracker().get_states())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(dict(state["tracker"]))


def _lora_settings(slot) -> dict:
    return {"lora_rank": slot.actor.lora_rank, "lora_alpha": slot.actor.lora_alpha,
            "target_modules": slot.target_modules}


def _lists_adapters(engine) -> bool:
    """Whether the checkpoint lists its adapters (any engine but a run's only, legacy adapter)."""
    slots = list(engine.adapters.values())
    return not (len(slots) == 1 and slots[0].legacy)


def _meta(engine) -> dict:
    meta = {
        "format": FORMAT,
        "tensor_parallel_size": engine.layout.tp_size,
        "data_parallel_size": engine.layout.dp_size,
        "architecture": engine.spec.architecture,
        "steps": engine.steps,
    }
    if _lists_adapters(engine):
        meta["adapters"] = [{"name": slot.name, **_lora_settings(slot), "steps": slot.steps}
                            for slot in engine.adapters.values()]
    else:
        meta.update(_lora_settings(next(iter(engine.adapters.values()))))
    return meta


def _tensors(slot) -> dict:
    return {"adapter": {n: p.detach().to("cpu") for n, p in slot.parameters.items()},
            "optimizer": slot.optimizer.state_dict()}


def _payload(engine) -> dict:
    if _lists_adapters(engine):
        return {"adapters": {slot.name: _tensors(slot) for slot in engine.adapters.values()},
                "rng": _rng_state()}
    return {**_tensors(next(iter(engine.adapters.values()))), "rng": _rng_state()}


def _all_ok(ok: bool, engine) -> bool:
    """True on every rank when ``ok`` on every rank (a collective)."""
    if engine.world_size == 1:
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=engine.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _broadcast(value, engine):
    if engine.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(engine, directory: str | os.PathLike) -> None:
    """Write the checkpoint (collective)."""
    final = Path(directory).absolute()
    staging = None
    if engine.rank == 0:
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            staging = tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent)
        except OSError as exc:
            staging = OSError(f"cannot create a checkpoint next to {final}: {exc}")
    staging = _broadcast(staging, engine)
    if isinstance(staging, Exception):
        raise ArealError(str(staging))
    staging = Path(staging)
    error = ""
    if engine.layout.dp_rank == 0:
        try:
            payload = _payload(engine)
            path = staging / _shard_file(engine.layout.tp_rank)
            torch.save(payload, path)
            _fsync(path)
        except Exception as exc:
            error = f"rank {engine.rank}: {exc}"
    if engine.rank == 0 and not error:
        try:
            (staging / META).write_text(json.dumps(_meta(engine), indent=2, sort_keys=True) + "\n")
            _fsync(staging / META)
        except OSError as exc:
            error = f"rank 0: {exc}"
    if not _all_ok(not error, engine):
        if engine.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise ArealError(f"saving the checkpoint {final} failed{': ' + error if error else ' on another rank'}")
    if engine.rank == 0:
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.rename(final, old)
        os.rename(staging, final)
        _fsync(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    if engine.world_size > 1:
        dist.barrier()


def load(engine, directory: str | os.PathLike) -> None:
    """Restore a checkpoint written by ``save`` (collective). Refuses a different layout."""
    path = Path(directory)
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError) as exc:
        raise ArealError(f"{path} is not a megatron engine checkpoint ({META}: {exc})") from None
    if meta.get("format") != FORMAT:
        raise ArealError(f"{path}: checkpoint format {meta.get('format')!r}, expected {FORMAT!r}")
    expected = _meta(engine)
    _refuse_other_settings(path, meta, expected)
    payload = torch.load(path / _shard_file(engine.layout.tp_rank), map_location="cpu", weights_only=True)
    if _lists_adapters(engine):
        for slot in engine.adapters.values():
            _restore(path, slot, payload["adapters"][slot.name])
        steps = {entry["name"]: int(entry["steps"]) for entry in meta["adapters"]}
        for slot in engine.adapters.values():
            slot.steps = steps[slot.name]
    else:
        slot = next(iter(engine.adapters.values()))
        _restore(path, slot, payload)
        slot.steps = int(meta.get("steps", 0))
    _set_rng_state(payload["rng"])
    engine.steps = int(meta.get("steps", 0))
    if engine.world_size > 1:
        dist.barrier()


def _refuse_other_settings(path: Path, meta: dict, expected: dict) -> None:
    """Raise ArealError when the checkpoint was saved with other settings than this run's."""
    if ("adapters" in meta) != ("adapters" in expected):
        saved, ours = (("lists adapters", "has one adapter without adapters:") if "adapters" in meta
                       else ("holds a run's only adapter (no adapters:)", "lists adapters"))
        raise ArealError(f"{path}: the checkpoint {saved} but this run {ours}; resume with the "
                         f"configuration it was saved with")
    keys = ["tensor_parallel_size", "architecture"]
    keys += ["adapters"] if "adapters" in expected else ["lora_rank", "lora_alpha", "target_modules"]
    for key in keys:
        found, wanted = meta.get(key), expected[key]
        if key == "adapters":  # the steps are restored, not matched
            found = [{k: v for k, v in entry.items() if k != "steps"} for entry in found or []]
            wanted = [{k: v for k, v in entry.items() if k != "steps"} for entry in wanted]
        if found != wanted:
            raise ArealError(
                f"{path}: the checkpoint has {key}={found!r} but this run has "
                f"{wanted!r}; resume with the settings it was saved with"
            )


def _restore(path: Path, slot, saved: dict) -> None:
    """Copy one adapter's saved shards and optimizer state into ``slot``."""
    params = slot.parameters
    tensors = saved["adapter"]
    if set(tensors) != set(params):
        raise ArealError(f"{path}: the saved adapter {slot.name!r}'s parameters differ from this model's "
                         f"({sorted(set(tensors) ^ set(params))[:4]})")
    with torch.no_grad():
        for name, param in params.items():
            if tensors[name].shape != param.shape:
                raise ArealError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, the model "
                                 f"{tuple(param.shape)}")
            param.copy_(tensors[name])
    slot.optimizer.load_state_dict(saved["optimizer"])
