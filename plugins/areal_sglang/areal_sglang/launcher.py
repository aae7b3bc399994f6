"""Launch an SGLang server on loopback and stop it with all its children.

SGLang runs in a Python environment of its own (its torch differs from the trainer's); the
client needs only HTTP. Which interpreter runs the server, in order:

1. the environment variable ``AREAL_SGLANG_PYTHON``;
2. ``.venv-sglang/bin/python`` in the current directory or one above it, or above this package
   (an editable install in the repository, where ``make sglang-venv`` builds it);
3. the current interpreter, when it can import ``sglang``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import attrs

from areal_core.errors import ArealError, ServerUnreachableError

from areal_sglang import cpu_server
from areal_sglang.http_client import HttpClient

PYTHON_ENV_VAR = "AREAL_SGLANG_PYTHON"
SERVER_VENV = ".venv-sglang"


def find_server_python() -> str:
    """The interpreter that runs SGLang (see the module docstring).

    :raises ArealError: when none is found, saying how to provide one.
    """
    configured = os.environ.get(PYTHON_ENV_VAR, "")
    if configured:
        if not os.access(configured, os.X_OK):
            raise ArealError(f"{PYTHON_ENV_VAR}={configured} is not an executable Python")
        return configured
    here, package = Path.cwd().resolve(), Path(__file__).resolve().parent
    for directory in (here, *here.parents, *package.parents):
        candidate = directory / SERVER_VENV / "bin" / "python"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    if importlib.util.find_spec("sglang.launch_server") is not None:
        return sys.executable
    raise ArealError(
        "no Python with SGLang found to launch the server: run `make sglang-venv` in the "
        f"repository (it builds {SERVER_VENV}/), or set {PYTHON_ENV_VAR} to a Python that has "
        "sglang installed, or give running servers in rollout.servers"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def kv_bytes_per_token(model_path: str | os.PathLike, dtype: str) -> int:
    """Bytes of key/value cache one token takes, from the model's ``config.json``."""
    config = json.loads((Path(model_path) / "config.json").read_text())
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    element = 4 if dtype == "float32" else 2
    return 2 * config["num_hidden_layers"] * kv_heads * head_dim * element


#: SGLang 0.5.23 accepts inputs shorter than ``--context-length - 6`` tokens (tp_worker.py: one
#: for the next token, five in reserve; managers/utils.py refuses ``>=``); vLLM accepts
#: ``max_model_len``. The context is raised by this much so that ``rollout.max_model_len`` means
#: the same on both.
SGLANG_RESERVED_TOKENS = 7


def context_length(model_path: str | os.PathLike, max_model_len: int) -> int:
    """``--context-length`` under which inputs of ``max_model_len`` tokens are accepted.

    Capped at the model's ``max_position_embeddings``, which SGLang refuses to exceed.
    """
    config = json.loads((Path(model_path) / "config.json").read_text())
    wanted = max_model_len + SGLANG_RESERVED_TOKENS
    limit = config.get("max_position_embeddings")
    return min(wanted, limit) if limit else wanted


@attrs.frozen
class LaunchSpec:
    """Everything that decides an SGLang server's command line and environment.

    ``max_loaded_loras`` is how many adapters may be resident at once; ``cpu`` selects SGLang's
    CPU engine with the two workarounds of ``areal_sglang.cpu_server``.
    """

    model_path: str
    host: str
    port: int
    dtype: str
    max_lora_rank: int
    target_modules: tuple[str, ...]
    max_loaded_loras: int
    context_length: int
    max_running_requests: int
    max_total_tokens: int
    cpu: bool
    extra_args: tuple[str, ...] = ()
    api_key: str = ""


def server_command(spec: LaunchSpec, python: str) -> list[str]:
    """The ``sglang.launch_server`` command line for ``spec``."""
    command = [
        python, "-m", "sglang.launch_server",
        "--model-path", spec.model_path,
        "--host", spec.host,
        "--port", str(spec.port),
        "--dtype", spec.dtype,
        "--enable-lora",
        "--max-lora-rank", str(spec.max_lora_rank),
        "--lora-target-modules", *spec.target_modules,
        "--max-loaded-loras", str(spec.max_loaded_loras),
        # A batch may mix every resident version; SGLang wants loaded >= per batch.
        "--max-loras-per-batch", str(spec.max_loaded_loras),
        "--context-length", str(spec.context_length),
        "--max-running-requests", str(spec.max_running_requests),
        "--max-total-tokens", str(spec.max_total_tokens),
    ]
    if spec.api_key:
        command += ["--api-key", spec.api_key]
    if spec.cpu:
        # The native torch paths SGLang itself takes on a CPU without Intel AMX.
        command += [
            "--device", "cpu",
            "--disable-cuda-graph",
            "--attention-backend", "torch_native",
            "--sampling-backend", "pytorch",
            "--lora-backend", "torch_native",
            # On the CPU this is a share of the machine's free memory that the weights and the
            # KV pool may take; the pool itself is --max-total-tokens (from kv_cache_bytes). A
            # small share fails start-up whenever other processes allocate while the weights load.
            "--mem-fraction-static", "0.5",
            "--skip-server-warmup",
            # An idle scheduler otherwise polls and takes about a third of a core from the
            # trainer; asleep, it waits on its sockets and wakes at once when a request comes.
            "--sleep-on-idle",
        ]
    return command + list(spec.extra_args)


def server_environment(spec: LaunchSpec, base: dict[str, str] | None = None) -> dict[str, str]:
    """The server process's environment: offline, and in CPU mode the CPU engine and workarounds."""
    env = dict(os.environ if base is None else base)
    env["HF_HUB_OFFLINE"] = "1"
    if spec.cpu:
        env["SGLANG_USE_CPU_ENGINE"] = "1"
        previous = env.get("PYTHONPATH", "")
        env["PYTHONPATH"] = cpu_server.PATH + (os.pathsep + previous if previous else "")
    return env


class ServerProcess:
    """One SGLang server this process launched: its process group, address and log file."""

    def __init__(self, spec: LaunchSpec, log_path: str | os.PathLike, python: str | None = None):
        self.spec = spec
        self.log_path = Path(log_path)
        self.python = python or find_server_python()
        self.address = f"http://{spec.host}:{spec.port}"
        self._process: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self, timeout: float) -> None:
        """Launch the server and return once ``/health`` answers 200.

        :raises ServerUnreachableError: when the server exits or stays silent for ``timeout``
            seconds, with the end of its log.
        """
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                server_command(self.spec, self.python),
                env=server_environment(self.spec),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group, so stop() reaches the children
            )
        client = HttpClient(self.address, timeout=10)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self._process.poll() is not None:
                    raise ServerUnreachableError(
                        f"the SGLang server exited with code {self._process.returncode} while "
                        f"starting; its log {self.log_path} ends with:\n{self.log_tail()}"
                    )
                if client.is_healthy():
                    return
                time.sleep(1.0)
        finally:
            client.close()
        self.stop()
        raise ServerUnreachableError(
            f"the SGLang server at {self.address} did not become healthy within {timeout:.0f} s "
            f"(rollout.startup_timeout); its log {self.log_path} ends with:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, grace: float = 20.0) -> None:
        """Terminate the server's process group, then kill what is left after ``grace`` s."""
        process, self._process = self._process, None
        if process is None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            if _group_gone(process, wait):
                break
        process.wait(timeout=10)


def _group_gone(process: subprocess.Popen, wait: float) -> bool:
    """Wait up to ``wait`` s for the leader to exit and its process group to empty."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        process.poll()
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False
