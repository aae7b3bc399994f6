"""``VllmRolloutServer``: the ``RolloutServer`` of areal on vLLM's OpenAI-compatible HTTP API.

It launches and owns one server (``rollout.servers`` empty) or connects to the given addresses.
Adapter versions are loaded as ``<adapter>-v<N>`` with ``POST /v1/load_lora_adapter`` and
confirmed in ``GET /v1/models`` before use; names are never reused, and a version older than its
adapter's staleness window (``max_head_offpolicyness``) is unloaded as soon as no request in
flight uses it (``areal_core.versions.AdapterVersions``). The adapters are those of
``areal_core.adapters.run_adapters`` (``gconfig.lora_name`` alone for a run without
``adapters:``): every adapter's versions are live side by side, each adapter numbered on its own
and kept in its own ``AdapterVersions``, picked by the name's ``<adapter>`` part; a name of
another adapter is refused. Generation sends one request per prompt (``n`` samples each), at most
``rollout.max_concurrent_requests`` at a time, spread over the servers, every one naming its
version as ``"model"``; ``lora_name=None`` asks the base model. Calls naming different adapters
may run at once from several threads: vLLM batches them together (see ``plugin.py``).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import os
import threading
import weakref
from pathlib import Path
from typing import Sequence

from areal_core.adapter_format import ChecksumCheck, verify_adapter_dir
from areal_core.adapters import run_adapters
from areal_core.config import RunConfig
from areal_core.errors import (
    AdapterError,
    AdapterLoadError,
    ArealError,
    ConfigInvalid,
    ServerUnreachableError,
)
from areal_core.interfaces import ExportedAdapter, Sample, SamplingParams
from areal_core.versions import AdapterVersions, parse_version_name

from areal_vllm.capabilities import MAX_RANK, UNSERVABLE_MODULES, run_max_lora_rank
from areal_vllm.completions import (
    completion_request,
    prompt_logprobs_from_completion,
    prompt_logprobs_request,
    samples_from_completion,
)
from areal_vllm.http_client import ServerRequestError, VllmHttp
from areal_vllm.launcher import LaunchedServer, launch_server
from areal_vllm.validation import validate_config

logger = logging.getLogger("areal_vllm")


class VllmRolloutServer:
    """Rollouts and adapter versions on one or more vLLM servers (see the module docstring).

    :param config: the run's configuration (``rollout``, ``actor``, ``gconfig`` and ``adapters``
        are read).
    :param log_path: where a launched server writes its output; default
        ``<output_dir>/logs/vllm-server.log`` (appended to).
    :param connect_attempts: connection attempts per request before ``ServerUnreachableError``.
    :param connect_backoff: seconds slept after the first failed attempt, doubled after each.
    :param unload_stale_versions: after each load and each finished request, unload the versions
        outside the staleness window by itself. Off when a caller does that bookkeeping (the
        core's GRPO loop does: ``areal_build_rollout_server`` builds it off).
    """

    name = "vllm"

    def __init__(self, config: RunConfig, *, log_path: str | os.PathLike | None = None,
                 connect_attempts: int = 5, connect_backoff: float = 0.25,
                 unload_stale_versions: bool = True):
        self.config = config
        #: each adapter's live versions, by adapter name, in the run's order
        self.adapter_versions: dict[str, AdapterVersions] = {
            adapter.name: AdapterVersions(adapter.name, adapter.max_head_offpolicyness)
            for adapter in run_adapters(config)
        }
        #: the first (for a run without ``adapters:`` the only) adapter's versions
        self.versions = next(iter(self.adapter_versions.values()))
        self.log_path = Path(log_path) if log_path else Path(config.output_dir) / "logs" / "vllm-server.log"
        self.connect_attempts = connect_attempts
        self.connect_backoff = connect_backoff
        self.unload_stale_versions = unload_stale_versions
        self._deferred_unloads: set[str] = set()
        self.launched: LaunchedServer | None = None
        self._clients: list[VllmHttp] = []
        self._base_model = ""
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._round_robin = itertools.count()
        self._load_lock = threading.Lock()
        self._unload_lock = threading.Lock()
        self._finalizer: weakref.finalize | None = None

    # --- lifecycle ------------------------------------------------------------------------

    @property
    def managed(self) -> bool:
        """True when this object launches its own server (``rollout.servers`` is empty)."""
        return not self.config.rollout.servers

    @property
    def addresses(self) -> list[str]:
        return [client.address for client in self._clients]

    @property
    def base_model(self) -> str:
        """The base model's name on the server(s) (the ``"model"`` of base-model requests)."""
        return self._base_model

    @property
    def max_lora_rank(self) -> int | None:
        """The ``--max-lora-rank`` of a launched server (holding the largest rank of the run's
        adapters); None for servers given by address."""
        return run_max_lora_rank(self.config) if self.managed else None

    def _api_key(self) -> str | None:
        name = self.config.rollout.api_key_env
        if not name:
            return None
        key = os.environ.get(name)
        if not key:
            raise ArealError(f"rollout.api_key_env names {name}, which is not set; export it first")
        return key

    def start(self) -> None:
        """Launch a server (or connect to ``rollout.servers``) and wait until each answers.

        :raises ConfigInvalid: the configuration cannot work with vLLM (checked before launching).
        :raises ServerStartError: a launched server died or stayed unhealthy (with its log's tail).
        :raises ServerUnreachableError: a given address did not answer within the bounded retries.
        """
        if self._clients:
            return
        errors = validate_config(self.config)
        if errors:
            raise ConfigInvalid(errors)
        api_key = self._api_key()
        rollout = self.config.rollout
        if self.managed:
            self.launched = launch_server(self.config, self.log_path, api_key=api_key)
            self._finalizer = weakref.finalize(self, self.launched.stop)
            logger.info("vLLM server at %s launched (log %s)", self.launched.address, self.log_path)
            addresses = [self.launched.address]
        else:
            addresses = list(rollout.servers)
        clients = [
            VllmHttp(address, api_key=api_key, timeout=rollout.request_timeout,
                     attempts=self.connect_attempts, backoff=self.connect_backoff,
                     pool_size=rollout.max_concurrent_requests)
            for address in addresses
        ]
        try:
            bases = set()
            for client in clients:
                client.get("/health")
                models = client.get("/v1/models")["data"]
                bases.update(m["id"] for m in models if not m.get("parent"))
                self._adopt_existing([m["id"] for m in models if m.get("parent")])
            if len(bases) != 1:
                raise ArealError(
                    f"the vLLM servers {', '.join(addresses)} serve base models {sorted(bases)}; "
                    f"every server of a run must serve the same single base model"
                )
        except BaseException:
            for client in clients:
                client.close()
            if self.launched is not None:
                self.launched.stop()
            raise
        self._base_model = bases.pop()
        self._clients = clients
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=rollout.max_concurrent_requests, thread_name_prefix="vllm-rollout"
        )

    def stop(self) -> None:
        """Stop the server this object launched (with its children); on servers given by
        address, unload the versions this object loaded. Idempotent."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._clients and not self.managed:
            for name in self._loaded_names():
                try:
                    self.unload_adapter(name)
                except ArealError as exc:
                    logger.warning("could not unload %s at stop: %s", name, exc)
        for client in self._clients:
            client.close()
        self._clients = []
        if self.launched is not None:
            self.launched.stop()
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None

    def _require_started(self) -> None:
        if not self._clients:
            raise ArealError("the vLLM rollout server is not started; call start() first")

    def _call(self, client: VllmHttp, method: str, path: str, payload: dict | None = None):
        """One request; when a launched server has died, say so with the tail of its log."""
        try:
            return client.request(method, path, payload)
        except ServerUnreachableError as exc:
            if self.launched is not None and self.launched.exit_code() is not None:
                raise ServerUnreachableError(f"{exc}; {self.launched.describe_exit()}") from exc
            raise

    # --- adapters -------------------------------------------------------------------------

    def _adopt_existing(self, names: list[str]) -> None:
        """Names a server already holds are never loaded again, whichever adapter they are of."""
        for versions in self.adapter_versions.values():
            versions.adopt_existing(names)

    def _loaded_names(self) -> list[str]:
        """Every adapter's live version names."""
        return [name for versions in self.adapter_versions.values() for name in versions.loaded().values()]

    def _versions_of(self, lora_name: str, version: int | None = None, *,
                     loading: bool = False) -> AdapterVersions:
        """The bookkeeping of the adapter ``lora_name`` is a version of.

        :raises ArealError: ``lora_name`` is not ``<adapter>-v<N>`` for one of the run's adapters;
            the message lists them, and names what ``version`` is (``loading``: would be) called.
        """
        try:
            adapter, _ = parse_version_name(lora_name)
        except ValueError:
            adapter = None
        if adapter in self.adapter_versions:
            return self.adapter_versions[adapter]
        adapters = ", ".join(self.adapter_versions)
        what = (f"it names adapter {adapter!r}, which is not one of the run's adapters ({adapters})"
                if adapter is not None else
                f"it is not a version name <adapter>-v<N> of one of the run's adapters ({adapters})")
        hints = []
        if version is not None and loading:
            hints = [f"version {version} of {name} must be loaded as {versions.name(version)!r}"
                     for name, versions in self.adapter_versions.items()]
        elif version is not None:  # the live name the caller may have meant
            live = (versions.loaded().get(version) for versions in self.adapter_versions.values())
            hints = [f"version {version} is live as {name!r}" for name in live if name]
        hint = "; ".join(hints) or ("name a version of one of those adapters, or list the adapter under "
                                    "adapters: in the run's configuration")
        raise ArealError(f"adapter version name {lora_name!r} refused: {what}; {hint}")

    def loaded_adapters(self) -> list[str]:
        """The adapter names the server(s) list right now (sorted, over all servers)."""
        self._require_started()
        names = set()
        for client in self._clients:
            names.update(m["id"] for m in self._call(client, "GET", "/v1/models")["data"] if m.get("parent"))
        return sorted(names)

    def _check_servable(self, adapter_config: dict, lora_name: str, path: Path, adapter_name: str) -> None:
        """Refuse, before the server is asked, what vLLM cannot serve."""
        rank = adapter_config.get("r")
        problems = []
        limit = self.max_lora_rank or MAX_RANK
        if not isinstance(rank, int) or rank > limit:
            where = "the server's --max-lora-rank" if self.max_lora_rank else "vLLM's largest"
            key = f"adapters.{adapter_name}.lora_rank" if self.config.adapters else "actor.lora_rank"
            problems.append(f"its rank {rank} is above {where} ({limit}); lower {key} "
                            f"or start the server with a larger --max-lora-rank")
        targets = adapter_config.get("target_modules") or []
        if isinstance(targets, str):
            problems.append(f"its target_modules is a pattern ({targets!r}); vLLM needs module names")
        else:
            bad = sorted(set(targets) & set(UNSERVABLE_MODULES))
            if bad:
                problems.append(f"it adapts {', '.join(bad)}, which vLLM cannot serve")
        if adapter_config.get("modules_to_save"):
            problems.append("it has modules_to_save, which vLLM cannot serve")
        if adapter_config.get("use_dora"):
            problems.append("it is a DoRA adapter, which vLLM cannot serve")
        if problems:
            raise AdapterLoadError(f"cannot load {lora_name} from {path}: {'; '.join(problems)}")

    def load_adapter(self, adapter: ExportedAdapter, lora_name: str) -> None:
        """Make ``adapter`` live as ``lora_name`` on every server and confirm it is listed.

        ``lora_name`` must be ``<adapter>-v<adapter.version>`` for one of the run's adapters,
        newer than that adapter's live versions and never loaded before. Afterwards the versions
        outside the staleness windows that no request uses are unloaded.

        :raises AdapterLoadError: the directory is missing or invalid, vLLM cannot serve the
            adapter, or a server refused it (with the server's message); the versions already
            live keep serving.
        :raises ArealError: the name is malformed, names no adapter of the run, is reused, or is
            not newer than its adapter's live version.
        """
        self._require_started()
        versions = self._versions_of(lora_name, adapter.version, loading=True)
        expected = versions.name(adapter.version)
        if lora_name != expected:
            names = "<adapter>-v<N>" if self.config.adapters else "<gconfig.lora_name>-v<N>"
            raise ArealError(f"adapter version {adapter.version} must be loaded as {expected!r}, "
                             f"not {lora_name!r} (names are {names})")
        path = Path(adapter.path).absolute()
        try:
            adapter_config = verify_adapter_dir(path, checksums=False)
        except AdapterError as exc:
            raise AdapterLoadError(f"cannot load {lora_name}: {exc}") from exc
        self._check_servable(adapter_config, lora_name, path, versions.lora_name)
        checksums = ChecksumCheck(path)  # hashed while the servers read the files
        try:
            with self._load_lock:
                versions.reserve(adapter.version)
                loaded_on = []
                for client in self._clients:
                    try:
                        self._call(client, "POST", "/v1/load_lora_adapter",
                                   {"lora_name": lora_name, "lora_path": str(path)})
                    except ServerRequestError as exc:
                        self._unload_from(lora_name, loaded_on)
                        raise AdapterLoadError(checksums.explain(
                            f"vLLM server at {client.address} refused to load {lora_name} from {path} "
                            f"(HTTP {exc.status}): {exc.message}"
                        )) from exc
                    loaded_on.append(client)
                try:
                    checksums.result()
                except AdapterError as exc:
                    self._unload_from(lora_name, loaded_on)
                    raise AdapterLoadError(f"cannot load {lora_name}: {exc}; it was unloaded before any "
                                           f"request used it") from exc
                missing = [c.address for c in self._clients
                           if lora_name not in {m["id"] for m in self._call(c, "GET", "/v1/models")["data"]}]
                if missing:
                    self._unload_from(lora_name, loaded_on)
                    raise AdapterLoadError(f"vLLM accepted {lora_name} but {', '.join(missing)} do not list it")
                versions.confirm(adapter.version)
        finally:
            checksums.join()
        logger.info("adapter %s live on %s (from %s)", lora_name, ", ".join(self.addresses), path)
        if self.unload_stale_versions:
            self.unload_stale()

    def _unload_from(self, lora_name: str, clients: list[VllmHttp]) -> None:
        for client in clients:
            try:
                self._call(client, "POST", "/v1/unload_lora_adapter", {"lora_name": lora_name})
            except ServerRequestError as exc:
                if exc.status != 404:  # 404: not loaded there (any more)
                    raise

    def unload_adapter(self, lora_name: str) -> None:
        """Unload ``lora_name`` from every server once no request in flight uses it.

        With requests in flight on it the unload is deferred until the last one ends. A name a
        server does not hold is skipped.

        :raises ArealError: ``lora_name`` is not a version of one of the run's adapters.
        """
        self._require_started()
        versions = self._versions_of(lora_name)
        with self._unload_lock:
            if not versions.retire(lora_name):
                self._deferred_unloads.add(lora_name)
                logger.info("adapter %s: unload deferred until its requests end", lora_name)
                return
            self._deferred_unloads.discard(lora_name)
            self._unload_from(lora_name, self._clients)
        logger.info("adapter %s unloaded", lora_name)

    def unload_stale(self) -> list[str]:
        """Unload the versions outside their adapter's staleness window that no request uses;
        their names."""
        done = []
        for name in [n for versions in self.adapter_versions.values() for n in versions.stale()]:
            try:
                self.unload_adapter(name)
                done.append(name)
            except ArealError as exc:  # kept for the next attempt; never fails the caller's work
                logger.warning("could not unload stale adapter %s: %s", name, exc)
        return done

    def _release(self, versions: AdapterVersions, version: int) -> None:
        """End one request's use of ``version`` (of ``versions``' adapter); then do the unloads
        that waited for it."""
        versions.release(version)
        with self._unload_lock:  # other adapters' threads add to it meanwhile
            deferred = sorted(self._deferred_unloads)
        for name in deferred:
            try:
                self.unload_adapter(name)
            except ArealError as exc:
                logger.warning("could not unload adapter %s: %s", name, exc)
        if self.unload_stale_versions:
            self.unload_stale()

    # --- generation -----------------------------------------------------------------------

    def _version_of(self, lora_name: str) -> tuple[AdapterVersions, int] | None:
        """The adapter's bookkeeping and the live version ``lora_name`` names; None if not live.

        :raises ArealError: ``lora_name`` is not a version of one of the run's adapters.
        """
        versions = self._versions_of(lora_name)
        for version, name in versions.loaded().items():
            if name == lora_name:
                return versions, version
        return None

    def _next_client(self) -> VllmHttp:
        return self._clients[next(self._round_robin) % len(self._clients)]

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        lora_name: str | None,
        version: int,
        n: int,
        sampling: SamplingParams,
    ) -> list[list[Sample]]:
        """``n`` samples per token-id prompt from ``lora_name`` (None: the base model).

        Returns one list of ``n`` samples per prompt, in prompt order, each tagged with
        ``version``. The version stays in use (never unloaded) until every request has ended.
        Calls for different adapters may run at once (from several threads).

        :raises ArealError: ``lora_name`` is not the live name of ``version`` (of its adapter, one
            of the run's), or a request failed (with the server's message).
        """
        self._require_started()
        if n < 1:
            raise ValueError(f"n must be >= 1 (got {n})")
        prompts = [list(p) for p in prompts]
        empty = [i for i, p in enumerate(prompts) if not p]
        if empty:
            raise ValueError(f"prompts {empty} are empty; every prompt needs at least one token id")
        model = self._base_model
        versions = None
        if lora_name is not None:
            versions = self._versions_of(lora_name, version)
            model = versions.acquire(version)
            if model != lora_name:
                versions.release(version)
                raise ArealError(f"version {version} is live as {model!r}, not {lora_name!r}")
        try:
            futures = [
                self._pool.submit(self._sample_one, self._next_client(), model, prompt, n, sampling, version)
                for prompt in prompts
            ]
            concurrent.futures.wait(futures)  # every request ends before the version is released
            return [future.result() for future in futures]
        finally:
            if versions is not None:
                self._release(versions, version)

    def _sample_one(self, client: VllmHttp, model: str, prompt: list[int], n: int,
                    sampling: SamplingParams, version: int) -> list[Sample]:
        body = self._call(client, "POST", "/v1/completions", completion_request(model, prompt, n, sampling))
        return samples_from_completion(body, prompt, version, n)

    def prompt_logprobs(self, token_ids: Sequence[int], *, lora_name: str | None) -> list[float]:
        """``log p(token_ids[i] | token_ids[:i])`` for i >= 1 under ``lora_name`` (None: base).

        :raises ArealError: ``lora_name`` is not a version of one of the run's adapters.
        """
        self._require_started()
        token_ids = [int(t) for t in token_ids]
        if len(token_ids) < 2:
            raise ValueError("prompt_logprobs needs at least 2 token ids")
        live = self._version_of(lora_name) if lora_name is not None else None
        if live is not None:
            live[0].acquire(live[1])
        try:
            body = self._call(self._next_client(), "POST", "/v1/completions",
                              prompt_logprobs_request(lora_name or self._base_model, token_ids))
            return prompt_logprobs_from_completion(body, token_ids)
        finally:
            if live is not None:
                self._release(*live)
