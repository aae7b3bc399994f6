"""Launching a rank program on several processes (gloo on the CPU), and what a rank needs to start.

The parent side, ``run_ranks``, starts ``world_size`` processes of one script with torchrun's
environment variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), one thread each, waits for
all of them and returns what each wrote to ``<out>/rank<N>.json``. The rank side,
``init_rank`` and ``write_rank_result``, is imported by the rank programs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections import deque
from pathlib import Path


class RankLaunchError(RuntimeError):
    """A rank exited with an error or ran past its time; carries the tails of the ranks' logs."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = 30) -> str:
    with open(path, errors="replace") as handle:
        return "".join(deque(handle, maxlen=lines))


def run_ranks(script: Path, args: list[str], out: Path, *, world_size: int = 2,
              timeout: float = 900.0, env: dict[str, str] | None = None) -> list[dict]:
    """Run ``python script --out OUT ARGS`` as ``world_size`` ranks; their results in rank order.

    :raises RankLaunchError: a rank failed or the ranks took longer than ``timeout`` seconds
        (every rank is then killed).
    """
    out.mkdir(parents=True, exist_ok=True)
    port = str(_free_port())
    processes, logs = [], []
    for rank in range(world_size):
        rank_env = dict(os.environ if env is None else env, RANK=str(rank), LOCAL_RANK=str(rank),
                        WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                        OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        log = open(out / f"rank{rank}.log", "w")
        logs.append(log)
        processes.append(subprocess.Popen([sys.executable, str(script), "--out", str(out), *args],
                                          env=rank_env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    try:
        # A rank that fails leaves the others waiting in a collective: stop them at once.
        while True:
            codes = [process.poll() for process in processes]
            if all(code is not None for code in codes) or any(code for code in codes):
                codes = [code if code is not None else "stopped: another rank failed" for code in codes]
                break
            if time.monotonic() > deadline:
                codes = [f"killed after {timeout:g} s"] * world_size
                break
            time.sleep(0.5)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        for log in logs:
            log.close()
    if any(code != 0 for code in codes):
        tails = "\n".join(f"--- rank {rank} ({codes[rank]}), {out}/rank{rank}.log ---\n"
                          + _tail(out / f"rank{rank}.log") for rank in range(world_size))
        raise RankLaunchError(f"{script.name} failed:\n{tails}")
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(world_size)]


# --- the rank side ---------------------------------------------------------------------------


def init_rank() -> int:
    """Join the gloo process group the launcher's environment describes; one torch thread.

    Returns this rank.
    """
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=30))
    return dist.get_rank()


def write_rank_result(out: str | Path, rank: int, data: dict) -> None:
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(data, indent=1, sort_keys=True))


def rss_bytes() -> tuple[int, int]:
    """``(current, peak)`` resident set size of this process, from /proc/self/status."""
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]
