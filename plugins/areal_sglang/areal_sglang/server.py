"""The SGLang rollout server client: launch or connect, load adapter versions, generate.

Version safety, the point of this file: SGLang serves a request without ``lora_path`` with the
base model, and silently reloads an unloaded adapter when a request names it. So every request
names a version, and only a version this client has loaded, confirmed and not retired: the
bookkeeping (``areal_core.versions.AdapterVersions``) and the check happen under one lock, and a
version is retired (forgotten) before it is unloaded.

Several adapters (``adapters:``): one server holds every adapter's live versions at once, each
adapter numbered on its own (``add-v0``, ``sub-v0``, ``add-v1``, ...) in an ``AdapterVersions`` of
its own whose window is that adapter's ``max_head_offpolicyness``; a name is matched to its
adapter by the run's adapter names (``<adapter>-v<N>``), and a name of no adapter of the run is
refused before SGLang is asked. Calls naming different adapters may run at once from several
threads: SGLang batches their requests together, each request with its own adapter's slot.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import logging
import os
import re
import threading
from pathlib import Path
from typing import Sequence

from areal_core.adapter_format import ChecksumCheck, verify_adapter_dir
from areal_core.adapters import run_adapters
from areal_core.config import RunConfig
from areal_core.errors import AdapterError, AdapterLoadError, ArealError, ConfigInvalid
from areal_core.interfaces import ExportedAdapter, Sample, SamplingParams
from areal_core.versions import AdapterVersions, live_versions_needed

from areal_sglang import payloads
from areal_sglang.http_client import HttpClient
from areal_sglang.launcher import (
    LaunchSpec,
    ServerProcess,
    context_length,
    free_port,
    kv_bytes_per_token,
)
from areal_sglang.target_modules import sglang_target_modules, union_target_modules

logger = logging.getLogger(__name__)


def wants_cpu(config: RunConfig) -> bool:
    """Whether a launched server runs SGLang's CPU engine: ``actor.device``, or no NVIDIA GPU."""
    if config.actor.device in ("cpu", "cuda"):
        return config.actor.device == "cpu"
    return not os.path.exists("/dev/nvidiactl")


def launch_spec(config: RunConfig, port: int) -> LaunchSpec:
    """The server a run of ``config`` needs, on ``rollout.host``:``port``.

    It holds every adapter of the run (``areal_core.adapters.run_adapters``): the largest rank,
    the union of their target modules, and resident room for the sum of the versions each keeps
    live (``rollout.max_loras`` when larger).
    """
    rollout, actor = config.rollout, config.actor
    adapters = run_adapters(config)
    live = sum(live_versions_needed(adapter.max_head_offpolicyness) for adapter in adapters)
    max_loaded = max(rollout.max_loras, live)
    kv_tokens = rollout.kv_cache_bytes // kv_bytes_per_token(actor.path, rollout.dtype)
    context = context_length(actor.path, rollout.max_model_len)
    return LaunchSpec(
        model_path=str(Path(actor.path).absolute()),
        host=rollout.host,
        port=port,
        dtype=rollout.dtype,
        max_lora_rank=max(adapter.lora_rank for adapter in adapters),
        target_modules=tuple(sglang_target_modules(
            union_target_modules([adapter.target_modules for adapter in adapters]))),
        max_loaded_loras=max_loaded,
        context_length=context,
        max_running_requests=rollout.max_num_seqs,
        # At least one full context, so that any single request fits.
        max_total_tokens=max(kv_tokens, context),
        cpu=wants_cpu(config),
        extra_args=tuple(rollout.extra_args),
        api_key=os.environ.get(rollout.api_key_env, "") if rollout.api_key_env else "",
    )


class SGLangRolloutServer:
    """``areal_core.interfaces.RolloutServer`` over SGLang's native HTTP API.

    :param config: the run's configuration (``rollout``, ``actor``, ``gconfig``, ``adapters``,
        ``output_dir``).
    :param connect_attempts: health-check tries per given address before ServerUnreachableError
        (the delay between tries doubles from 0.5 s up to 8 s).
    """

    name = "sglang"

    def __init__(self, config: RunConfig, *, connect_attempts: int = 6):
        self.config = config
        self.connect_attempts = connect_attempts
        #: each adapter's live versions, by adapter name, in the run's order
        self.adapter_versions: dict[str, AdapterVersions] = {
            adapter.name: AdapterVersions(adapter.name, window=adapter.max_head_offpolicyness)
            for adapter in run_adapters(config)
        }
        #: the first adapter's versions (for a run without ``adapters:`` the only one's)
        self.versions = next(iter(self.adapter_versions.values()))
        self._version_names = {
            re.compile(re.escape(name) + r"-v[0-9]+"): versions
            for name, versions in self.adapter_versions.items()
        }
        self._load_lock = threading.Lock()
        self.processes: list[ServerProcess] = []
        self.clients: list[HttpClient] = []
        self._lock = threading.Lock()
        self._next_client = 0
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Connect to ``rollout.servers``, or launch one server when the list is empty.

        :raises ConfigInvalid: the configuration cannot work with SGLang (checked first).
        :raises ServerUnreachableError: a given address did not answer within the bounded
            retries, or a launched server died or stayed silent (with its log's tail).
        """
        if self.clients:
            return
        from areal_sglang.config_checks import validate

        errors = validate(self.config)
        if errors:
            raise ConfigInvalid(errors)
        rollout = self.config.rollout
        api_key = os.environ.get(rollout.api_key_env, "") if rollout.api_key_env else ""
        if rollout.servers:
            for address in rollout.servers:
                client = self._client(address, api_key)
                client.wait_healthy(attempts=self.connect_attempts)
                self.clients.append(client)
            # A given server may hold versions of an earlier run: never load those names again.
            listed = self.loaded_adapters()
            for versions in self.adapter_versions.values():
                versions.adopt_existing(listed)
        else:
            spec = launch_spec(self.config, free_port(rollout.host))
            log = Path(self.config.output_dir) / "logs" / f"sglang-{spec.port}.log"
            process = ServerProcess(spec, log)
            self.processes.append(process)
            # A server outlives a crashed owner otherwise (it runs in its own session).
            atexit.register(process.stop)
            process.start(timeout=rollout.startup_timeout)
            self.clients.append(self._client(process.address, api_key))
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=rollout.max_concurrent_requests, thread_name_prefix="sglang-request"
        )

    def _client(self, address: str, api_key: str) -> HttpClient:
        return HttpClient(
            address,
            timeout=self.config.rollout.request_timeout,
            api_key=api_key,
            pool_size=self.config.rollout.max_concurrent_requests,
        )

    def stop(self) -> None:
        """Stop what this object launched (process groups included); idempotent."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        for client in self.clients:
            client.close()
        self.clients = []
        for process in self.processes:
            process.stop()
        self.processes = []

    def _require_started(self) -> None:
        if not self.clients:
            raise ArealError("the SGLang rollout server is not started: call start() first")

    # --- adapters -----------------------------------------------------------------------------

    def load_adapter(self, adapter: ExportedAdapter, lora_name: str) -> None:
        """Load ``adapter`` as ``lora_name`` (``<adapter>-v<adapter.version>``) everywhere.

        ``<adapter>`` is ``gconfig.lora_name`` for a run without ``adapters:``, else one of the
        entries' names. Checks the directory first, confirms every server lists the name, then
        unloads versions older than their adapter's window that no request uses.

        :raises AdapterLoadError: with the reason (the server's own message when it refused, or
            the run's adapters when the name is of none of them); the versions loaded before
            keep serving.
        """
        self._require_started()
        try:
            versions = self._versions_of(lora_name, version=adapter.version, loading=True)
        except ArealError as exc:
            raise AdapterLoadError(str(exc)) from exc
        expected = versions.name(adapter.version)
        if lora_name != expected:
            names = "<adapter>-v<version>" if self.config.adapters else "<gconfig.lora_name>-v<version>"
            raise AdapterLoadError(
                f"adapter version {adapter.version} must be loaded as {expected!r}, not "
                f"{lora_name!r} (names are {names})"
            )
        try:
            verify_adapter_dir(adapter.path, checksums=False)
        except AdapterError as exc:
            raise AdapterLoadError(f"adapter {lora_name} was not sent to SGLang: {exc}") from exc
        try:
            versions.reserve(adapter.version)
        except ArealError as exc:
            raise AdapterLoadError(str(exc)) from exc
        path = str(Path(adapter.path).absolute())
        checksums = ChecksumCheck(path)  # hashed while the servers read the files
        try:
            with self._load_lock:  # one adapter's load at a time, whichever thread asks
                self._load_everywhere(lora_name, path, checksums)
        finally:
            checksums.join()
        versions.confirm(adapter.version)
        self._unload_stale()

    def _load_everywhere(self, lora_name: str, path: str, checksums: ChecksumCheck) -> None:
        """Load ``lora_name`` from ``path`` on every server, or on none (AdapterLoadError)."""
        loaded_on: list[HttpClient] = []
        for client in self.clients:
            response = client.post_json("/load_lora_adapter", payloads.load_payload(lora_name, path))
            refusal = _load_refusal(response)
            if not refusal:
                loaded_on.append(client)
                listed = self._listed(client)
                if lora_name not in listed:
                    refusal = f"it answered the load but does not list {lora_name} (it lists {sorted(listed)})"
            if refusal:
                self._unload_from(lora_name, loaded_on)  # all servers or none
                raise AdapterLoadError(checksums.explain(
                    f"SGLang server {client.base_url} refused adapter {lora_name} from {path}: "
                    f"{refusal}. The versions loaded before keep serving"
                ))
        try:
            checksums.result()
        except AdapterError as exc:
            self._unload_from(lora_name, loaded_on)
            raise AdapterLoadError(f"adapter {lora_name}: {exc}; it was unloaded before any request "
                                   f"used it. The versions loaded before keep serving.") from exc

    def unload_adapter(self, lora_name: str) -> None:
        """Retire ``lora_name`` (no request will name it again) and unload it from every server.

        :raises ArealError: ``lora_name`` is a version of no adapter of the run.
        """
        self._require_started()
        versions = self._versions_of(lora_name)
        with self._lock:
            versions.forget(lora_name)
        self._unload_from(lora_name, self.clients)

    def _versions_of(self, lora_name: str, *, version: int | None = None,
                     loading: bool = False) -> AdapterVersions:
        """The bookkeeping of the adapter ``lora_name`` is a version of (``<adapter>-v<N>``).

        A run without ``adapters:`` has one adapter, and every name goes to it (its own checks
        refuse a wrong one, with the messages they always gave).

        :raises ArealError: ``lora_name`` is a version of none of the run's adapters; the
            message lists them, and what version ``version`` is (``loading``: would be) named.
        """
        for pattern, versions in self._version_names.items():
            if pattern.fullmatch(lora_name):
                return versions
        if not self.config.adapters:
            return self.versions
        adapters = ", ".join(self.adapter_versions)
        if loading and version is not None:
            hint = "; ".join(f"version {version} of {name} must be loaded as {versions.name(version)!r}"
                             for name, versions in self.adapter_versions.items())
        else:
            hint = ("name a live version of one of them, or list the adapter under adapters: in "
                    "the run's configuration")
        raise ArealError(
            f"refusing adapter version name {lora_name!r}: it is <adapter>-v<N> for none of the "
            f"run's adapters ({adapters}), so this client keeps no versions under it and will "
            f"not send it to SGLang; {hint}"
        )

    def _unload_from(self, lora_name: str, clients: list[HttpClient]) -> None:
        """Unload ``lora_name`` from ``clients``; a server that does not hold it is skipped."""
        for client in clients:
            response = client.post_json("/unload_lora_adapter", payloads.unload_payload(lora_name))
            if response.status_code != 200 and lora_name in self._listed(client):
                raise ArealError(
                    f"SGLang server {client.base_url} refused to unload {lora_name}: "
                    f"HTTP {response.status_code} {response.text[:500]}"
                )

    def loaded_adapters(self) -> list[str]:
        """The adapter names every server lists now (the union over servers), sorted."""
        self._require_started()
        names: set[str] = set()
        for client in self.clients:
            names |= self._listed(client)
        return sorted(names)

    @staticmethod
    def _listed(client: HttpClient) -> set[str]:
        response = client.get("/v1/models")
        if response.status_code != 200:
            raise ArealError(
                f"SGLang server {client.base_url} did not list its models: "
                f"HTTP {response.status_code} {response.text[:500]}"
            )
        # The base model is listed too, without a parent; adapters name it as their parent.
        return {entry["id"] for entry in response.json().get("data", []) if entry.get("parent")}

    def _unload_stale(self) -> None:
        """Unload every adapter's versions older than its own window that no request uses."""
        with self._lock:
            stale = []
            for versions in self.adapter_versions.values():
                for name in versions.stale():
                    versions.forget(name)
                    stale.append(name)
        for name in stale:
            try:
                self._unload_from(name, self.clients)
            except ArealError as exc:
                # Harmless for correctness (the name is retired and never sent again), but the
                # server keeps its memory: say so rather than fail the caller's work.
                logger.warning("could not unload stale adapter %s: %s", name, exc)

    def _acquire(self, lora_name: str, version: int | None = None) -> tuple[AdapterVersions, int]:
        """Mark a request in flight on ``lora_name``; refuse a name not live on this client.

        Returns the adapter's bookkeeping and the version, for ``_release``.
        """
        versions = self._versions_of(lora_name)
        with self._lock:
            live = {name: number for number, name in versions.loaded().items()}
            if lora_name not in live or (version is not None and live[lora_name] != version):
                raise ArealError(
                    f"refusing to name adapter {lora_name!r} (version {version}) in a request: "
                    f"it is not a live version of this client (live: {sorted(live)}); SGLang "
                    f"would silently serve the base model or reload a retired version"
                )
            versions.acquire(live[lora_name])
            return versions, live[lora_name]

    def _release(self, versions: AdapterVersions, version: int) -> None:
        with self._lock:
            versions.release(version)
        self._unload_stale()

    # --- generation ---------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        lora_name: str,
        version: int,
        n: int,
        sampling: SamplingParams,
    ) -> list[list[Sample]]:
        """``n`` samples per token-id prompt from version ``version`` (named ``lora_name``).

        One request per prompt (SGLang samples its ``n`` completions; with ``sampling.seed`` each
        completion has a seed of its own), sent concurrently up to
        ``rollout.max_concurrent_requests`` and spread over the servers. Calls for different
        adapters may run at once (from several threads).
        """
        self._require_started()
        if n < 1:
            raise ValueError(f"n must be >= 1 (got {n})")
        empty = [index for index, prompt in enumerate(prompts) if not len(prompt)]
        if empty:
            raise ValueError(f"prompts {empty} are empty; every prompt needs at least one token id")
        versions, _ = self._acquire(lora_name, version)
        try:
            futures = [
                self._pool.submit(self._generate_one, list(prompt), index, lora_name, version, n, sampling)
                for index, prompt in enumerate(prompts)
            ]
            # Every request ends before the version is released (and may be unloaded).
            concurrent.futures.wait(futures)
            return [future.result() for future in futures]
        finally:
            self._release(versions, version)

    def _generate_one(
        self, prompt: list[int], index: int, lora_name: str, version: int, n: int,
        sampling: SamplingParams,
    ) -> list[Sample]:
        payload = payloads.generate_payload(
            prompt, lora_name=lora_name, n=n, sampling=sampling, prompt_index=index
        )
        answer = self._post_generate(payload)
        answers = answer if isinstance(answer, list) else [answer]
        if len(answers) != n:
            raise ArealError(f"SGLang returned {len(answers)} completions for n={n}")
        samples = []
        for completion in answers:
            output_ids, logprobs, reason = payloads.read_completion(completion)
            samples.append(Sample(tuple(prompt), output_ids, logprobs, version, reason))
        return samples

    def prompt_logprobs(self, token_ids: Sequence[int], *, lora_name: str) -> list[float]:
        """Log-probabilities of ``token_ids[1:]`` given their prefixes, under ``lora_name``."""
        self._require_started()
        if len(token_ids) < 2:
            raise ValueError("prompt_logprobs needs at least two tokens")
        versions, version = self._acquire(lora_name)
        try:
            payload = payloads.prompt_logprobs_payload(token_ids, lora_name=lora_name)
            answer = self._post_generate(payload)
            return payloads.read_prompt_logprobs(answer, len(token_ids) - 1)
        finally:
            self._release(versions, version)

    def _post_generate(self, payload: dict):
        payloads.require_lora_path(payload)
        with self._lock:
            client = self.clients[self._next_client % len(self.clients)]
            self._next_client += 1
        response = client.post_json("/generate", payload)
        if response.status_code != 200:
            raise ArealError(
                f"SGLang server {client.base_url} refused a generate request: "
                f"HTTP {response.status_code} {response.text[:500]}"
            )
        return response.json()


def _load_refusal(response) -> str:
    """The server's reason for refusing a load, or "" when it loaded the adapter."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code == 200 and isinstance(body, dict) and body.get("success", True):
        return ""
    if isinstance(body, dict):
        return str(body.get("error_message") or body.get("message") or body.get("detail") or body)
    return f"HTTP {response.status_code} {response.text[:500]}"
