"""Rank 0's side of the rollout servers: versioned adapters in, tagged samples out.

Every adapter version is loaded under a new name ``<lora_name>-v<N>`` through the
``areal_load_rollout_adapter`` hook (so a third-party plugin can wrap the step), confirmed by the
server before any rollout uses it, and unloaded once it falls outside the staleness window and no
request in flight uses it. Before an adapter reaches a server it passes
``areal_core.grpo.adapter_admission`` (safetensors only, manifest sizes and checksums, config
agreeing with the export, shapes fitting the base model): a changed or truncated export is refused.
"""

from __future__ import annotations

import threading
import time
from typing import Sequence

from areal_core.grpo.adapter_admission import admit_exported_adapter, base_linear_shapes
from areal_core.interfaces import ExportedAdapter, RolloutServer, Sample, SamplingParams
from areal_core.registry import Registry
from areal_core.versions import AdapterVersions


class AdapterPublisher:
    def __init__(self, registry: Registry, backend: str, server: RolloutServer, lora_name: str, window: int,
                 base_model_path: str | None = None):
        """``base_model_path``: the base model's directory, to check adapter shapes against
        (None: not checked)."""
        self.registry = registry
        self.backend = backend
        self.server = server
        self.versions = AdapterVersions(lora_name, window)
        self.base_model_path = base_model_path
        self._base_shapes: dict | None = None
        self._log: list[dict] = []  # every load, unload and generate call, in order
        self._log_lock = threading.Lock()

    def record(self, event: str, name: str = "", **details) -> None:
        """Append an event to the log that ``drain_log`` hands out."""
        with self._log_lock:
            self._log.append({"event": event, "name": name, "time": time.time(), **details})

    _record = record

    def drain_log(self) -> list[dict]:
        """The events recorded since the last call (the loop appends them to events.jsonl)."""
        with self._log_lock:
            events, self._log = self._log, []
        return events

    def adopt_server_state(self) -> None:
        """Names a server given by address already holds are never loaded again."""
        self.versions.adopt_existing(self.server.loaded_adapters())

    def publish(self, adapter: ExportedAdapter) -> tuple[str, float]:
        """Load ``adapter`` as its version; unload what went stale. Returns (name, seconds).

        :raises AdapterError: the directory fails admission; no server was asked anything.
        """
        start = time.perf_counter()
        if self._base_shapes is None and self.base_model_path:
            self._base_shapes = base_linear_shapes(self.base_model_path)
        admit_exported_adapter(adapter, self._base_shapes)
        name = self.versions.reserve(adapter.version)
        self.registry.call("areal_load_rollout_adapter", self.backend, server=self.server,
                           adapter=adapter, lora_name=name)
        self.versions.confirm(adapter.version)
        self._record("load", name, path=adapter.path, version=adapter.version)
        self.unload_stale()
        return name, time.perf_counter() - start

    def forget_lost_versions(self) -> list[str]:
        """After a server came back (restarted, or reachable again): forget the versions it no
        longer lists; their names stay used. Returns the names forgotten."""
        listed = set(self.server.loaded_adapters())
        self.versions.adopt_existing(listed)
        lost = [name for name in self.versions.loaded().values() if name not in listed]
        for name in lost:
            self.versions.forget(name)
        return lost

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
