"""Wrong weights served under a version's name, put in place behind the project's back.

The ``serve-*`` faults of the fault-injection plugin (``areal_fault_injection``) call ``inject``
right after the real load of a version returned (the publisher's admission and the server
client's checksum check passed, and the server lists the name). From there on this module talks
to the server only through its own HTTP API, as a misbehaving server, a race with another client
or an operator's mistake would:

    serve-base            requests naming the version reach the server without an adapter (the
                          base model): vLLM's ``"model"`` is rewritten to the base model's name,
                          SGLang's ``lora_path`` is dropped, in the client's HTTP calls
    serve-previous        the name is unloaded and loaded again from the directory of the last
                          version before it with other weights (a reload's copy of the same
                          weights is skipped: its "previous" is the one before the original)
    serve-double-scale    ... loaded again from a copy with ``lora_alpha`` doubled
    serve-missing-module  ... from a copy without any ``down_proj`` tensors (and without
                          ``down_proj`` in ``target_modules``)
    serve-other-adapter   ... from random LoRA tensors of the same keys and shapes, each with the
                          root-mean-square of the real one (another run's adapter at the same
                          stage: B non-zero, same scale)

Several faults in one run: ``AREAL_INJECT_FAULT`` holds them comma-separated, e.g.
``serve-base-once@2,serve-previous-once@4``; each applies to the versions its ``@N`` (and
``-once``) names, and two faults that apply to the same version make the run fail at that load
(the spec is ambiguous).

Every injection scores a short token sequence under the name before and after the swap and
appends what it did, with that difference, to ``<output_dir>/fault-injection.jsonl``: a test can
tell that the fault really happened even when no check of the run noticed it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

KINDS = ("serve-base", "serve-previous", "serve-double-scale", "serve-missing-module", "serve-other-adapter")
LOG_FILE = "fault-injection.jsonl"
COPIES_DIR = "fault-injection"
MISSING_MODULE = "down_proj"
OTHER_ADAPTER_SEED = 20240917

# Every real load's (version, directory, weights checksum), in order: what "previous" means.
_loads: list[tuple[int, str, str]] = []
# Names whose requests are sent to the base model (serve-base).
_to_base: set[str] = set()


def parse(spec: str) -> tuple[str, int, bool] | None:
    """``serve-<kind>[-once]@N`` -> (kind, N, once); None for another fault."""
    wanted, _, nth = spec.strip().partition("@")
    once = wanted.endswith("-once")
    kind = wanted[: -len("-once")] if once else wanted
    if kind not in KINDS:
        return None
    return kind, int(nth or 1), once


def parse_all(specs: str) -> list[tuple[str, int, bool]]:
    """The ``serve-*`` faults of a comma-separated ``AREAL_INJECT_FAULT`` (others are skipped)."""
    return [fault for spec in specs.split(",") if (fault := parse(spec)) is not None]


def due(faults: list[tuple[str, int, bool]], version: int) -> str | None:
    """The kind of the one fault that applies to ``version``'s load, if any.

    :raises RuntimeError: more than one applies (e.g. a persistent fault and a later one).
    """
    kinds = [kind for kind, first, once in faults if version == first or (version > first and not once)]
    if len(kinds) > 1:
        raise RuntimeError(f"fault injection: {kinds} all apply to adapter version {version}; "
                           f"give each its own versions")
    return kinds[0] if kinds else None


def _weights_checksum(directory: str) -> str:
    from areal_core.adapter_format import MANIFEST_FILE, WEIGHTS_FILE

    manifest = json.loads((Path(directory) / MANIFEST_FILE).read_text())
    return manifest["files"][WEIGHTS_FILE]["sha256"]


def remember_load(adapter) -> None:
    """A real load of the trainer's adapter (called for every version, faulty or not)."""
    _loads.append((adapter.version, str(adapter.path), _weights_checksum(adapter.path)))


# --- the server's own HTTP API ---------------------------------------------------------------------


class _Server:
    """The few HTTP calls the faults make, on every server of the run's client object."""

    def __init__(self, backend: str, server):
        self.backend, self.server = backend, server
        if backend not in ("vllm", "sglang"):
            raise RuntimeError(f"the serve-* faults know vllm and sglang, not {backend!r}")

    @property
    def clients(self) -> list:
        return list(self.server._clients if self.backend == "vllm" else self.server.clients)

    def unload(self, name: str) -> None:
        for client in self.clients:
            if self.backend == "vllm":
                client.post("/v1/unload_lora_adapter", {"lora_name": name})
            else:
                response = client.post_json("/unload_lora_adapter", {"lora_name": name})
                if response.status_code != 200:
                    raise RuntimeError(f"SGLang refused to unload {name}: {response.text[:300]}")

    def load(self, name: str, path: str) -> None:
        for client in self.clients:
            if self.backend == "vllm":
                client.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
            else:
                response = client.post_json("/load_lora_adapter", {"lora_name": name, "lora_path": path})
                try:
                    body = response.json()
                except ValueError:
                    body = {}
                body = body if isinstance(body, dict) else {}
                if response.status_code != 200 or not body.get("success", True):
                    raise RuntimeError(f"SGLang refused to load {name} from {path}: {response.text[:300]}")
        for client in self.clients:
            listed = (client.get("/v1/models") if self.backend == "vllm" else client.get("/v1/models").json())
            if name not in {m["id"] for m in listed["data"]}:
                raise RuntimeError(f"{client} does not list {name} after loading it from {path}")

    def replace(self, name: str, path: str) -> None:
        """Serve the adapter at ``path`` under ``name`` from now on."""
        self.unload(name)
        self.load(name, path)

    def score(self, name: str, token_ids: list[int]) -> list[float]:
        """The server's log-probabilities of ``token_ids[1:]`` under ``name``, as a request
        naming it is sent (so a redirection to the base model applies)."""
        client = self.clients[0]
        if self.backend == "vllm":
            from areal_vllm.completions import prompt_logprobs_from_completion, prompt_logprobs_request

            body = client.post("/v1/completions", prompt_logprobs_request(name, token_ids))
            return prompt_logprobs_from_completion(body, token_ids)
        from areal_sglang.payloads import prompt_logprobs_payload, read_prompt_logprobs

        response = client.post_json("/generate", prompt_logprobs_payload(token_ids, lora_name=name))
        if response.status_code != 200:
            raise RuntimeError(f"SGLang refused to score under {name}: {response.text[:300]}")
        return read_prompt_logprobs(response.json(), len(token_ids) - 1)

    def send_to_base(self, name: str) -> None:
        """From now on, requests naming ``name`` go out without an adapter (the base model)."""
        _to_base.add(name)
        for client in self.clients:
            if getattr(client, "_areal_fault_to_base", False):
                continue
            if self.backend == "vllm":
                client.request = _vllm_request_to_base(client.request, self.server.base_model)
            else:
                client.post_json = _sglang_post_to_base(client.post_json)
            client._areal_fault_to_base = True


def _vllm_request_to_base(request, base_model: str):
    def wrapped(method, path, payload=None, **kwargs):
        if isinstance(payload, dict) and payload.get("model") in _to_base:
            payload = {**payload, "model": base_model}
        return request(method, path, payload, **kwargs)

    return wrapped


def _sglang_post_to_base(post_json):
    def wrapped(path, payload):
        if path == "/generate" and isinstance(payload, dict):
            names = payload.get("lora_path")
            names = names if isinstance(names, list) else [names]
            if names and all(n in _to_base for n in names):
                payload = {k: v for k, v in payload.items() if k != "lora_path"}
        return post_json(path, payload)

    return wrapped


# --- the wrong adapters ----------------------------------------------------------------------------


def _previous_directory(adapter) -> str:
    own = _weights_checksum(adapter.path)
    for version, path, checksum in reversed(_loads):
        if version < adapter.version and checksum != own:
            return path
    raise RuntimeError(f"serve-previous: no version before {adapter.version} with other weights was loaded")


def _rewritten(adapter, destination: Path, kind: str) -> str:
    import torch
    from safetensors.torch import load_file

    from areal_core.adapter_format import CONFIG_FILE, WEIGHTS_FILE, parse_peft_key, write_peft_adapter

    config = json.loads((Path(adapter.path) / CONFIG_FILE).read_text())
    tensors = load_file(str(Path(adapter.path) / WEIGHTS_FILE))
    alpha = config["lora_alpha"]
    if kind == "serve-double-scale":
        alpha = 2 * alpha
    elif kind == "serve-missing-module":
        tensors = {k: v for k, v in tensors.items() if not parse_peft_key(k)[0].endswith(MISSING_MODULE)}
    elif kind == "serve-other-adapter":
        generator = torch.Generator().manual_seed(OTHER_ADAPTER_SEED + adapter.version)
        other = {}
        for key, tensor in sorted(tensors.items()):
            rms = float(tensor.float().pow(2).mean().sqrt()) or 1e-3
            other[key] = (torch.randn(tensor.shape, generator=generator) * rms).to(tensor.dtype)
        tensors = other
    written = write_peft_adapter(destination, tensors, rank=config["r"], alpha=alpha, version=adapter.version,
                                 base_model_path=config.get("base_model_name_or_path", ""))
    return written.path


def _probe_ids(server) -> list[int]:
    """A short fixed token sequence within the base model's vocabulary."""
    vocab = json.loads((Path(server.config.actor.path) / "config.json").read_text())["vocab_size"]
    return [(7 * i + 3) % (vocab - 1) + 1 for i in range(24)]


def inject(kind: str, backend: str, server, adapter, lora_name: str) -> dict:
    """Make the server serve wrong weights under ``lora_name`` (just loaded from ``adapter``)."""
    http = _Server(backend, server)
    output_dir = Path(server.config.output_dir)
    ids = _probe_ids(server)
    before = http.score(lora_name, ids)
    if kind == "serve-base":
        served = "the base model"
        http.send_to_base(lora_name)
    else:
        if kind == "serve-previous":
            path = _previous_directory(adapter)
        else:
            path = _rewritten(adapter, output_dir / COPIES_DIR / f"{lora_name}-{kind}", kind)
        served = path
        http.replace(lora_name, path)
    after = http.score(lora_name, ids)
    changes = [abs(a - b) for a, b in zip(before, after)]
    record = {"fault": kind, "version": adapter.version, "name": lora_name, "backend": backend,
              "trainer_adapter": str(adapter.path), "served": served, "time": time.time(),
              "probe_tokens": len(changes), "change_max_abs": max(changes),
              "change_mean_abs": sum(changes) / len(changes)}
    with open(output_dir / LOG_FILE, "a") as handle:
        handle.write(json.dumps(record) + "\n")
    return record
