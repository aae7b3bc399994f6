"""Checkpoints of a run: the engine's state plus the loop's (step, version, data position, RNG).

    checkpoints/step-000012/engine/       what Engine.save_checkpoint wrote (adapter, optimizer, RNG)
    checkpoints/step-000012/loop.json     step, version, data position, Python RNG state
    checkpoints/latest                    the name of the newest complete checkpoint

A checkpoint is assembled in a hidden staging directory and renamed into place; ``latest`` is
replaced atomically afterwards. A crash at any moment leaves the previous checkpoint usable.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

from areal_core.grpo.comm import Comm


def _write_atomic(path: Path, text: str) -> None:
    staging = path.with_name(f".{path.name}.tmp")
    with open(staging, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, path)


class Checkpoints:
    def __init__(self, root: Path, comm: Comm):
        self.root = Path(root)
        self.comm = comm

    def save(self, engine, step: int, version: int, position: int) -> Path:
        """Collective: every rank calls it; rank 0 assembles and publishes the checkpoint."""
        name = f"step-{step:06d}"
        final = self.root / name
        staging = self.root / f".{name}.partial"
        if self.comm.is_leader:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        self.comm.broadcast(None)
        engine.save_checkpoint(str(staging / "engine"))
        if self.comm.is_leader:
            state = {"step": step, "version": version, "position": position,
                     "python_rng": _encode_rng(random.getstate())}
            _write_atomic(staging / "loop.json", json.dumps(state))
            if final.exists():
                shutil.rmtree(final)
            os.rename(staging, final)
            _write_atomic(self.root / "latest", name + "\n")
        self.comm.broadcast(None)
        return final

    def latest(self) -> tuple[Path, dict] | None:
        pointer = self.root / "latest"
        if not pointer.exists():
            return None
        path = self.root / pointer.read_text().strip()
        state = json.loads((path / "loop.json").read_text())
        return path, state

    def restore(self, engine) -> dict | None:
        """Load the newest checkpoint into ``engine``; its loop state, or None when there is none."""
        found = self.latest()
        if found is None:
            return None
        path, state = found
        engine.load_checkpoint(str(path / "engine"))
        random.setstate(_decode_rng(state["python_rng"]))
        return state


def _encode_rng(state):
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _decode_rng(data):
    version, internal, gauss = data
    return (version, tuple(internal), gauss)
