"""Rank 0's side of the agreement check (``areal_core.agreement``), run beside the rollouts.

After a load, the loop makes the version live at once (the next batch starts generating) and
hands this monitor the trainer's probe scores of that version; the monitor asks the server for
its scores in a thread of its own and judges them. The loop collects the verdict before it
trains on any batch, evaluates or stops, so a wrong version never reaches a training step.
Nothing waits for the check: the server scores the probe while it generates, and the trainer's
probe forward runs while it waits for the batch. Where both share a few CPU cores, that work
still slows the generation beside it (bench/grpo_step.py: 13% of a demo step on 2 cores).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Sequence
import time

from areal_core.agreement import AgreementResult, flatten, judge
from areal_core.grpo.publisher import AdapterPublisher


class AgreementMonitor:
    """One check in flight at a time; ``wait()`` returns its verdict (None when none is pending).

    :param probe: the probe sequences (``areal_core.agreement.probe_sequences``).
    :param base: the trainer's base-model scores of the probe (flat).
    :param dtype: the compute dtype that sets the threshold (``agreement.compute_dtype``).
    """

    def __init__(self, publisher: AdapterPublisher, probe: Sequence[Sequence[int]], base: Sequence[float],
                 dtype: str):
        self.publisher = publisher
        self.probe = [list(p) for p in probe]
        self.base = list(base)
        self.dtype = dtype
        self.trainer: list[float] | None = None  # the current version's scores
        self.previous: list[float] | None = None  # the last checked version's scores
        self._pending: Future | None = None
        self._pending_version: int | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agreement")
        # The probe's sequences are sent at once: one after another, each would queue behind the
        # rollouts the server is generating (measured: 0.2-0.7 s for 5 sequences in the demo).
        self._requests = ThreadPoolExecutor(max_workers=min(8, len(self.probe)),
                                            thread_name_prefix="agreement-request")

    def new_trainer_scores(self, trainer: Sequence[float]) -> None:
        """The trainer moved to a new version: its scores become current, the old ones previous."""
        if self.trainer is not None:
            self.previous = self.trainer
        self.trainer = list(trainer)

    def start(self, version: int) -> None:
        """Check ``version`` (live on the server) against the current trainer scores."""
        if self.trainer is None:
            raise RuntimeError("the trainer's probe scores are needed before a check")
        trainer, previous = self.trainer, self.previous
        self._pending_version = version
        self._pending = self._executor.submit(self._check, version, trainer, previous)

    @property
    def pending_version(self) -> int | None:
        return self._pending_version if self._pending is not None else None

    def wait(self) -> tuple[AgreementResult, float] | None:
        """The pending check's (result, server seconds), or None; re-raises what the check raised."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        return pending.result()

    def _check(self, version: int, trainer: list[float], previous: list[float] | None):
        started = time.perf_counter()
        served = flatten(self._requests.map(lambda sequence: self.publisher.prompt_logprobs(sequence, version),
                                            self.probe))
        seconds = time.perf_counter() - started
        return judge(version, self.dtype, served, trainer, self.base, previous), seconds

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._requests.shutdown(wait=False, cancel_futures=True)
