"""The run directory of a run with ``adapters:``, as each adapter's loop sees it.

    adapters/<name>/v<N>/   each adapter's versions (PEFT directories)
    metrics.jsonl           one record per step: {"step": N, "<name>": {...that adapter's figures}, ...,
                            "step_seconds": the whole step}
    events.jsonl            every adapter's loads, unloads, generate calls and checks, each with
                            its "adapter"

Each adapter's ``GRPOLoop`` writes and reads its own records as a one-adapter run does; the
``StepRecords`` of rank 0 merges them into the step's one record once every adapter's is in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from areal_core.grpo.run_dir import RunDirectory


class StepRecords:
    """Rank 0: each adapter's record of a step in, the step's one merged record out (in order).

    :param on_written: called with each merged record after it is on disk (the progress bar).
    """

    def __init__(self, run_dir: RunDirectory, names: list[str],
                 on_written: Callable[[dict], object] = lambda record: None):
        self.run_dir = run_dir
        self.names = list(names)
        self.on_written = on_written
        self.pending: dict[int, dict[str, dict]] = {}  # step -> adapter -> its figures

    def add(self, name: str, record: dict) -> None:
        part = {key: value for key, value in record.items() if key != "step"}
        self.pending.setdefault(int(record["step"]), {})[name] = part
        while self.pending:
            step = min(self.pending)
            if set(self.pending[step]) != set(self.names):
                break  # a later step's record waits for this one's
            self._write(step, self.pending.pop(step))

    def flush(self) -> None:
        """Write what is pending as it is (a stop between two adapters' parts of a step); a
        resume completes it (``resume``)."""
        for step in sorted(self.pending):
            self._write(step, self.pending.pop(step))

    def resume(self, adapter_steps: dict[str, int]) -> None:
        """After a resume from a checkpoint whose adapters completed ``adapter_steps``: the records
        of later steps leave metrics.jsonl, and the figures of adapters that had completed those
        steps wait here for the others' (which the resumed run makes)."""
        first = min(adapter_steps.values())
        later = [r for r in self.run_dir.read_metrics() if r["step"] > first]
        self.run_dir.truncate_metrics(after_step=first)
        for record in later:
            for name in self.names:
                part = record.get(name)
                if isinstance(part, dict) and adapter_steps.get(name, first) >= record["step"]:
                    self.pending.setdefault(record["step"], {})[name] = part

    def _write(self, step: int, parts: dict[str, dict]) -> None:
        record: dict = {"step": step}
        for name in self.names:
            if name in parts:
                record[name] = parts[name]
        started = [p["started_at"] for p in parts.values() if "started_at" in p]
        finished = [p["finished_at"] for p in parts.values() if "finished_at" in p]
        if started and len(finished) == len(parts):
            record["step_seconds"] = max(finished) - min(started)
        self.run_dir.append_metrics(record)
        self.on_written(record)


class AdapterRunDirectory:
    """The run directory as one adapter's loop uses it (the ``RunDirectory`` methods it calls)."""

    def __init__(self, run_dir: RunDirectory, name: str, records: StepRecords | None):
        self.run_dir = run_dir
        self.name = name
        self.records = records  # rank 0 only
        self.root = run_dir.root
        self.adapters: Path = run_dir.adapters / name
        self.logs = run_dir.logs
        self.checkpoints = run_dir.checkpoints
        if records is not None:
            self.adapters.mkdir(parents=True, exist_ok=True)

    def adapter_dir(self, version: int) -> Path:
        return self.adapters / f"v{version}"

    def append_metrics(self, record: dict) -> None:
        self.records.add(self.name, record)

    def append_events(self, events: list[dict]) -> None:
        self.run_dir.append_events([{**event, "adapter": self.name} for event in events])

    def read_metrics(self) -> list[dict]:
        return [{"step": r["step"], **r[self.name]} for r in self.run_dir.read_metrics()
                if isinstance(r.get(self.name), dict)]

    def plot(self) -> None:
        """Nothing: the run's plot draws every adapter (``MultiAdapterLoop``)."""

    def truncate_metrics(self, after_step: int) -> None:
        """Nothing: a resume truncates once for every adapter (``StepRecords.resume``)."""
