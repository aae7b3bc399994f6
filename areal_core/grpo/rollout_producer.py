"""Rank 0's rollout producer: batches generated ahead of training, with bounded staleness.

With ``max_head_offpolicyness = K`` the batch trained at step s may come from the adapter of any
step >= s - 1 - K (at most K versions behind the one it is trained against): the producer starts
generating batch s as soon as that version is live, so with K >= 1 generation overlaps the
previous step's training. K = 0 is the synchronous loop (batch s waits for the update of step
s - 1). Steps and versions are counted apart: after a resume, version numbers run ahead of steps.
Every batch records the version that produced each sample. A batch is whole or absent: when a
generate call fails, the producer hands the exception to the loop and stops; after recovering the
server, the loop starts a new producer at the same step and data position.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable

import attrs

from areal_core.grpo.batch import build_items
from areal_core.grpo.publisher import AdapterPublisher
from areal_core.interfaces import SamplingParams


class RolloutProducer:
    def __init__(self, publisher: AdapterPublisher, dataset, reward_fn: Callable, *, batch_size: int,
                 n_samples: int, sampling: SamplingParams, max_offpolicyness: int, first_step: int,
                 last_step: int, position: int, seed: int | None = None):
        self.publisher = publisher
        self.dataset = dataset
        self.reward_fn = reward_fn
        self.batch_size = batch_size
        self.n_samples = n_samples
        self.sampling = sampling
        self.k = max_offpolicyness
        self.first_step, self.last_step = first_step, last_step
        self.position = position
        self.seed = seed
        self._live_version = -1
        self._live_step = -1  # the step whose update produced the live version
        self._version_changed = threading.Condition()
        self._batches: queue.Queue = queue.Queue(maxsize=self.k + 1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rollout-producer", daemon=True)

    def start(self) -> "RolloutProducer":
        self._thread.start()
        return self

    def version_live(self, version: int, step: int) -> None:
        """Called by the loop once ``version``, the update of ``step``, is live and checked."""
        with self._version_changed:
            self._live_version, self._live_step = version, step
            self._version_changed.notify_all()

    def stop(self, timeout: float | None = None) -> None:
        """Stop producing; with ``timeout``, also wait that long for a request in flight to end."""
        self._stop.set()
        with self._version_changed:
            self._version_changed.notify_all()
        if timeout is not None and self._thread.is_alive():
            self._thread.join(timeout)

    def next_batch(self) -> dict:
        """The next batch, in step order; re-raises what failed in the producer."""
        while True:
            try:
                batch = self._batches.get(timeout=1.0)
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("the rollout producer stopped without producing a batch")
                continue
            if isinstance(batch, BaseException):
                raise batch
            return batch

    def _wait_for_version(self, minimum_step: int) -> int | None:
        with self._version_changed:
            while self._live_step < minimum_step and not self._stop.is_set():
                self._version_changed.wait(timeout=1.0)
            return None if self._stop.is_set() else self._live_version

    def _put(self, item) -> None:
        """Queue ``item``, unless the producer is stopped while the queue is full."""
        while not self._stop.is_set():
            try:
                self._batches.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _run(self) -> None:
        try:
            for step in range(self.first_step, self.last_step + 1):
                version = self._wait_for_version(step - 1 - self.k)
                if version is None:
                    return
                self._put(self._produce(step, version))
        except BaseException as exc:  # handed to the loop, which raises it on rank 0
            self._put(exc)

    def _produce(self, step: int, version: int) -> dict:
        started = time.time()
        records = self.dataset.train_batch(self.position, self.batch_size)
        sampling = self.sampling
        if self.seed is not None:  # reproducible rollouts: the same step draws the same samples
            sampling = attrs.evolve(sampling, seed=(self.seed * 1_000_003 + step * 10_007) % 2**31)
        # All samples of the batch or an exception: a batch is never cut short.
        groups = self.publisher.generate([r["prompt_ids"] for r in records], version, self.n_samples,
                                         sampling)
        self.position += self.batch_size
        rewards = [[float(self.reward_fn(r, s.output_ids)) for s in group] for r, group in zip(records, groups)]
        flat = [r for group in rewards for r in group]
        return {
            "step": step,
            "items": build_items(groups, rewards),
            "reward_mean": sum(flat) / len(flat),
            "accuracy": sum(1.0 for r in flat if r >= 1.0) / len(flat),
            "rollout_versions": sorted({s.version for group in groups for s in group}),
            "position": self.position,
            "generation_started_at": started,
            "generation_finished_at": time.time(),
        }
