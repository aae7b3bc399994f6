"""Grading processes with a per-call deadline: a grader that hangs or crashes costs one answer,
never the run.

A ``GraderPool`` runs a grading function (named by an import path ``package.module:function``)
in separate processes: fresh interpreters (``python -m areal_core.tasks.grader_pool``), neither
forked (a rank holds threads and a process group a forked child must not inherit) nor spawned by
``multiprocessing`` (which re-runs the caller's main script, and a script without a
``__main__`` guard then starts grading processes of its own). Each process talks over a socket
pair with ``multiprocessing.connection``'s framing. ``call(args, deadline)`` hands ``args`` to an
idle process and waits at most ``deadline`` seconds for its answer. A process that overruns is
killed and a fresh one started in its place; one that dies mid-call is replaced too. Any thread
may call: each call takes an idle process for itself, waiting for one when every process is busy.
The processes are started by one long-lived thread (``_Starter``), never by the calling thread.

Outcomes are ``("ok", value)``, ``("timeout", None)`` and ``("error", "what it raised")``. A
grading function that cannot even be imported is a configuration error: ``call`` raises it.
"""

from __future__ import annotations

import atexit
import queue
import signal
import socket
import subprocess
import sys
import threading
import weakref
from multiprocessing.connection import Connection

from areal_core.errors import ArealError

#: Seconds a new process has to import its grading function (math-verify pulls in sympy).
STARTUP_TIMEOUT = 120.0


class GraderStartError(ArealError):
    """A grading process that could not start its grading function."""


def _serve(connection: Connection) -> None:
    """The grading process: take the caller's import path and grader, say whether it imports,
    then answer calls until told to stop or the caller is gone."""
    from areal_core.parent_death import die_with_parent

    die_with_parent()  # a rank leaves by os._exit (no atexit): a hung grading must not outlive it
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the caller's to handle, not a grading failure
    try:
        sys_path, grader_path = connection.recv()
        sys.path[:] = sys_path  # the caller's: a grader importable there is importable here
        from areal_core.tasks import import_function

        grader = import_function(grader_path, "grader")
    except BaseException as exc:
        connection.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    connection.send(("ready", None))
    while True:
        try:
            args = connection.recv()
        except EOFError:  # the caller is gone
            return
        if args is None:
            return
        try:
            outcome = ("ok", grader(*args))
        except BaseException as exc:  # the grader's failure is one answer's, reported as such
            outcome = ("error", f"{type(exc).__name__}: {exc}")
        connection.send(outcome)


class _Process:
    def __init__(self, grader_path: str):
        ours, theirs = socket.socketpair()
        self.process = subprocess.Popen([sys.executable, "-m", "areal_core.tasks.grader_pool", str(theirs.fileno())],
                                        pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        theirs.close()
        self.connection = Connection(ours.detach())
        self.connection.send((list(sys.path), grader_path))
        self.ready = False

    def wait_ready(self, grader_path: str) -> None:
        if self.ready:
            return
        if not self.connection.poll(STARTUP_TIMEOUT):
            self.kill()
            raise GraderStartError(f"a grading process for {grader_path!r} did not start within "
                                   f"{STARTUP_TIMEOUT:.0f} s; check that its module imports quickly")
        try:
            status, detail = self.connection.recv()
        except (EOFError, OSError):
            status, detail = "failed", f"the process exited with code {self.process.poll()}"
        if status != "ready":
            self.kill()
            raise GraderStartError(f"cannot start the grader {grader_path!r}: {detail}")
        self.ready = True

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        self.connection.close()


class _Starter:
    """Starts the grading processes from one thread that lives as long as the caller's process.

    A grading process asks for SIGKILL when its parent dies (PR_SET_PDEATHSIG), and Linux sends
    it when the *thread* that started the process ends: one started by a caller's thread that
    then finishes (a rollout producer replaced after a server restart, one of several threads
    grading at once) would be killed under a later call, which then failed as "died"."""

    def __init__(self):
        self._requests: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self, grader_path: str) -> _Process:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="grader-starter", daemon=True)
                self._thread.start()
        answer: queue.Queue = queue.Queue(maxsize=1)
        self._requests.put((grader_path, answer))
        started, value = answer.get()
        if not started:
            raise value
        return value

    def _serve(self) -> None:
        while True:
            grader_path, answer = self._requests.get()
            try:
                answer.put((True, _Process(grader_path)))
            except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
                answer.put((False, exc))


_STARTER = _Starter()


class GraderPool:
    """``processes`` grading processes running the function at ``grader_path``, started at the
    first call."""

    def __init__(self, grader_path: str, processes: int = 1):
        self.grader_path = grader_path
        self.processes = processes
        self._idle: queue.Queue[_Process] = queue.Queue()
        self._start_lock = threading.Lock()
        self._started = False
        self.replaced = 0  # processes killed (overran) or found dead, and started anew
        self._everyone: weakref.WeakSet[_Process] = weakref.WeakSet()
        atexit.register(self._kill_all)  # a process busy with a hung call would outlive the caller

    def _new_process(self) -> _Process:
        process = _STARTER.start(self.grader_path)
        self._everyone.add(process)
        return process

    def _start(self) -> None:
        with self._start_lock:
            if not self._started:
                for _ in range(self.processes):
                    self._idle.put(self._new_process())
                self._started = True

    def _replace(self, process: _Process) -> None:
        process.kill()
        self.replaced += 1
        self._idle.put(self._new_process())  # it starts while the caller goes on

    def call(self, args: tuple, deadline: float) -> tuple[str, object]:
        """The grader's answer to ``args``, as ``(outcome, value)`` (see the module's docstring)."""
        self._start()
        process = self._idle.get()
        try:
            process.wait_ready(self.grader_path)
        except GraderStartError:
            self._idle.put(self._new_process())  # the next call tries again
            raise
        try:
            process.connection.send(args)
            answered = process.connection.poll(deadline)
            outcome = process.connection.recv() if answered else ("timeout", None)
        except (EOFError, OSError) as exc:
            self._replace(process)
            return "error", f"the grading process died ({type(exc).__name__}); it was replaced"
        if outcome[0] == "timeout":
            self._replace(process)
        else:
            self._idle.put(process)
        return outcome

    def close(self) -> None:
        """Stop every idle process (those busy are killed when the interpreter exits)."""
        while True:
            try:
                process = self._idle.get_nowait()
            except queue.Empty:
                return
            process.kill()

    def _kill_all(self) -> None:
        for process in list(self._everyone):
            try:
                process.kill()
            except (OSError, subprocess.TimeoutExpired):
                pass


if __name__ == "__main__":
    _serve(Connection(int(sys.argv[1])))
