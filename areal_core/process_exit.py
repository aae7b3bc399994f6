"""Leave a training process without the interpreter's teardown.

After ``destroy_process_group`` gloo's worker threads and the work they hold can still be alive
(the backend is freed only when its last reference goes, which may be never). If the interpreter
then finalizes, freeing a tensor held there takes the GIL from a C++ thread of a dying
interpreter, and the process aborts ("terminate called without an active exception", SIGABRT)
after its work is done: a run that succeeded would be reported as failed. Likewise a broken
process group can hang the teardown. So a rank whose results are written leaves at once.
"""

from __future__ import annotations

import logging
import os
import sys


def exit_now(code: int) -> None:
    """Flush what the process printed and logged, then end it with ``code`` (never returns).

    Only for processes that have closed or fsynced every file they wrote: nothing else is
    flushed, and no ``atexit`` handler runs.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or a broken pipe: nothing more can be said
            pass
    os._exit(code)
