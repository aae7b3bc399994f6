"""The conformance kit's several-adapter run: two adapters on one base, served side by side.

    from areal_core.testing.multi_adapter_conformance import run_multi_adapter_conformance
    report = run_multi_adapter_conformance("fsdp2", "vllm", workdir, servers=["127.0.0.1:8000"])
    report.skipped        # "" when it ran; else why the pair trains one adapter at a time
    report.adapters       # each adapter's ConformanceReport (agreement, effect, adapter path)

For a pair whose engine and server both declare ``LoraSupport.multi_adapter`` it runs, as a run
with ``adapters:`` does: one ``areal_inject_adapter`` per adapter (``ADAPTERS``: other ranks,
other target modules), one shard, one training step of each adapter on a batch of its own, an
export of each, a load of each on one server under ``<adapter>-v1``, and each adapter's
agreement check and generation. Besides the one-adapter run's failures (``conformance``) it
fails when the two adapters score the probe too alike for the checks to catch a server that
answers one adapter's name with the other's weights. A pair that lacks the declaration is not
run: ``skipped`` gives the support matrix's reason (the words ``areal check`` refuses such a
configuration with), so the run follows what the plugins declare.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import attrs

from areal_core.testing.conformance import ConformanceReport
from areal_core.testing.conformance_steps import (
    ConformanceError, check_agreement, check_dtype_and_limit, check_generation, conformance_config, conformance_model,
    export_adapter, load_version_1, probe_and_batches, require_visible, step, trainer_scores,
    train_one_step,
)

#: The two adapters, as (name suffix, rank, alpha, target modules).
ADAPTERS = (("r4", 4, 8, ("all-linear",)), ("r8", 8, 16, ("q_proj", "v_proj")))


@attrs.frozen
class MultiAdapterReport:
    """What one several-adapter run measured, or why it did not run.

    ``adapters`` maps each adapter's name to its ``ConformanceReport`` (``seconds`` there is the
    whole run's, its steps named per adapter); ``adapters_apart`` is the check's mean distance
    between the two adapters' trainer scores; ``skipped`` is empty when the run ran.
    """

    engine: str
    server: str
    adapters: dict = attrs.field(factory=dict)
    adapters_apart: float = 0.0
    seconds: dict = attrs.field(factory=dict)
    skipped: str = ""


def run_multi_adapter_conformance(
    engine_name: str,
    server_name: str,
    workdir: str | Path,
    *,
    servers: Sequence[str] = (),
    arch: str = "qwen2",
    lora_name: str = "conformance",
    threshold: float | None = None,
    probe_tokens: int = 256,
    learning_rate: float = 0.05,
    overrides: Sequence[str] = (),
    model_dir: str | Path | None = None,
) -> MultiAdapterReport:
    """Run the two ``ADAPTERS``, named ``<lora_name>-<suffix>``, through one pair (see the
    module docstring); ``threshold`` and ``probe_tokens`` as in ``run_conformance``."""
    from areal_core.adapters import adapter_views
    from areal_core.agreement import max_abs_difference
    from areal_core.registry import default_registry

    registry = default_registry()
    cell = registry.matrix.cell(engine_name, server_name)
    if cell.supported and not cell.multi_adapter:
        return MultiAdapterReport(engine_name, server_name, skipped=(
            f"{engine_name} x {server_name} trains one adapter at a time: {cell.multi_adapter_reason}"))
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    seconds: dict = {}
    if model_dir is None:
        model_dir = conformance_model(workdir, arch)
    entries = ", ".join(
        f"{{name: {lora_name}-{suffix}, lora_rank: {rank}, lora_alpha: {alpha}, "
        f"target_modules: [{','.join(modules)}]}}" for suffix, rank, alpha, modules in ADAPTERS)
    config = conformance_config(engine_name, server_name, workdir, model_dir, servers=servers,
                                learning_rate=learning_rate, overrides=[f"adapters=[{entries}]", *overrides])
    views = adapter_views(config)
    names = [adapter.name for adapter, _ in views]
    probe, batches = probe_and_batches(probe_tokens, batches=len(names))
    dtype, limit = check_dtype_and_limit(config, threshold)
    pair = f"server {server_name} and engine {engine_name}"

    engine = registry.build_engine(engine_name, config)
    server = None
    try:
        with step("load_base_model", seconds):
            engine.load_base_model()
        for adapter, view in views:
            with step(f"inject {adapter.name}", seconds):
                registry.call("areal_inject_adapter", engine_name, engine=engine, actor=view.actor,
                              adapter_name=adapter.name)
        with step("shard", seconds):
            registry.call("areal_shard_model", engine_name, engine=engine, actor=views[0][1].actor)
        for name, batch in zip(names, batches):
            with step(f"train_step {name}", seconds):
                train_one_step(engine, batch, adapter=name)
        exported, scores = {}, {}
        for name in names:  # both steps done: each adapter as the other's step left it
            with step(f"export {name}", seconds):
                exported[name] = export_adapter(registry, engine_name, engine, workdir / name / "v1", name)
            with step(f"trainer_logprobs {name}", seconds):
                scores[name] = trainer_scores(engine, probe, adapter=name)
            require_visible(*scores[name], dtype=dtype, limit=limit,
                            what=f"adapter {name} moves log-probabilities",
                            fix="raise the learning rate or check the training step")
        first, second = names
        apart = require_visible(scores[first][0], scores[second][0], dtype=dtype, limit=limit,
                                what=f"adapters {first} and {second} differ",
                                fix="a server swapping them would pass; check that each adapter trains its own")
        with step("start_server", seconds):
            server = registry.build_rollout_server(server_name, config)
            server.start()
        served = {name: load_version_1(registry, server_name, server, exported[name], name, seconds,
                                       label=f"load {name}") for name in names}
        missing = sorted(set(served.values()) - set(server.loaded_adapters()))
        if missing:
            raise ConformanceError(f"the server dropped {', '.join(missing)} when the other adapter was loaded")
        reports = {}
        for name, batch in zip(names, batches):
            trainer, base = scores[name]
            agreement = check_agreement(server, probe, trainer, base, lora_name=served[name], dtype=dtype,
                                        threshold=threshold, pair=pair, seconds=seconds,
                                        label=f"agreement {name}")
            check_generation(server, batch[0][:5], served[name], seconds, label=f"generate {name}")
            reports[name] = ConformanceReport(engine_name, server_name, agreement, agreement.gap_max_abs,
                                              max_abs_difference(trainer, base), seconds,
                                              exported[name].path, 1)
        return MultiAdapterReport(engine_name, server_name, reports, apart, seconds)
    finally:
        if server is not None:
            server.stop()
        engine.close()
