"""Rank 0's side of the rollout servers: versioned adapters in, tagged samples out.

Every adapter version is loaded under a new name ``<lora_name>-v<N>`` through the
``areal_load_rollout_adapter`` hook (so a third-party plugin can wrap the step), confirmed by the
server before any rollout uses it, and unloaded once it falls outside the staleness window and no
request in flight uses it.
"""

from __future__ import annotations

import threading
import time
from typing import Sequence

from areal_core.adapter_format import verify_adapter_dir
from areal_core.interfaces import ExportedAdapter, RolloutServer, Sample, SamplingParams
from areal_core.registry import Registry
from areal_core.versions import AdapterVersions


class AdapterPublisher:
    def __init__(self, registry: Registry, backend: str, server: RolloutServer, lora_name: str, window: int):
        self.registry = registry
        self.backend = backend
        self.server = server
        self.versions = AdapterVersions(lora_name, window)
        self._log: list[dict] = []  # every load, unload and generate call, in order
        self._log_lock = threading.Lock()

    def _record(self, event: str, name: str, **details) -> None:
        with self._log_lock:
            self._log.append({"event": event, "name": name, "time": time.time(), **details})

    def drain_log(self) -> list[dict]:
        """The events recorded since the last call (the loop appends them to events.jsonl)."""
        with self._log_lock:
            events, self._log = self._log, []
        return events

    def adopt_server_state(self) -> None:
        """Names a server given by address already holds are never loaded again."""
        self.versions.adopt_existing(self.server.loaded_adapters())

    def publish(self, adapter: ExportedAdapter) -> tuple[str, float]:
        """Load ``adapter`` as its version; unload what went stale. Returns (name, seconds)."""
        start = time.perf_counter()
        verify_adapter_dir(adapter.path)
        name = self.versions.reserve(adapter.version)
        self.registry.call("areal_load_rollout_adapter", self.backend, server=self.server,
                           adapter=adapter, lora_name=name)
        self.versions.confirm(adapter.version)
        self._record("load", name, path=adapter.path, version=adapter.version)
        self.unload_stale()
        return name, time.perf_counter() - start

    def unload_stale(self) -> list[str]:
        gone = []
        for name in self.versions.stale():
            self.server.unload_adapter(name)
            self.versions.forget(name)
            self._record("unload", name)
            gone.append(name)
        return gone

    def generate(self, prompts: Sequence[Sequence[int]], version: int, n: int,
                 sampling: SamplingParams) -> list[list[Sample]]:
        """Samples from exactly ``version``; the version is held live while requests run."""
        name = self.versions.acquire(version)
        self._record("generate", name, version=version, prompts=len(prompts), n=n)
        try:
            return self.server.generate(prompts, lora_name=name, version=version, n=n, sampling=sampling)
        finally:
            self.versions.release(version)

    def prompt_logprobs(self, token_ids: Sequence[int], version: int) -> list[float]:
        name = self.versions.acquire(version)
        try:
            return self.server.prompt_logprobs(token_ids, lora_name=name)
        finally:
            self.versions.release(version)
