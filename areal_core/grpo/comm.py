"""The few collectives the loop needs, over torch.distributed when there are several ranks.

Two kinds of waiting, with two bounds. Training collectives (``sum``, and the engine's own) find
every rank busy with the same work, so a rank that does not arrive within the process group's
timeout (``train.collective_timeout``) is dead or hung, and the collective fails. A
``broadcast`` from rank 0 is different: the other ranks wait while rank 0 alone talks to the
rollout servers (rollouts, loads, evaluation, a server restart), which may take much longer. So
before each broadcast they wait for rank 0's go-ahead on the rendezvous store, for at most
``leader_wait_timeout`` seconds, in short slices that leave signals (Ctrl-C, SIGTERM) handled;
the broadcast itself then meets every rank ready and needs only the short timeout.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from areal_core.errors import ArealError


def is_peer_failure(error: BaseException) -> bool:
    """Whether ``error`` is a collective failing because another rank died, hung or left.

    A distributed checkpoint wraps each rank's own error in a ``CheckpointException`` (a
    BaseException, whose ``failures`` maps rank to (error, traceback)); those, and the errors an
    error was raised ``from``, are looked at too."""
    seen: set[int] = set()
    pending = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if _is_collective_failure(current):
            return True
        failures = getattr(current, "failures", None)
        if isinstance(failures, dict):
            pending.extend(f[0] if isinstance(f, tuple) else f for f in failures.values()
                           if isinstance(f[0] if isinstance(f, tuple) else f, BaseException))
        pending.append(current.__cause__)
    return False


def _is_collective_failure(error: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error)
    # gloo's own words when a peer does not answer within the timeout name no backend.
    return isinstance(error, RuntimeError) and any(
        marker in text for marker in ("gloo", "NCCL", "Connection closed by peer", "Connection reset by peer",
                                      "Broken pipe", "Application timeout caused pair closure"))


class LeaderFailed(ArealError):
    """Raised on the other ranks when rank 0's part of the work failed (rank 0 raises its own).

    ``checkpoint_on_stop`` is rank 0's error's own (see ``stops_with_checkpoint``)."""

    def __init__(self, message: str, checkpoint_on_stop: bool = False):
        super().__init__(message)
        self.checkpoint_on_stop = checkpoint_on_stop


def stops_with_checkpoint(error: BaseException) -> bool:
    """Whether ``error`` stops the run with the trainer intact, so that the loop writes a
    checkpoint of the last completed step first (e.g. a rollout server lost past its restarts).
    An error class says so with the class attribute ``checkpoint_on_stop = True``."""
    return bool(getattr(error, "checkpoint_on_stop", False))


class Comm:
    """Rank, world size and the loop's collectives.

    :param leader_wait_timeout: seconds a rank other than 0 waits for rank 0 to reach a
        broadcast; None (or one rank) broadcasts at once, waiting inside the collective.
    """

    def __init__(self, leader_wait_timeout: float | None = None):
        import torch.distributed as dist

        self._dist = dist
        self.active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.active else 0
        self.world_size = dist.get_world_size() if self.active else 1
        self.leader_wait_timeout = leader_wait_timeout
        self._sequence = 0
        self._store = None
        if self.world_size > 1 and leader_wait_timeout:
            from torch.distributed.distributed_c10d import _get_default_store

            self._store = dist.PrefixStore("areal-leader/", _get_default_store())

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (the others pass anything, e.g. None)."""
        if self.world_size == 1:
            return obj
        self._sequence += 1
        key = str(self._sequence)
        if self._store is not None:
            if self.is_leader:
                self._store.set(key, b"1")
            else:
                self._wait_for_leader(key)
        box = [obj]
        self._dist.broadcast_object_list(box, src=0)
        if self._store is not None and self.is_leader:
            # Every rank saw the key before it joined the broadcast that just completed.
            self._store.delete_key(key)
        return box[0]

    def leader_result(self, compute: Callable[[], Any]) -> Any:
        """Rank 0 runs ``compute``; every rank returns its result, or every rank raises.

        Rank 0 re-raises its own exception; the others raise ``LeaderFailed`` with its message,
        so that no rank waits for rank 0 after rank 0 gave up. KeyboardInterrupt and SystemExit
        are not broadcast: every rank receives its own signal.
        """
        outcome, error = None, None
        if self.is_leader:
            try:
                outcome = ("ok", compute())
            except Exception as exc:
                error = exc
                outcome = ("error", f"{type(exc).__name__}: {exc}", stops_with_checkpoint(exc))
        try:
            outcome = self.broadcast(outcome)
        except Exception:
            if error is not None:  # the other ranks are gone: rank 0's own error says more
                raise error
            raise
        if outcome[0] == "error":
            if error is not None:
                raise error
            raise LeaderFailed(f"rank 0 stopped the run: {outcome[1]}", checkpoint_on_stop=outcome[2])
        return outcome[1]

    def _wait_for_leader(self, key: str) -> None:
        # Short polls (store.wait with a timeout logs a warning each time it expires); between
        # them Python handles signals.
        started = time.monotonic()
        while True:
            try:
                if self._store.check([key]):
                    return
                problem = None
            except Exception as exc:  # the store is gone (torchrun ended): keep to the bound
                problem = exc
            waited = time.monotonic() - started
            if waited >= self.leader_wait_timeout:
                raise ArealError(
                    f"rank {self.rank} waited {waited:.0f} s for rank 0 to finish its work with the "
                    f"rollout servers and it never came{f' ({problem})' if problem else ''}; rank 0 is "
                    f"hung or gone. The bound is train.collective_timeout + (rollout.max_restarts + 1) "
                    f"x rollout.startup_timeout"
                )
            # Rank 0 usually comes within a second (a rollout batch, a load): poll finely then,
            # since every ms of lag here is a ms rank 0 waits in the broadcast. A check takes ~10 us:
            # polling every ms costs ~4% of a core.
            time.sleep(0.001 if waited < 2 else 0.05 if waited < 10 else 0.2)

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        """Element-wise sum over ranks of a dict with the same keys on every rank."""
        return self._all_reduce(values, "SUM")

    def max(self, values: dict[str, float]) -> dict[str, float]:
        """Element-wise maximum over ranks of a dict with the same keys on every rank."""
        return self._all_reduce(values, "MAX")

    def _all_reduce(self, values: dict[str, float], op: str) -> dict[str, float]:
        if self.world_size == 1:
            return dict(values)
        import torch

        keys = sorted(values)
        tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
        self._dist.all_reduce(tensor, op=getattr(self._dist.ReduceOp, op))
        return dict(zip(keys, tensor.tolist()))

    def gather(self, obj: Any) -> list | None:
        """Every rank's ``obj`` on rank 0, in rank order (None on the other ranks)."""
        if self.world_size == 1:
            return [obj]
        box = [None] * self.world_size if self.is_leader else None
        self._dist.gather_object(obj, box, dst=0)
        return box
