"""Rank 0 starts the rollout servers in a thread while every rank loads, adapts and shards the
base model: a server's start (tens of seconds: its own imports, weights, warm-up) and the
ranks' model loading overlap instead of following each other."""

from __future__ import annotations

import threading
from typing import Callable


class BackgroundServerStart:
    def __init__(self, server, on_launched: Callable[[], object]):
        """Starts ``server.start()`` now; ``on_launched`` runs after it, even when it fails (it
        records the launched processes, so that none outlives the run)."""
        self.server = server
        self.on_launched = on_launched
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="rollout-server-start", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.server.start()
        except BaseException as exc:  # re-raised in the main thread by wait()
            self.error = exc
        finally:
            self.on_launched()

    def wait(self) -> None:
        """Until the servers answer; raises what their start raised."""
        self.thread.join()
        if self.error is not None:
            error, self.error = self.error, None
            raise error
