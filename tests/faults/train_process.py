"""Drive one real `areal train` run from a test: start it, watch it, inject faults, find its processes.

Every process of a run (the launcher, torchrun, the ranks, the servers rank 0 launches) inherits
a marker in its environment, so a test finds them in /proc, also after they were reparented, and
can say that none is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "examples" / "arithmetic_grpo_lora.yaml"
MARKER_ENV = "AREAL_FAULT_TEST_RUN"


def environ_of(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def cmdline_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def is_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the TCP sockets listening on ``port`` (from /proc/net/tcp{,6})."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, local_port = fields[1].split(":")
            if int(local_port, 16) == port and fields[3] == "0A":  # 0A: LISTEN
                found.add(address if width == 32 else ".".join(str(b) for b in bytes.fromhex(address)[::-1]))
    return found


class TrainRun:
    """One `areal train CONFIG overrides...` in a session of its own (as a terminal would run it).

    :param out: the run directory (``output_dir``).
    :param overrides: ``key=value`` overrides after ``actor.path`` and ``output_dir``.
    :param env: extra environment variables for the run.
    """

    def __init__(self, model: Path, out: Path, overrides: list[str], env: dict[str, str] | None = None):
        self.out = Path(out)
        self.marker = uuid.uuid4().hex
        self.command = [sys.executable, "-m", "areal_core.cli", "train", str(DEMO_CONFIG),
                        f"actor.path={model}", f"output_dir={out}", *overrides]
        self.env = {**os.environ, **(env or {}), MARKER_ENV: self.marker}
        self.process: subprocess.Popen | None = None
        self.log_path = self.out.parent / f"{self.out.name}-{self.marker[:8]}.log"
        self.started_at = 0.0

    def start(self) -> "TrainRun":
        self.out.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "w")
        self.process = subprocess.Popen(self.command, cwd=REPO, env=self.env, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.started_at = time.monotonic()
        self.started_wall = time.time()
        return self

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait(self, timeout: float) -> int:
        """The launcher's exit status; on timeout, kill everything of the run and fail."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_everything()
            raise AssertionError(f"areal train did not end within {timeout:.0f} s:\n{self.output()[-4000:]}")

    def interrupt(self) -> None:
        """Ctrl-C as a terminal sends it: SIGINT to the foreground process group."""
        os.killpg(self.process.pid, signal.SIGINT)

    # --- what the run wrote --------------------------------------------------------------------

    def metrics(self) -> list[dict]:
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def events(self) -> list[dict]:
        path = self.out / "events.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def latest_checkpoint(self) -> str:
        path = self.out / "checkpoints" / "latest"
        return path.read_text().strip() if path.exists() else ""

    def wait_for(self, condition, what: str, timeout: float) -> None:
        """Poll ``condition()`` until true; fail if the run ends first or the time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            if self.process.poll() is not None:
                raise AssertionError(f"areal train ended (status {self.process.returncode}) before "
                                     f"{what}:\n{self.output()[-4000:]}")
            time.sleep(0.5)
        self.kill_everything()
        raise AssertionError(f"no {what} within {timeout:.0f} s:\n{self.output()[-4000:]}")

    def steps_done(self) -> list[int]:
        """Steps this launch finished (metrics.jsonl may still hold records of an earlier one)."""
        return [r["step"] for r in self.metrics() if r.get("finished_at", 0) > self.started_wall]

    def wait_for_step(self, step: int, timeout: float) -> None:
        self.wait_for(lambda: any(s >= step for s in self.steps_done()), f"step {step} done by this launch",
                      timeout)

    # --- its processes -----------------------------------------------------------------------------

    def processes(self) -> list[int]:
        """Live processes of this run (the launcher included)."""
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                if environ_of(int(entry.name)).get(MARKER_ENV) == self.marker and is_alive(int(entry.name)):
                    found.append(int(entry.name))
        return sorted(found)

    def rank_pid(self, rank: int) -> int:
        for pid in self.processes():
            if "areal_core.grpo.worker" in cmdline_of(pid) and environ_of(pid).get("RANK") == str(rank):
                return pid
        raise AssertionError(f"no process of rank {rank} in this run")

    def server_pids(self, fragment: str) -> list[int]:
        """Processes whose command line holds ``fragment`` (e.g. the vLLM API server's module)."""
        return [pid for pid in self.processes() if fragment in cmdline_of(pid)]

    def wait_until_no_process_left(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.processes():
                return
            time.sleep(0.5)
        left = {pid: cmdline_of(pid)[:120] for pid in self.processes()}
        self.kill_everything()
        raise AssertionError(f"processes of the run still alive {timeout:.0f} s after it ended: {left}")

    def kill_everything(self) -> None:
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
