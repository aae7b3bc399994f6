"""Checkpoints of a run: the engine's state plus the loop's (step, version, data position, RNG).

    checkpoints/step-000012/engine/       what Engine.save_checkpoint wrote (adapter, optimizer, RNG)
    checkpoints/step-000012/loop.json     step, version, data position, Python RNG state (and with
                                          several adapters each one's step, version, position)
    checkpoints/latest                    the name of the newest complete checkpoint

A checkpoint is assembled in a hidden staging directory and renamed into place; ``latest`` is
replaced atomically afterwards. A crash at any moment leaves the previous checkpoint usable; a
write that fails (disk full, ...) removes its staging directory and raises ``CheckpointWriteError``
on every rank, naming the checkpoint ``latest`` still points at.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

from areal_core.errors import ArealError
from areal_core.grpo.comm import Comm, is_peer_failure


class CheckpointWriteError(ArealError):
    """A checkpoint could not be written; the previous one is intact."""


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

    def save(self, engine, step: int, version: int, position: int, keep: int = 0,
             adapters: dict[str, dict] | None = None) -> Path:
        """Collective: every rank calls it; rank 0 assembles and publishes the checkpoint, then
        removes all but the ``keep`` newest (0: keeps all; the one ``latest`` names always stays).

        ``adapters`` (a run with ``adapters:``): each adapter's own ``{step, version, position}``,
        kept in loop.json beside the run's; ``step`` is then the smallest of their steps.

        :raises CheckpointWriteError: on every rank, when any part could not be written.
        """
        name = f"step-{step:06d}"
        final = self.root / name
        staging = self.root / f".{name}.partial"

        def prepare() -> None:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)

        def commit() -> None:
            state = {"step": step, "version": version, "position": position,
                     "python_rng": _encode_rng(random.getstate())}
            if adapters is not None:
                state["adapters"] = adapters
            _write_atomic(staging / "loop.json", json.dumps(state))
            if final.exists():
                shutil.rmtree(final)
            os.rename(staging, final)
            _write_atomic(self.root / "latest", name + "\n")
            if keep:
                self._prune(keep, name)

        try:
            self.comm.leader_result(prepare)
            engine.save_checkpoint(str(staging / "engine"))
            self.comm.leader_result(commit)
        except BaseException as exc:  # torch's CheckpointException is a BaseException
            if self.comm.is_leader:
                shutil.rmtree(staging, ignore_errors=True)
            if isinstance(exc, (KeyboardInterrupt, SystemExit)) or is_peer_failure(exc):
                raise  # not a write problem
            previous = self._latest_name()
            kept = (f"checkpoints/latest still names {previous}, which stays loadable" if previous
                    else "no earlier checkpoint exists")
            raise CheckpointWriteError(
                f"the checkpoint of step {step} could not be written ({_reason(exc)}); nothing of it "
                f"was kept and {kept}. Fix the cause (e.g. free space under {self.root}) and continue "
                f"with resume=true"
            ) from exc
        return final

    def _prune(self, keep: int, latest: str) -> None:
        complete = sorted((p for p in self.root.glob("step-*") if p.name[5:].isdigit()),
                          key=lambda p: int(p.name[5:]))
        for path in complete[:-keep]:
            if path.name != latest:
                shutil.rmtree(path, ignore_errors=True)

    def _latest_name(self) -> str | None:
        try:
            return (self.root / "latest").read_text().strip() or None
        except OSError:
            return None

    def latest(self) -> tuple[Path, dict] | None:
        name = self._latest_name()
        if name is None:
            return None
        path = self.root / name
        try:
            state = json.loads((path / "loop.json").read_text())
        except (OSError, ValueError) as exc:
            raise ArealError(
                f"{self.root / 'latest'} names {name}, but {path / 'loop.json'} cannot be read ({exc}); "
                f"the checkpoint directory was changed by hand. Point latest at another step-* "
                f"directory or start without resume"
            ) from exc
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


def _reason(error: BaseException) -> str:
    """What failed, in one line; a distributed checkpoint's error names each rank's own."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = [(rank, pair[0] if isinstance(pair, tuple) else pair) for rank, pair in sorted(failures.items())]
        return "; ".join(f"rank {rank}: {type(e).__name__}: {e}" for rank, e in inner)
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"


def _encode_rng(state):
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _decode_rng(data):
    version, internal, gauss = data
    return (version, tuple(internal), gauss)
