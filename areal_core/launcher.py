"""``areal train``: start the training ranks with torchrun's rendezvous on this machine.

The same worker runs under a multi-node torchrun or Slurm's srun (see README, "Several
machines"); here one node starts ``actor.world_size`` ranks through the c10d rendezvous on
loopback, which is the path multi-node runs take too.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid


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
        "-m", "areal_core.grpo.worker",
        str(config_path), *overrides,
    ]


def launch(config, config_path: str, overrides: list[str]) -> int:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # one thread per training rank: servers need cores too
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TORCHELASTIC_ERROR_FILE", os.path.join(os.path.abspath(config.output_dir), "error.json"))
    os.makedirs(config.output_dir, exist_ok=True)
    process = subprocess.Popen(torchrun_command(config, config_path, overrides), env=env)
    try:
        return process.wait()
    except KeyboardInterrupt:
        # torchrun forwards the signal to the ranks; rank 0 stops the servers it launched.
        process.send_signal(signal.SIGINT)
        try:
            return process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()
