"""``areal train``: start the training ranks with torchrun's rendezvous on this machine.

The same worker runs under a multi-node torchrun or Slurm's srun (see
docs/multi-machine.md); here one node starts ``actor.world_size`` ranks through the c10d rendezvous on
loopback, which is the path multi-node runs take too.

Stopping, whatever the cause: torchrun runs in a session of its own, so a Ctrl-C (or a SIGTERM or
SIGHUP) reaches this process alone, which hands exactly one SIGINT (SIGTERM) to torchrun; torchrun
passes it to the ranks and gives them ``SHUTDOWN_TIMEOUT`` seconds to stop the servers rank 0
launched. torchrun dies with this process (PR_SET_PDEATHSIG). Once torchrun has ended, any server
group rank 0 recorded and that is still running (rank 0 was killed before it could stop it) is
stopped here. A run that did not finish ends with a summary naming its last complete checkpoint.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

from areal_core.grpo.server_processes import RECORD_ENV, stop_recorded_servers
from areal_core.parent_death import die_with_parent

#: Seconds torchrun gives the ranks to stop (and rank 0 to stop its servers) before SIGKILL.
SHUTDOWN_TIMEOUT = 90


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_command(config, config_path: str, overrides: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1",
        "--nproc-per-node", str(config.actor.world_size),
        "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
        "--rdzv-id", uuid.uuid4().hex[:12],
        "--max-restarts", "0",
        "--shutdown-timeout", str(SHUTDOWN_TIMEOUT),
        "-m", "areal_core.grpo.worker",
        str(config_path), *overrides,
    ]


class _Stop(Exception):
    """A signal asked this launcher to stop the run."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stop(signum, frame) -> None:
    raise _Stop(signum)


def launch(config, config_path: str, overrides: list[str], hub_overrides: list[str] = ()) -> int:
    """Run the training ranks; ``hub_overrides`` point them at resolved Hub snapshots (kept out
    of the resume command printed on a stop, which resolves the ids again)."""
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    record = output_dir.absolute() / "logs" / "server-processes.json"
    record.unlink(missing_ok=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # one thread per training rank: servers need cores too
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TORCHELASTIC_ERROR_FILE", str(output_dir.absolute() / "error.json"))
    env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = str(SHUTDOWN_TIMEOUT)
    env[RECORD_ENV] = str(record)
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, _raise_stop) for sig in handled}
    process = None
    stopped_by = None
    try:
        try:
            process = subprocess.Popen(torchrun_command(config, config_path, [*overrides, *hub_overrides]), env=env,
                                       start_new_session=True, preexec_fn=lambda: die_with_parent(signal.SIGTERM))
            code = process.wait()
        except _Stop as stop:
            stopped_by = stop.signum
            for sig in handled:  # one signal to torchrun; what follows waits for it
                signal.signal(sig, signal.SIG_IGN)
            code = _stop_torchrun(process, stop.signum)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    leftovers = stop_recorded_servers(record)
    if leftovers:
        print(f"areal train: stopped rollout server process group(s) {leftovers} that rank 0 could not "
              f"stop itself", file=sys.stderr)
    if stopped_by is not None or code != 0:
        print(_summary(config, config_path, overrides, code, stopped_by), file=sys.stderr)
        return 130 if stopped_by == signal.SIGINT else (code or 1)
    return 0


def _stop_torchrun(process: subprocess.Popen | None, signum: int) -> int:
    if process is None:
        return 128 + signum
    forward = signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM
    try:
        process.send_signal(forward)
        return process.wait(timeout=SHUTDOWN_TIMEOUT + 60)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def _summary(config, config_path: str, overrides: list[str], code: int, stopped_by: int | None) -> str:
    why = (f"interrupted ({signal.Signals(stopped_by).name})" if stopped_by is not None
           else f"the training ranks stopped with exit status {code}; each rank's last line above says why")
    latest = Path(config.output_dir) / "checkpoints" / "latest"
    try:
        name = latest.read_text().strip()
    except OSError:
        name = ""
    if name:
        kept = f"its last complete checkpoint is {latest.parent / name}"
        again = " ".join([*(o for o in overrides if not o.startswith("resume=")), "resume=true"])
        hint = f"; continue with: areal train {config_path} {again}"
    else:
        kept, hint = "it has no checkpoint yet", ""
    return f"areal train: the run did not finish: {why}; {kept}{hint}"
