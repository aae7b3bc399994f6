"""A Ctrl-C that the loop turns into a checkpoint and a clean stop.

While the loop runs its steps (``accepting``), the worker's SIGINT handler only records the
request; rank 0 sees it while it waits for the next batch (or at the next step boundary) and tells
every rank in that step's batch hand-off, so all of them write the checkpoint of the last completed
step together and stop. Before the steps start (server start-up, model loading) and after a first
request, SIGINT raises KeyboardInterrupt at once, as usual.
"""

from __future__ import annotations


class StopRequest:
    def __init__(self):
        self.accepting = False
        self.requested = False

    def request(self) -> bool:
        """Record a request; False when the loop cannot take one (raise at once instead)."""
        if not self.accepting or self.requested:
            return False
        self.requested = True
        return True


#: The process's one request (a signal handler and the loop share it).
STOP = StopRequest()
