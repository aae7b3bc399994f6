"""Rank 0: bring a rollout server back after it died or went away, with the newest adapter live.

A call to the server that fails is a server loss only when the server then does not answer
``loaded_adapters()`` either (the plugins retry a refused connection a few times, with backoff,
before they give up). Then:

- a server the run launched (``rollout.servers`` empty) is stopped (whatever of its process
  group is left) and started again, through the plugin's own ``stop()`` and ``start()``;
- a server given by address is probed with doubling delays until it answers again, for at most
  ``rollout.startup_timeout`` seconds;
- the versions the server no longer lists are forgotten (their names stay used), and the newest
  adapter is copied to the next version's directory and loaded under that NEW name: a name is
  never loaded twice, even on a fresh server, and versions only go up.

At most ``rollout.max_restarts`` recoveries per run; past that, or when a server given by
address does not come back in time, ``ServerLostError`` says so and the run stops (its last
checkpoint is untouched).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable

from areal_core.adapter_format import WEIGHTS_FILE, verify_adapter_dir, write_peft_adapter
from areal_core.errors import ServerUnreachableError
from areal_core.grpo.publisher import AdapterPublisher
from areal_core.interfaces import ExportedAdapter


class ServerLostError(ServerUnreachableError):
    """The rollout server died or went away and could not be brought back."""

    checkpoint_on_stop = True  # the trainer is intact: the loop checkpoints before it stops


def copy_adapter_as_version(source: Path, destination: Path, version: int) -> ExportedAdapter:
    """Write the adapter at ``source`` again, as ``version``, at ``destination`` (atomically).

    :raises AdapterError: ``source`` fails the format's checks (it is never copied then).
    """
    from safetensors.torch import load_file

    config = verify_adapter_dir(source)
    tensors = load_file(str(Path(source) / WEIGHTS_FILE))
    return write_peft_adapter(destination, tensors, rank=config["r"], alpha=config["lora_alpha"],
                              version=version, base_model_path=config.get("base_model_name_or_path", ""))


class ServerRecovery:
    """Recoveries of one run's rollout server (rank 0 only; see the module docstring).

    :param publisher: rank 0's publisher (its server, version bookkeeping and event log).
    :param managed: the run launched the server (restart it) rather than connected to it (wait).
    :param max_restarts: recoveries allowed in the whole run.
    :param startup_timeout: how long a server given by address may take to answer again.
    :param adapter_dir: ``version -> directory`` where that version's adapter lives or goes.
    :param on_started: called after a managed server was started again (e.g. to record its
        processes).
    :param on_event: called after each event is recorded (e.g. to write the log out at once:
        a restart can take a minute).
    :param say: where progress lines go (default: stderr).
    :param no_recovery: when set, the reason this run recovers no server; a loss then stops the
        run at once (with a checkpoint), saying so.
    """

    def __init__(self, publisher: AdapterPublisher, *, managed: bool, max_restarts: int,
                 startup_timeout: float, adapter_dir: Callable[[int], Path],
                 on_started: Callable[[], object] | None = None,
                 on_event: Callable[[], object] | None = None,
                 say: Callable[[str], object] | None = None, no_recovery: str = ""):
        self.publisher = publisher
        self.no_recovery = no_recovery
        self.managed = managed
        self.max_restarts = max_restarts
        self.startup_timeout = startup_timeout
        self.adapter_dir = adapter_dir
        self.on_started = on_started
        self.on_event = on_event or (lambda: None)
        self.say = say or say_on_stderr
        self.recoveries = 0

    @property
    def server(self):
        return self.publisher.server

    def server_is_down(self) -> bool:
        """Whether the server fails to list its adapters (after the plugin's own retries)."""
        try:
            self.server.loaded_adapters()
            return False
        except Exception:  # unreachable, or answering with errors: not serving either way
            return True

    def recover(self, error: BaseException, source_version: int, new_version: int) -> int:
        """Bring the server back and load the adapter of ``source_version`` as ``new_version``.

        ``error`` is what the failed call raised. Returns the version now live (``new_version``,
        or later when the server died again during the recovery and was recovered once more).

        :raises ServerLostError: recoveries exhausted, or a server given by address did not
            answer again within ``startup_timeout``.
        """
        while True:
            if self.no_recovery:
                raise ServerLostError(
                    f"the rollout server died or went away ({_first_line(error)}); {self.no_recovery}"
                ) from error
            if self.recoveries >= self.max_restarts:
                raise ServerLostError(
                    f"the rollout server died or went away ({_first_line(error)}) and "
                    f"rollout.max_restarts={self.max_restarts} recoveries are used up; the run stopped "
                    f"(fix the server, or raise rollout.max_restarts)"
                ) from error
            self.recoveries += 1
            started = time.time()
            self.publisher.record("server_lost", error=_first_line(error), managed=self.managed,
                                  recovery=self.recoveries)
            self.on_event()
            action = "restarting it" if self.managed else "waiting for it to answer again"
            self.say(f"areal train: the rollout server was lost ({_first_line(error)}); {action} "
                     f"(recovery {self.recoveries} of at most {self.max_restarts})")
            try:
                self._bring_back(error)
                lost = self.publisher.forget_lost_versions()
                source = Path(self.adapter_dir(source_version))
                adapter = copy_adapter_as_version(source, Path(self.adapter_dir(new_version)), new_version)
                self.publisher.publish(adapter)
            except ServerLostError:
                raise
            except Exception as exc:
                if not self.server_is_down():
                    raise
                error, new_version = exc, new_version + 1  # died again: the next name is fresh too
                continue
            seconds = time.time() - started
            name = self.publisher.versions.name(new_version)
            self.publisher.record("server_recovered", name, version=new_version, source_version=source_version,
                                  lost=lost, restarted=self.managed, seconds=seconds, recovery=self.recoveries)
            self.on_event()
            self.say(f"areal train: the rollout server is back after {seconds:.1f} s; adapter version "
                     f"{source_version} is live again as {name}")
            return new_version

    def _bring_back(self, error: BaseException) -> None:
        if self.managed:
            self.server.stop()
            self.server.start()
            if self.on_started is not None:
                self.on_started()
            return
        started, delay, probes = time.monotonic(), 1.0, 0
        while True:
            probes += 1
            if not self.server_is_down():
                return
            waited = time.monotonic() - started
            if waited >= self.startup_timeout:
                raise ServerLostError(
                    f"the rollout server given by address went away ({_first_line(error)}) and did "
                    f"not answer again within rollout.startup_timeout={self.startup_timeout:g} s "
                    f"({probes} probes with doubling delays); the run stopped (bring the server "
                    f"back, or fix rollout.servers)"
                ) from error
            time.sleep(min(delay, max(self.startup_timeout - waited, 0.0)))
            delay *= 2


def say_on_stderr(line: str) -> None:
    """A line on stderr that does not run into a progress bar drawn there."""
    try:
        from tqdm import tqdm

        tqdm.write(line, file=sys.stderr)
    except ImportError:
        print(line, file=sys.stderr, flush=True)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"

