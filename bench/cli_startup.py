"""Start-up of the command line: `areal plugins` and `areal matrix` wall time, and no torch import.

Method: each command runs as a fresh process (`python -m areal_core.cli ...`) 1 time as warm-up
then REPS times; the median wall time is reported, next to `python -c pass` measured the same way
(the interpreter's own start-up). A separate process imports areal_core and runs both commands,
then reports whether torch (or vllm, transformers, peft) was imported.
"""

from __future__ import annotations

import subprocess
import sys
import time

from report import markdown_table, median, write_result

REPS = 7


def wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def timed(cmd: list[str]) -> float:
    wall(cmd)
    return median([wall(cmd) for _ in range(REPS)])


def heavy_modules_after_commands() -> list[str]:
    code = ("import sys, io, contextlib\nfrom areal_core.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n main(['plugins']); main(['matrix'])\n"
            "print(','.join(m for m in ('torch','vllm','transformers','peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return [m for m in out.strip().split(",") if m]


def main() -> None:
    python = [sys.executable]
    baseline = timed(python + ["-c", "pass"])
    plugins = timed(python + ["-m", "areal_core.cli", "plugins"])
    matrix = timed(python + ["-m", "areal_core.cli", "matrix"])
    heavy = heavy_modules_after_commands()
    rows = [["python -c pass", baseline], ["areal plugins", plugins], ["areal matrix", matrix]]
    table = markdown_table(["command", "median seconds"], rows)
    table += f"\n\nheavy modules imported by the commands: {', '.join(heavy) or 'none'} (goal: none, < 0.3 s)"
    write_result("cli_startup", {
        "cli_matrix_seconds": matrix, "cli_plugins_seconds": plugins, "python_startup_seconds": baseline,
        "heavy_modules_imported": heavy, "repetitions": REPS,
    }, __doc__.split("Method: ", 1)[1].strip().replace("\n", " ").replace("REPS", str(REPS)), table)


if __name__ == "__main__":
    main()
