"""Checkpoint and resume: trainable weights, optimizer state, step and RNG states, atomically.

Layout of a checkpoint directory::

    state/            torch.distributed.checkpoint (DCP) files: the trainable parameters
                      (every adapter; every parameter under full fine-tuning) and AdamW's state
                      (``optim``; with several adapters ``optim_<name>``, one per adapter),
                      sharded as trained, re-shardable to another world size on load
    rng/rank<N>.json  the random generator states of rank N
    meta.json         step, world size and the adapter settings (with several adapters, or a
                      run with ``adapters:``, ``adapters``: each one's settings, step and whether
                      its AdamW has state); written last

Atomicity: everything is written into a hidden sibling ``.<name>.partial-*`` and made durable;
only then is an existing checkpoint moved aside (``.<name>.previous-*``), the new one renamed
into place and the old one deleted. A reader of ``<name>`` sees the old checkpoint or the new
one, never a part of one; after a crash between the two renames the previous checkpoint is
still found (``find_checkpoint``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from areal_core.errors import ArealError
from areal_core.staged_directory import fsync_dir, fsync_files

from areal_fsdp2 import rng_state
from areal_fsdp2.distributed import broadcast_object, raise_together
from areal_fsdp2.optimizer import apply_hyperparameters

if TYPE_CHECKING:  # pragma: no cover
    from areal_fsdp2.engine import FSDP2Engine

FORMAT_VERSION = 1
META_FILE = "meta.json"
STATE_DIR = "state"
RNG_DIR = "rng"

_SAVE_OPTIONS = StateDictOptions(ignore_frozen_params=True)
_LOAD_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


class CheckpointError(ArealError):
    """A checkpoint cannot be written, found, or used for this engine's configuration."""


def _lora_settings(actor) -> dict:
    return {
        "lora_rank": actor.lora_rank,
        "lora_alpha": actor.lora_alpha,
        "target_modules": sorted(actor.resolved_target_modules),
    }


def _several(engine: "FSDP2Engine") -> bool:
    """Whether the checkpoint lists its adapters (any engine but one adapter named "default")."""
    slots = list(engine.adapters.values())
    return len(slots) != 1 or slots[0].peft_name not in (None, "default")


def _adapter_settings(engine: "FSDP2Engine") -> dict:
    """What a checkpoint must match to be loaded into ``engine``."""
    actor = engine.actor
    if actor.full_finetune:
        return {"full_finetune": True}
    if _several(engine):
        return {"full_finetune": False, "adapters": [
            {"name": slot.name, **_lora_settings(slot.actor)} for slot in engine.adapters.values()
        ]}
    return {"full_finetune": False, **_lora_settings(actor)}


def _optim_key(engine: "FSDP2Engine", slot) -> str:
    return f"optim_{slot.name}" if _several(engine) else "optim"


def _trainable_model_state(model) -> dict:
    """The model's state dict restricted to its trainable parameters.

    ``ignore_frozen_params`` alone lets a tied frozen weight through (``lm_head.weight`` of a
    model with tied embeddings), which would put a base weight in every checkpoint.
    """
    trainable = {
        name for name, param in model.named_parameters(remove_duplicate=False) if param.requires_grad
    }
    state = get_model_state_dict(model, options=_SAVE_OPTIONS)
    missing = sorted(trainable - set(state))
    if missing:
        raise CheckpointError(f"the model's state dict lacks trainable parameters {missing[:5]}")
    return {key: value for key, value in state.items() if key in trainable}


def commit_directory(staging: Path, final: Path) -> None:
    """Put the complete ``staging`` directory in place of ``final`` (which may exist)."""
    previous = None
    if final.exists():
        previous = final.parent / f".{final.name}.previous-{uuid.uuid4().hex[:8]}"
        os.rename(final, previous)
    try:
        os.rename(staging, final)
    except OSError:
        if previous is not None:
            os.rename(previous, final)
        raise
    fsync_dir(final.parent)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def _is_complete(path: Path) -> bool:
    return (path / META_FILE).is_file() and (path / STATE_DIR).is_dir()


def find_checkpoint(directory: str | os.PathLike) -> Path:
    """The complete checkpoint at ``directory``, or the one a crash mid-swap left beside it."""
    final = Path(directory).absolute()
    if _is_complete(final):
        return final
    survivors = sorted(
        (p for p in final.parent.glob(f".{final.name}.previous-*") if _is_complete(p)),
        key=lambda p: p.stat().st_mtime,
    )
    if survivors and not final.exists():
        return survivors[-1]
    if final.exists():
        raise CheckpointError(f"{final} is not a complete fsdp2 checkpoint (no {META_FILE} or {STATE_DIR}/)")
    raise CheckpointError(f"no checkpoint at {final}")


def save_checkpoint(engine: "FSDP2Engine", directory: str) -> None:
    """Write ``engine``'s trainable state, optimizer, step and RNG states to ``directory``.

    Collective. An existing checkpoint at ``directory`` stays intact until the new one is
    complete. Raises CheckpointError on every rank when any rank fails to write.
    """
    engine.require_sharded("save a checkpoint")
    final = Path(directory).absolute()
    staging_name, error = None, None
    if engine.rank == 0:
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            staging_name = tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent)
        except OSError as exc:
            error = f"cannot write checkpoint {final}: {exc}"
    staging_name, error = broadcast_object((staging_name, error))
    if error:
        raise CheckpointError(error)
    staging = Path(staging_name)

    started = {slot.name: bool(slot.optimizer.state) for slot in engine.adapters.values()}
    local_error = None
    try:
        engine.reshard()
        state = {"model": _trainable_model_state(engine.model)}
        for slot in engine.adapters.values():
            if started[slot.name]:
                # Asked only once AdamW has state: asking earlier would make DCP take a zero step.
                state[_optim_key(engine, slot)] = get_optimizer_state_dict(
                    engine.model, slot.optimizer, options=_SAVE_OPTIONS)
        dcp.save(state, checkpoint_id=str(staging / STATE_DIR))
        (staging / RNG_DIR).mkdir(exist_ok=True)
        (staging / RNG_DIR / f"rank{engine.rank}.json").write_text(json.dumps(rng_state.capture()))
    except Exception as exc:  # reported to every rank below instead of leaving them waiting
        local_error = f"writing checkpoint {final} failed on rank {engine.rank}: {exc}"
    try:
        raise_together(local_error, CheckpointError)
    except CheckpointError:
        if engine.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise

    commit_error = None
    if engine.rank == 0:
        try:
            meta = {
                "format": FORMAT_VERSION,
                "step": engine.step,
                "world_size": engine.world_size,
                "optimizer": any(started.values()),
                "base_model_path": str(engine.actor.path),
                **_adapter_settings(engine),
            }
            if _several(engine):
                meta["adapters"] = [
                    {**entry, "step": slot.step, "optimizer": started[slot.name]}
                    for entry, slot in zip(meta["adapters"], engine.adapters.values())
                ]
            (staging / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            fsync_files(staging)
            commit_directory(staging, final)
        except Exception as exc:  # reported to every rank below
            shutil.rmtree(staging, ignore_errors=True)
            commit_error = f"committing checkpoint {final} failed: {exc}"
    commit_error = broadcast_object(commit_error)
    if commit_error:
        raise CheckpointError(commit_error)


def _check_compatible(engine: "FSDP2Engine", meta: dict, path: Path) -> None:
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')} is not {FORMAT_VERSION}")
    expected = _adapter_settings(engine)
    found = dict(meta)
    if "adapters" in found:  # each adapter's step and optimizer flag are state, not settings
        found["adapters"] = [{k: v for k, v in entry.items() if k not in ("step", "optimizer")}
                             for entry in found["adapters"]]
    differences = [
        f"{key}: checkpoint {found.get(key)!r}, configuration {value!r}"
        for key, value in expected.items()
        if found.get(key) != value
    ]
    if differences:
        raise CheckpointError(
            f"{path} was written for another adapter ({'; '.join(differences)}); resume with the "
            f"settings the checkpoint was trained with"
        )


def load_checkpoint(engine: "FSDP2Engine", directory: str) -> None:
    """Restore what ``save_checkpoint`` wrote into the sharded ``engine`` (collective).

    The trainable parameters and AdamW state are re-sharded to this world size; the step is
    restored; each rank restores its own RNG states when the checkpoint has them (same world
    size). Optimizer hyper-parameters come from the configuration, not the checkpoint.
    """
    engine.require_sharded("load a checkpoint")
    # Every rank reads the directory itself; all stop together if any cannot use it.
    path, meta, problem = None, None, None
    try:
        path = find_checkpoint(directory)
        meta = json.loads((path / META_FILE).read_text())
        _check_compatible(engine, meta, path)
    except (CheckpointError, OSError, ValueError) as exc:
        problem = str(exc)
    raise_together(problem, CheckpointError)

    engine.reshard()
    slots = list(engine.adapters.values())
    if _several(engine):
        entries = meta["adapters"]
    else:
        entries = [{"step": meta["step"], "optimizer": meta["optimizer"]}]
    state = {"model": _trainable_model_state(engine.model)}
    for slot, entry in zip(slots, entries):
        if entry["optimizer"]:
            state[_optim_key(engine, slot)] = get_optimizer_state_dict(
                engine.model, slot.optimizer, options=_SAVE_OPTIONS)
    try:
        dcp.load(state, checkpoint_id=str(path / STATE_DIR))
    except Exception as exc:
        raise CheckpointError(
            f"{path} does not hold this model's trainable parameters ({exc}); was it written for "
            f"another model or adapter?"
        ) from exc
    set_model_state_dict(engine.model, state["model"], options=_LOAD_OPTIONS)
    for slot, entry in zip(slots, entries):
        if entry["optimizer"]:
            set_optimizer_state_dict(engine.model, slot.optimizer, state[_optim_key(engine, slot)],
                                     options=_LOAD_OPTIONS)
        else:
            slot.optimizer.state.clear()
        apply_hyperparameters(slot.optimizer, slot.actor.optimizer)
        slot.step = int(entry["step"])
    engine.step = int(meta["step"])
    rng_file = path / RNG_DIR / f"rank{engine.rank}.json"
    if meta["world_size"] == engine.world_size and rng_file.is_file():
        rng_state.restore(json.loads(rng_file.read_text()))
