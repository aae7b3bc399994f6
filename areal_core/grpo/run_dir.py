"""The run directory (``output_dir``): what a user keeps from a run.

    config.yaml        the resolved configuration
    metrics.jsonl      one JSON object per step (appended and flushed as the run goes)
    adapters/v<N>/     the PEFT adapter of each kept version (adapters/<name>/v<N>/ for a run
                       with adapters:, whose records and events are laid out as
                       areal_core.grpo.adapter_records says)
    logs/              the rollout servers' logs
    plot.png           reward and accuracy against step, and below them the training-inference
                       mismatch, drawn at the start and redrawn every few steps, after each
                       evaluation and at the end
    events.jsonl       adapter loads, unloads and generate calls (with the version each named), every
                       agreement check's figures and every alarm, in order
"""

from __future__ import annotations

import json
import os
from pathlib import Path


class RunDirectory:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).absolute()
        self.adapters = self.root / "adapters"
        self.logs = self.root / "logs"
        self.checkpoints = self.root / "checkpoints"
        self.metrics_path = self.root / "metrics.jsonl"
        self.events_path = self.root / "events.jsonl"
        self.plot_path = self.root / "plot.png"
        self.metric_sinks: list = []  # callables given each record after it is on disk (trackers)
        self.adapter_names: list[str] = []  # a run with adapters: (records hold each one's figures)

    def create(self) -> "RunDirectory":
        for path in (self.root, self.adapters, self.logs, self.checkpoints):
            path.mkdir(parents=True, exist_ok=True)
        return self

    def adapter_dir(self, version: int) -> Path:
        return self.adapters / f"v{version}"

    def write_config(self, data: dict, header: str = "") -> None:
        """``header``: comment lines put first (where each Hub model came from)."""
        import yaml

        (self.root / "config.yaml").write_text(header + yaml.safe_dump(data, sort_keys=False))

    def append_metrics(self, record: dict) -> None:
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        for sink in self.metric_sinks:
            sink(record)

    def append_events(self, events: list[dict]) -> None:
        if not events:
            return
        with open(self.events_path, "a") as handle:
            for event in events:
                handle.write(json.dumps(event, sort_keys=True) + "\n")

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def plot(self) -> None:
        """Reward and accuracy against step (and eval accuracy where measured), as a PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = self.read_metrics()
        if self.adapter_names:
            figure = _adapters_figure(records, self.adapter_names, plt)
        else:
            figure = _one_adapter_figure(records, plt)
        figure.tight_layout()
        staging = self.plot_path.with_suffix(".tmp.png")
        figure.savefig(staging, dpi=100)
        plt.close(figure)
        os.replace(staging, self.plot_path)

    def truncate_metrics(self, after_step: int) -> None:
        """Drop the records of steps after ``after_step`` (they are run again after a resume)."""
        kept = [r for r in self.read_metrics() if r["step"] <= after_step]
        staging = self.metrics_path.with_name(".metrics.jsonl.tmp")
        staging.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        os.replace(staging, self.metrics_path)


def _one_adapter_figure(records: list[dict], plt):
    steps = [r["step"] for r in records if "reward_mean" in r]
    figure, (axis, lower) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True,
                                         gridspec_kw={"height_ratios": [3, 1.4]})
    axis.plot(steps, [r["reward_mean"] for r in records if "reward_mean" in r], label="reward (rollouts)", linestyle="--", linewidth=2.5)
    axis.plot(steps, [r["accuracy"] for r in records if "accuracy" in r], label="accuracy (rollouts)")
    evals = [(r["step"], r["eval_accuracy"]) for r in records if r.get("eval_accuracy") is not None]
    if evals:
        axis.plot(*zip(*evals), marker="o", label="held-out accuracy (greedy)")
    axis.set_ylim(-0.02, 1.02)
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right")
    axis.set_title("GRPO with LoRA")
    # The training-inference mismatch (areal_core.grpo.mismatch): trainer vs server on the
    # rollout tokens of the trainer's current version.
    mismatch = [(r["step"], r["mismatch_mean_abs"], r["mismatch_kl"]) for r in records
                if r.get("mismatch_mean_abs") is not None]
    if mismatch:
        mismatch_steps, mean_abs, kl = zip(*mismatch)
        lower.plot(mismatch_steps, mean_abs, label="mean |trainer - server| log-prob")
        lower.plot(mismatch_steps, kl, label="KL(server || trainer), k3")
        if max(max(mean_abs), max(kl)) > 0:
            lower.set_yscale("log", nonpositive="mask")  # float32's KL can round to 0
        lower.legend(loc="upper right", fontsize="small")
    lower.set_ylabel("mismatch")
    lower.set_xlabel("step")
    lower.grid(alpha=0.3)
    return figure


def _adapters_figure(records: list[dict], names: list[str], plt):
    """One colour per adapter: its rollout reward (dashed) and held-out accuracy (dots) above, its
    training-inference mismatch below."""
    figure, (axis, lower) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True,
                                         gridspec_kw={"height_ratios": [3, 1.4]})
    any_mismatch = False
    for index, name in enumerate(names):
        color = f"C{index}"
        parts = [(r["step"], r[name]) for r in records if isinstance(r.get(name), dict)]
        rewards = [(step, p["reward_mean"]) for step, p in parts if p.get("reward_mean") is not None]
        if rewards:
            axis.plot(*zip(*rewards), color=color, linestyle="--", alpha=0.6, label=f"{name}: reward (rollouts)")
        evals = [(step, p["eval_accuracy"]) for step, p in parts if p.get("eval_accuracy") is not None]
        if evals:
            axis.plot(*zip(*evals), color=color, marker="o", linewidth=2, label=f"{name}: held-out accuracy")
        mismatch = [(step, p["mismatch_mean_abs"]) for step, p in parts if p.get("mismatch_mean_abs") is not None]
        if mismatch:
            lower.plot(*zip(*mismatch), color=color, label=f"{name}")
            any_mismatch = any_mismatch or max(m for _, m in mismatch) > 0
    axis.set_ylim(-0.02, 1.02)
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right", fontsize="small")
    axis.set_title(f"GRPO with {len(names)} LoRA adapters on one base")
    if any_mismatch:
        lower.set_yscale("log", nonpositive="mask")
    if lower.lines:
        lower.legend(loc="upper right", fontsize="small")
    lower.set_ylabel("mean |trainer - server|\nlog-prob")
    lower.set_xlabel("step")
    lower.grid(alpha=0.3)
    return figure
