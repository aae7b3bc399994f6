"""The multi-process cases of several adapters on one base in the megatron engine.

Not a test module: ``megatron_worker.py`` runs these (kind ``multi_adapter``) in every process of
one launch; ``test_multi_adapter_megatron.py`` checks what they wrote. Two adapters of other
ranks and target modules, driven through the hooks as the core drives them:

  1. isolation: alpha steps on a real batch, beta on a zero-advantage batch; every adapter's
     gradients on this rank are recorded as each optimizer steps;
  2. alpha and beta train in turns, checkpoint, train on; both are exported and their logits kept;
  3. a second engine (another seed) loads the checkpoint and trains the same turns;
  4. misuse: unnamed or duplicate adapters, a late injection, a checkpoint of another layout.
"""

from __future__ import annotations

import json
import os

import attrs
import torch

from areal_core.adapters import adapter_views
from areal_core.config import ActorConfig, RunConfig, TrainConfig
from areal_core.errors import ArealError
from areal_core.testing.two_adapters import TWO_ADAPTERS
from areal_megatron import plugin
from areal_megatron.peft_export import gather_adapter
from megatron_worker import DATA, my_slice

TOTAL_STEPS = 6  # train.steps: the schedule's N
MICRO = 24
#: No weight decay, so a zero gradient leaves an adapter's every bit (see two_adapters).
ADAPTERS = list(TWO_ADAPTERS)
NAMES = [a.name for a in ADAPTERS]
#: (adapter, advantage scale) turns: four before the checkpoint, two after.
TURNS = [("alpha", 1.0), ("beta", 1.0), ("alpha", -0.5), ("beta", 0.7), ("alpha", 0.9), ("beta", -1.1)]
SAVED_AFTER = 4
NORMALISER = float(sum(len(s) - 1 for s in DATA))


def config_for(model: str, tp: int, seed: int = 7, adapters=ADAPTERS) -> RunConfig:
    actor = ActorConfig(backend="megatron", path=model, tensor_parallel_size=tp, max_tokens_per_microbatch=MICRO,
                        device=os.environ.get("AREAL_TEST_DEVICE", "auto"))
    return RunConfig(actor=actor, train=TrainConfig(seed=seed, steps=TOTAL_STEPS), adapters=list(adapters))


def build(model: str, tp: int, seed: int = 7):
    """A megatron engine with ``ADAPTERS``, injected and set up through the hooks."""
    config = config_for(model, tp, seed)
    engine = plugin.areal_build_engine(backend="megatron", config=config)
    engine.load_base_model()
    views = adapter_views(config)
    for entry, view in views:
        plugin.areal_inject_adapter(backend="megatron", engine=engine, actor=view.actor, adapter_name=entry.name)
    plugin.areal_shard_model(backend="megatron", engine=engine, actor=views[0][1].actor)
    return engine


def loss_for(offset: int, scale: float):
    """A GRPO-like loss on this rank's sequences: signed weights times ``scale`` (0: no signal)."""
    weights = [scale * (1.0 if i % 2 == 0 else -0.6) for i in range(len(DATA))]

    def loss_fn(logprobs, indices):
        loss = sum(-weights[offset + i] * lp.sum() for lp, i in zip(logprobs, indices)) / NORMALISER
        return loss, {"sequences": float(len(indices))}

    return loss_fn


def step(engine, ctx, name: str, scale: float) -> dict:
    start, end = my_slice(ctx["rank"], ctx["world"])
    return {**engine.train_step(DATA[start:end], loss_for(start, scale), adapter=name), "adapter": name}


def whole(engine) -> dict[str, dict[str, torch.Tensor]]:
    """Every adapter, whole (TP-gathered), in megatron layout by local name."""
    return {name: gather_adapter(engine.model, engine.layout, slot.key) for name, slot in engine.adapters.items()}


def watch_gradients(engine, log: list) -> None:
    """As any adapter's AdamW steps, log every adapter's gradients on this rank: None (no
    gradient on any of its parameters), or the largest |entry| of its shards here."""

    def snapshot(stepping: str):
        entry = {"stepping": stepping}
        for name, slot in engine.adapters.items():
            grads = [p.grad for p in slot.parameters.values()]
            if all(g is None for g in grads):
                entry[name] = None
            else:
                entry[name] = max(float(g.abs().max()) for g in grads if g is not None)
                entry[name + "_count"] = sum(g is not None for g in grads)
        log.append(entry)

    for name, slot in engine.adapters.items():
        slot.optimizer.register_step_pre_hook(lambda opt, args, kwargs, name=name: snapshot(name))


def requires_grad(engine) -> dict[str, bool]:
    return {name: param.requires_grad for name, param in engine.model.named_parameters()}


def isolation(ctx) -> dict:
    engine = build(ctx["models"]["qwen2"], ctx["tp"])
    log: list = []
    watch_gradients(engine, log)
    flags = requires_grad(engine)
    tensors = {"initial": whole(engine)}
    metrics = [step(engine, ctx, "alpha", 1.0)]
    tensors["after_alpha"] = whole(engine)
    metrics.append(step(engine, ctx, "beta", 0.0))
    tensors["after_beta"] = whole(engine)
    start, end = my_slice(ctx["rank"], ctx["world"])
    engine.compute_logprobs(DATA[start:end], adapter="beta")
    engine.compute_logprobs(DATA[start:end], disable_adapter=True)
    try:
        engine.train_step(DATA[start:end], loss_for(start, 1.0))
        unnamed = ""
    except ArealError as exc:
        unnamed = f"{type(exc).__name__}: {exc}"
    result = {
        "gradients": log, "metrics": metrics, "unnamed_error": unnamed,
        "requires_grad_unchanged": requires_grad(engine) == flags,
        "trainable": sorted(n for n, f in flags.items() if f),
        # how TP splits each adapter here: local shapes by adapter and local name
        "local_shapes": {name: {n: list(p.shape) for n, p in slot.parameters.items()}
                         for name, slot in engine.adapters.items()},
    }
    engine.close()
    if ctx["rank"] == 0:
        torch.save(tensors, ctx["dir"] / "isolation.pt")
    return result


def train_export_resume(ctx) -> dict:
    model, tp = ctx["models"]["qwen2"], ctx["tp"]
    checkpoint = str(ctx["dir"] / "ckpt")
    engine = build(model, tp)
    metrics = [step(engine, ctx, name, scale) for name, scale in TURNS[:SAVED_AFTER]]
    engine.save_checkpoint(checkpoint)
    saved = whole(engine)
    torch.rand(5)  # the RNG moves on after saving: the resumed run must restore the saved state
    metrics += [step(engine, ctx, name, scale) for name, scale in TURNS[SAVED_AFTER:]]
    final = whole(engine)
    exported, logits = {}, {}
    for name in NAMES:
        found = plugin.areal_export_adapter(backend="megatron", engine=engine, directory=str(ctx["dir"] / name / "v3"),
                                            version=3, adapter_name=name)
        exported[name] = {"path": found.path, "version": found.version, "rank": found.rank, "alpha": found.alpha,
                          "target_modules": list(found.target_modules)}
        logits[name] = engine.forward_logits(DATA if engine.layout.tp_rank == 0 else [], adapter=name)
    logits["base"] = engine.forward_logits(DATA if engine.layout.tp_rank == 0 else [], disable_adapter=True)
    steps = {"engine": engine.steps, **{n: s.steps for n, s in engine.adapters.items()}}
    engine.close()

    torch.manual_seed(4321)
    resumed = build(model, tp, seed=99)  # other initial adapters, overwritten by the load
    resumed.load_checkpoint(checkpoint)
    restored = whole(resumed)
    restored_steps = {"engine": resumed.steps, **{n: s.steps for n, s in resumed.adapters.items()}}
    resumed_metrics = [step(resumed, ctx, name, scale) for name, scale in TURNS[SAVED_AFTER:]]
    after_resume = whole(resumed)
    resumed.close()
    if ctx["rank"] == 0:
        torch.save({"saved": saved, "restored": restored, "final": final, "after_resume": after_resume,
                    "logits": logits}, ctx["dir"] / "train.pt")
    return {"metrics": metrics, "resumed_metrics": resumed_metrics, "exported": exported, "steps": steps,
            "restored_steps": restored_steps, "files": sorted(os.listdir(checkpoint))}


def _error(call) -> str:
    try:
        call()
    except ArealError as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


def misuse(ctx) -> dict:
    model, tp = ctx["models"]["qwen2"], ctx["tp"]
    config = config_for(model, tp)
    # a checkpoint of a run without adapters: (the one-adapter layout), for the listed run below
    legacy = attrs.evolve(config, adapters=[])
    single = plugin.areal_build_engine(backend="megatron", config=legacy)
    single.load_base_model()
    plugin.areal_inject_adapter(backend="megatron", engine=single, actor=legacy.actor, adapter_name=None)
    plugin.areal_shard_model(backend="megatron", engine=single, actor=legacy.actor)
    single.save_checkpoint(str(ctx["dir"] / "legacy"))
    found = {"legacy_meta_keys": sorted(json.loads((ctx["dir"] / "legacy" / "meta.json").read_text())),
             "legacy_adapter": list(single.adapters)}
    single.close()

    engine = plugin.areal_build_engine(backend="megatron", config=config)
    engine.load_base_model()
    actor = adapter_views(config)[0][1].actor

    def inject(name):
        return lambda: plugin.areal_inject_adapter(backend="megatron", engine=engine, actor=actor, adapter_name=name)

    found.update(first=_error(inject("alpha")), duplicate=_error(inject("alpha")),
                 unnamed_second=_error(inject(None)))
    plugin.areal_shard_model(backend="megatron", engine=engine, actor=actor)
    found["after_setup"] = _error(inject("gamma"))
    found["unknown_adapter"] = _error(lambda: engine.compute_logprobs([[1, 2, 3]], adapter="gamma"))
    found["unknown_export"] = _error(lambda: engine.export_adapter(str(ctx["dir"] / "never"), 0, "gamma"))
    found["legacy_into_listed"] = _error(lambda: engine.load_checkpoint(str(ctx["dir"] / "legacy")))
    engine.close()
    return found


def case_multi_adapter(ctx) -> dict:
    return {"isolation": isolation(ctx), "train": train_export_resume(ctx), "misuse": misuse(ctx)}
