"""Experiment trackers (the ``tracking:`` section): TensorBoard, Weights & Biases, MLflow.

Rank 0 sends every scalar of each ``metrics.jsonl`` record to each tracker asked for, under the
names of ``areal_core.tracking.names``, with the resolved configuration attached to the run.
Each library is imported only when its tracker opens, at the first record. A tracker that
fails to open, or fails later (a full disk, a lost connection), is said once on stderr and the
run goes on: metrics.jsonl stays the record of truth. A resumed run continues its W&B and
MLflow runs (their ids are kept in ``<output_dir>/tracking.json``).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Callable

from areal_core.config import TrackingConfig
from areal_core.tracking.names import scalars, tracker_name

#: tracker -> (module it needs, the areal-core extra that installs it)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow")}
STATE_FILE = "tracking.json"


def requested(config: TrackingConfig) -> list[str]:
    """The trackers a configuration asks for, in a fixed order."""
    names = []
    if config.tensorboard:
        names.append("tensorboard")
    if config.wandb is not None and config.wandb.mode != "disabled":
        names.append("wandb")
    if config.mlflow is not None:
        names.append("mlflow")
    return names


def missing_packages(config: TrackingConfig) -> dict[str, str]:
    """Tracker -> the extra to install, for each requested tracker whose package is absent."""
    return {name: PACKAGES[name][1] for name in requested(config)
            if importlib.util.find_spec(PACKAGES[name][0]) is None}


def default_mlflow_uri(output_dir: Path) -> str:
    return f"sqlite:///{(output_dir / 'mlflow.db').absolute()}"


class Trackers:
    """The trackers of one run, opened at its first record; ``log`` and ``close`` never raise."""

    def __init__(self, config: TrackingConfig, output_dir: str | Path, run_config: dict, resume: bool,
                 warn: Callable[[str], None], adapters: list[str] = ()):
        """``adapters``: the names of a run with ``adapters:``, whose records hold each one's
        figures under its name; they are sent as ``<name>/<phase>/<metric>``."""
        self.config = config
        self.adapters = list(adapters)
        self.output_dir = Path(output_dir).absolute()
        self.run_config = run_config
        self.resume = resume
        self.warn = warn
        self.open: list | None = None  # None until the first record
        self.warned: set[str] = set()

    def log(self, record: dict, adapter: str | None = None) -> None:
        if not requested(self.config):
            return
        step = int(record["step"])
        if self.open is None:
            self.open = self._open_all(first_step=step)
        metrics = scalars(record, adapter)
        for name in self.adapters:
            if isinstance(record.get(name), dict):
                metrics.update(scalars({"step": step, **record[name]}, name))
        for tracker in self.open:
            try:
                tracker.log(metrics, step)
            except Exception as exc:  # a tracker must never stop training; it is tried again next step
                self._warn_once(tracker.name, "log", exc)

    def close(self) -> None:
        for tracker in self.open or []:
            try:
                tracker.close()
            except Exception as exc:
                self._warn_once(tracker.name, "close", exc)
        self.open = []

    def _warn_once(self, name: str, what: str, exc: Exception) -> None:
        if name in self.warned:
            return
        self.warned.add(name)
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        self.warn(f"areal train: tracker {name} failed to {what}: {type(exc).__name__}: {detail}; "
                  f"training goes on (metrics.jsonl has every figure; said once)")

    def _open_all(self, first_step: int) -> list:
        state_path = self.output_dir / STATE_FILE
        state = {}
        if self.resume and state_path.exists():
            try:
                state = json.loads(state_path.read_text())
            except (OSError, ValueError):
                state = {}
        opened = []
        for name in requested(self.config):
            try:
                opened.append(self._open_one(name, state, self.output_dir.name, first_step))
            except Exception as exc:  # skipped for the run; the others still track
                self._warn_once(name, "open", exc)
        try:
            state_path.write_text(json.dumps(state, indent=1) + "\n")
        except OSError as exc:
            self.warn(f"areal train: cannot write {state_path} ({exc}); a resume starts new tracker runs")
        return opened

    def _open_one(self, name: str, state: dict, run_name: str, first_step: int):
        c = self.config
        if name == "tensorboard":
            from areal_core.tracking.tensorboard import TensorBoardTracker

            log_dir = Path(c.tensorboard_dir) if c.tensorboard_dir else self.output_dir / "tensorboard"
            return TensorBoardTracker(log_dir, self.run_config, first_step)
        if name == "wandb":
            from areal_core.tracking.wandb_tracker import WandbTracker

            if "wandb_run_id" not in state:
                from wandb.sdk.lib.runid import generate_id

                state["wandb_run_id"] = generate_id()
            directory = Path(c.wandb.dir) if c.wandb.dir else self.output_dir
            return WandbTracker(c.wandb, directory, run_name, state["wandb_run_id"], self.run_config)
        from areal_core.tracking.mlflow_tracker import MlflowTracker

        uri = c.mlflow.tracking_uri or default_mlflow_uri(self.output_dir)
        artifacts = None if c.mlflow.tracking_uri else (self.output_dir / "mlartifacts").as_uri()
        tracker = MlflowTracker(c.mlflow, uri, run_name, state.get("mlflow_run_id"), self.run_config, artifacts)
        state["mlflow_run_id"] = tracker.run_id
        return tracker


__all__ = ["PACKAGES", "Trackers", "missing_packages", "requested", "scalars", "tracker_name"]
