"""Shared by the benchmark scripts: medians, a Markdown table on stdout, JSON in bench/results/."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def median(values) -> float:
    return float(statistics.median(values))


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def cell(value):
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            # Other work on a shared machine makes every figure noisier: say how busy it was.
            "load_average_1_5_15_min": [round(v, 2) for v in os.getloadavg()]}


def write_result(name: str, data: dict, method: str, table: str) -> Path:
    """Print the method and the table; write ``bench/results/<name>.json``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"name": name, "method": method, "machine": machine(), **data}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    print(f"## {name}\n\nMethod: {method}\n\n{table}\n\n(written to {path.relative_to(RESULTS.parent.parent)})\n")
    return path
