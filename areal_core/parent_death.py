"""A child process that must not outlive its parent: Linux's PR_SET_PDEATHSIG.

torchrun starts each rank in a session of its own, the launcher starts torchrun in another, and
a rank starts grading processes: when a parent is SIGKILLed, its children would run on,
orphaned. Each asks the kernel for a signal when its parent dies. The kernel sends it when the
parent *thread* that started the child ends, so start such children from a thread that lives as
long as the process (``grader_pool._Starter``). Elsewhere than Linux this does nothing.
"""

from __future__ import annotations

import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(signum: int = signal.SIGKILL) -> None:
    """Have the kernel send ``signum`` to this process when its parent dies; exit at once if the
    parent already died before the request took effect (callable from a ``preexec_fn``)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signum)
    except OSError:
        return
    if os.getppid() != parent:
        os._exit(1)
