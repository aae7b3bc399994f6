"""The last lines `make demo-multi` prints: where the run is, what each adapter achieved, and whether
every one meets the demo's goal (``areal_core.demo.summary``: held-out greedy accuracy up by at least
30 points and at least 0.90); the exit status is 1 when any adapter misses it.

A run with ``adapters:`` keeps each adapter's figures under its name in every metrics record,
``{"step": N, "<adapter>": {"eval_accuracy": ..., "reward_mean": ...}, ...}``; the first
evaluation (step 0) is that adapter's base accuracy.

    python -m areal_core.demo.multi_summary RUN_DIR [--config CONFIG]

With ``--config``, the adapters its ``adapters:`` list names must all be in the run (one that never
evaluated is a miss, not skipped); without it, every adapter the records hold is summarised.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from areal_core.demo.summary import GOAL_ACCURACY, GOAL_GAIN, goal_met
from areal_core.grpo.run_dir import RunDirectory


def adapter_evaluations(records: list[dict]) -> dict[str, list[float]]:
    """Each adapter's eval_accuracy figures in step order, adapters in order of first appearance."""
    evaluations: dict[str, list[float]] = {}
    for record in sorted(records, key=lambda r: r.get("step", 0)):
        for name, figures in record.items():
            if isinstance(figures, dict) and figures.get("eval_accuracy") is not None:
                evaluations.setdefault(name, []).append(float(figures["eval_accuracy"]))
    return evaluations


def config_adapter_names(config_path: str) -> list[str]:
    """The names of the ``adapters:`` entries of a run configuration file."""
    import yaml

    try:
        document = yaml.safe_load(Path(config_path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SystemExit(f"cannot read the adapters of {config_path}: {exc}") from None
    entries = (document.get("adapters") or []) if isinstance(document, dict) else []
    names = [entry.get("name") for entry in entries if isinstance(entry, dict)]
    if not names or not all(isinstance(n, str) and n for n in names):
        raise SystemExit(f"{config_path} has no adapters: list of named entries")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m areal_core.demo.multi_summary",
        description="Each adapter's held-out accuracy, base -> final, and whether it meets the goal.",
    )
    parser.add_argument("run_dir")
    parser.add_argument("--config", help="the run's configuration: its adapters must all be there")
    args = parser.parse_args(argv)
    run = RunDirectory(args.run_dir)
    evaluations = adapter_evaluations(run.read_metrics())
    expected = config_adapter_names(args.config) if args.config else list(evaluations)
    if not expected:
        print(f"{run.metrics_path} holds no adapter's evaluation: did the run finish?", file=sys.stderr)
        return 1
    print(f"run directory: {run.root}")
    missed = []
    for name in expected:
        figures = evaluations.get(name, [])
        if len(figures) < 2:
            print(f"demo: {name} has {len(figures)} evaluation(s) in {run.metrics_path}, "
                  f"needs a base and a final one", file=sys.stderr)
            missed.append(name)
            continue
        first, last = figures[0], figures[-1]
        print(f"demo: {name} eval_accuracy {first:.3f} -> {last:.3f}")
        if not goal_met(first, last):
            missed.append(name)
    if missed:
        print(f"demo: goal MISSED by {', '.join(missed)} (wanted +{GOAL_GAIN:.2f} and at least "
              f"{GOAL_ACCURACY:.2f} each)", file=sys.stderr)
        return 1
    print(f"demo: goal met by every adapter (+{GOAL_GAIN:.2f} and at least {GOAL_ACCURACY:.2f} each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
