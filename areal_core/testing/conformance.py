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
own tests. Its steps are in ``conformance_steps``; its run of several adapters at once, for a
pair that declares ``multi_adapter``, in ``multi_adapter_conformance``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import attrs

# PROBE_SEQUENCE, MIN_EFFECT_OVER_THRESHOLD and ConformanceError stay importable from here
from areal_core.testing.conformance_steps import (  # noqa: F401
    MIN_EFFECT_OVER_THRESHOLD, PROBE_SEQUENCE, ConformanceError, check_agreement, check_dtype_and_limit,
    check_generation, conformance_config, conformance_model, export_adapter, load_version_1,
    probe_and_batches, require_visible, step, trainer_scores, train_one_step,
)


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
    from areal_core.agreement import max_abs_difference
    from areal_core.registry import default_registry

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    seconds: dict = {}
    if model_dir is None:
        model_dir = conformance_model(workdir, arch)
    lora = [f"actor.lora_rank={lora_rank}", f"actor.lora_alpha={lora_alpha}",
            f"actor.target_modules=[{','.join(target_modules)}]"]
    config = conformance_config(engine_name, server_name, workdir, model_dir, servers=servers,
                                learning_rate=learning_rate, overrides=[*lora, *overrides])
    registry = default_registry()
    probe, (batch,) = probe_and_batches(probe_tokens)

    engine = registry.build_engine(engine_name, config)
    server = None
    try:
        with step("load_base_model", seconds):
            engine.load_base_model()
        with step("inject", seconds):
            registry.call("areal_inject_adapter", engine_name, engine=engine, actor=config.actor)
        with step("shard", seconds):
            registry.call("areal_shard_model", engine_name, engine=engine, actor=config.actor)
        with step("train_step", seconds):
            train_one_step(engine, batch)
        with step("export", seconds):
            adapter = export_adapter(registry, engine_name, engine, workdir / "adapter-v1")
        with step("trainer_logprobs", seconds):
            trainer, base = trainer_scores(engine, probe)
        dtype, limit = check_dtype_and_limit(config, threshold)
        require_visible(trainer, base, dtype=dtype, limit=limit,
                        what="the trained adapter moves log-probabilities",
                        fix="raise the learning rate or check the training step")
        with step("start_server", seconds):
            server = registry.build_rollout_server(server_name, config)
            server.start()
        name = load_version_1(registry, server_name, server, adapter, config.gconfig.lora_name, seconds)
        agreement = check_agreement(server, probe, trainer, base, lora_name=name, dtype=dtype,
                                    threshold=threshold, pair=f"server {server_name} and engine {engine_name}",
                                    seconds=seconds)
        check_generation(server, batch[0][:5], name, seconds)
        return ConformanceReport(engine_name, server_name, agreement, agreement.gap_max_abs,
                                 max_abs_difference(trainer, base), seconds, adapter.path, 1)
    finally:
        if server is not None:
            server.stop()
        engine.close()
