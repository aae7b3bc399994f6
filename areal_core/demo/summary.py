"""The last lines `make demo` prints: where the run is, what it achieved, and whether that meets
the demo's goal (held-out greedy accuracy up by at least 30 points and at least 0.90); the exit
status is 1 when it does not, so `make demo` fails then.

    python -m areal_core.demo.summary RUN_DIR
"""

from __future__ import annotations

import sys

from areal_core.grpo.run_dir import RunDirectory


def summarise(run_dir: str) -> tuple[str, float, float]:
    run = RunDirectory(run_dir)
    evals = [r["eval_accuracy"] for r in run.read_metrics() if r.get("eval_accuracy") is not None]
    if not evals:
        raise SystemExit(f"{run.metrics_path} holds no evaluation: did the run finish?")
    return str(run.root), evals[0], evals[-1]


#: The demo's goal: held-out accuracy gained (absolute) and reached.
GOAL_GAIN = 0.30
GOAL_ACCURACY = 0.90


def goal_met(first: float, last: float) -> bool:
    return last - first >= GOAL_GAIN and last >= GOAL_ACCURACY


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m areal_core.demo.summary RUN_DIR", file=sys.stderr)
        return 2
    root, first, last = summarise(argv[0])
    print(f"run directory: {root}")
    print(f"demo: eval_accuracy {first:.3f} -> {last:.3f}")
    if not goal_met(first, last):
        print(f"demo: goal MISSED (wanted +{GOAL_GAIN:.2f} and at least {GOAL_ACCURACY:.2f})", file=sys.stderr)
        return 1
    print(f"demo: goal met (+{GOAL_GAIN:.2f} and at least {GOAL_ACCURACY:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
