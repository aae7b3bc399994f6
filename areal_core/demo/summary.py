"""The last two lines `make demo` prints: where the run is, and what it achieved.

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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m areal_core.demo.summary RUN_DIR", file=sys.stderr)
        return 2
    root, first, last = summarise(argv[0])
    print(f"run directory: {root}")
    print(f"demo: eval_accuracy {first:.2f} -> {last:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
