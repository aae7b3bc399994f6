"""One training rank of the megatron tests: runs the cases of a plan, writes results for pytest.

Started by ``launch.py`` as ``world_size`` processes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
in the environment). With WORLD_SIZE > 1 it initialises torch.distributed as ``areal train``
does; with 1 it leaves that to the engine (which then creates its own one-process group).
Each case records what it measured in ``<out>/rank<R>.json`` and, on rank 0, tensors in
``<out>/<case>/*.pt``; the assertions live in the tests.
"""

from __future__ import annotations

import json
import math
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from areal_core.config import ActorConfig, OptimizerConfig, RunConfig, TrainConfig
from areal_core.errors import ArealError
from areal_core.process_exit import exit_now
from areal_megatron import plugin

#: Token sequences of the tiny models' vocabulary (32 ids); varied lengths force padding.
DATA = [
    [1, 5, 6, 7, 8, 9, 10, 11],
    [1, 4, 4, 4],
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13],
    [1, 20, 21],
    [1, 9, 8, 7, 6, 5],
    [1, 30, 2, 29, 3, 28, 4, 27, 5],
]
#: A signed weight per sequence, like GRPO advantages.
WEIGHTS = [1.0, -0.5, 0.8, -1.2, 0.3, 0.6]
NORMALISER = float(sum(len(s) - 1 for s in DATA))


def my_slice(rank: int, world: int) -> tuple[int, int]:
    """An uneven split of DATA: with 2 ranks, 4 sequences and 2 (different micro-batch counts)."""
    if world == 1:
        return 0, len(DATA)
    bounds = {2: [0, 4, 6], 4: [0, 2, 3, 5, 6]}[world]
    return bounds[rank], bounds[rank + 1]


def make_loss_fn(offset: int):
    def loss_fn(logprobs, indices):
        loss = sum(-WEIGHTS[offset + i] * lp.sum() for lp, i in zip(logprobs, indices)) / NORMALISER
        return loss, {"sequences": float(len(indices))}

    return loss_fn


#: AdamW with a large eps (the default is 1e-8): the layouts' adapters are compared after
#: training, and with a tiny eps an entry whose gradient is at rounding level (lora_A while
#: lora_B is still near zero) moves by about lr * g / |g|, turning the layouts' rounding noise
#: into jumps of up to lr. With eps 1e-6, TP=2 and DP=2 ended 1.4e-5 from TP=1 on one entry
#: (2100 u of the largest, u = 2^-24), varying with ATEN_CPU_CAPABILITY; eps 1e-3 keeps the
#: update a smooth function of the gradient (figures in test_layouts).
OPTIMIZER = OptimizerConfig(lr=1e-2, eps=1e-3, grad_clip=1.0)


def build(model: str, tp: int, *, targets=("all-linear",), rank=4, alpha=8.0, micro=24, lora=True):
    config = RunConfig(
        actor=ActorConfig(backend="megatron", path=model, lora_rank=rank, lora_alpha=alpha,
                          target_modules=list(targets), tensor_parallel_size=tp,
                          max_tokens_per_microbatch=micro, device=os.environ.get("AREAL_TEST_DEVICE", "auto"),
                          optimizer=OPTIMIZER),
        train=TrainConfig(seed=7),
    )
    engine = plugin.areal_build_engine(backend="megatron", config=config)
    engine.load_base_model()
    if lora:
        plugin.areal_inject_adapter(backend="megatron", engine=engine, actor=config.actor, adapter_name=None)
        plugin.areal_shard_model(backend="megatron", engine=engine, actor=config.actor)
    return engine


def whole_adapter(engine):
    from areal_megatron.peft_export import gather_adapter

    return gather_adapter(engine.model, engine.layout)


def case_conversion(ctx, arch):
    from areal_megatron.model_builder import read_hf_state
    from areal_megatron.models import state_dict_adapter

    path = ctx["models"][arch]
    engine = build(path, ctx["tp"], lora=False)
    back = state_dict_adapter(engine.spec).to_hf(engine.megatron_state())
    original = read_hf_state(path)
    logits = engine.forward_logits(DATA if engine.layout.tp_rank == 0 else [])
    engine.close()
    if ctx["rank"] == 0:
        torch.save(logits[: len(DATA)], ctx["dir"] / "logits.pt")
    return {
        "keys_only_in_hf": sorted(set(original) - set(back)),
        "keys_only_in_roundtrip": sorted(set(back) - set(original)),
        "exact": all(torch.equal(original[k], back[k]) for k in original if k in back),
    }


def train_steps(engine, ctx, steps):
    start, end = my_slice(ctx["rank"], ctx["world"])
    out = []
    for _ in range(steps):
        out.append(engine.train_step(DATA[start:end], make_loss_fn(start)))
    return out


def case_train_export(ctx, arch, targets):
    from areal_core.interfaces import Engine

    engine = build(ctx["models"][arch], ctx["tp"], targets=targets)
    satisfies_protocol = isinstance(engine, Engine)
    initial = whole_adapter(engine)
    metrics = train_steps(engine, ctx, 3)
    exported = plugin.areal_export_adapter(backend="megatron", engine=engine,
                                           directory=str(ctx["dir"] / "adapter"), version=3, adapter_name=None)
    start, end = my_slice(ctx["rank"], ctx["world"])
    logprobs = engine.compute_logprobs(DATA[start:end])
    base_logprobs = engine.compute_logprobs(DATA[start:end], disable_adapter=True)
    everyone = [None] * ctx["world"]
    if ctx["world"] > 1:
        dist.all_gather_object(everyone, (start, logprobs, base_logprobs))
    else:
        everyone = [(start, logprobs, base_logprobs)]
    logits = engine.forward_logits(DATA if engine.layout.tp_rank == 0 else [])
    adapter = whole_adapter(engine)
    engine.close()
    if ctx["rank"] == 0:
        ordered = sorted(everyone, key=lambda item: item[0])
        torch.save({"logits": logits, "logprobs": [lp for _, lps, _ in ordered for lp in lps],
                    "base_logprobs": [lp for _, _, lps in ordered for lp in lps],
                    "adapter": adapter, "initial_adapter": initial}, ctx["dir"] / "tensors.pt")
    return {"exported": {"path": exported.path, "version": exported.version, "rank": exported.rank,
                         "alpha": exported.alpha, "target_modules": list(exported.target_modules),
                         "num_bytes": exported.num_bytes},
            "metrics": metrics, "satisfies_protocol": satisfies_protocol}


def case_checkpoint(ctx, arch):
    tp, ckpt = ctx["tp"], str(ctx["dir"] / "ckpt")
    first = build(ctx["models"][arch], tp)
    train_steps(first, ctx, 2)
    first.save_checkpoint(ckpt)
    saved = whole_adapter(first)
    continued = train_steps(first, ctx, 1)[0]
    after_continuous = whole_adapter(first)
    first.close()

    second = build(ctx["models"][arch], tp)
    second.load_checkpoint(ckpt)
    restored = whole_adapter(second)
    resumed = train_steps(second, ctx, 1)[0]
    after_resume = whole_adapter(second)
    second.close()

    other = build(ctx["models"][arch], tp, rank=8, alpha=16.0)
    try:
        other.load_checkpoint(ckpt)
        mismatch_error = ""
    except ArealError as exc:
        mismatch_error = str(exc)
    other.close()
    return {
        "restored_equals_saved": all(torch.equal(saved[k], restored[k]) for k in saved),
        "resumed_equals_continuous": all(torch.equal(after_continuous[k], after_resume[k]) for k in saved),
        "max_diff": max(float((after_continuous[k] - after_resume[k]).abs().max()) for k in saved),
        "changed_by_step": any(not torch.equal(saved[k], after_resume[k]) for k in saved),
        "grad_norms": [continued["grad_norm"], resumed["grad_norm"]],
        "files": sorted(os.listdir(ckpt)),
        "mismatch_error": mismatch_error,
    }


def case_misuse(ctx, arch):
    """Calls in the wrong order or with bad data: each must raise a clear error on every rank."""
    found = {}
    engine = build(ctx["models"][arch], ctx["tp"], lora=False)
    for label, call in (
        ("train_before_shard", lambda: engine.train_step(DATA[:1], make_loss_fn(0))),
        ("export_before_inject", lambda: engine.export_adapter(str(ctx["dir"] / "never"), 0)),
        ("token_outside_vocab", lambda: engine.compute_logprobs([[1, 2, 99]])),
        ("one_token_sequence", lambda: engine.compute_logprobs([[1]])),
    ):
        try:
            call()
            found[label] = ""
        except (ArealError, ValueError) as exc:
            found[label] = f"{type(exc).__name__}: {exc}"
    plugin.areal_inject_adapter(backend="megatron", engine=engine, actor=engine.actor, adapter_name=None)
    plugin.areal_shard_model(backend="megatron", engine=engine, actor=engine.actor)
    target = str(ctx["dir"] / "exists")
    plugin.areal_export_adapter(backend="megatron", engine=engine, directory=target, version=0,
                                adapter_name=None)
    try:
        plugin.areal_export_adapter(backend="megatron", engine=engine, directory=target, version=1,
                                    adapter_name=None)
        found["export_twice"] = ""
    except ArealError as exc:
        found["export_twice"] = str(exc)
    engine.close()
    return found


def case_non_finite(ctx, arch):
    """A NaN loss on the last rank only: every rank skips the update, and the next step trains."""
    engine = build(ctx["models"][arch], ctx["tp"])
    train_steps(engine, ctx, 1)
    start, end = my_slice(ctx["rank"], ctx["world"])
    normal = make_loss_fn(start)

    def poisoned(logprobs, indices):
        loss, found = normal(logprobs, indices)
        return (loss * float("nan") if ctx["rank"] == ctx["world"] - 1 else loss), found

    slot = engine.slot(None)
    weights = {k: v.clone() for k, v in whole_adapter(engine).items()}
    moments = {id(p): {k: v.clone() for k, v in s.items() if torch.is_tensor(v)}
               for p, s in slot.optimizer.state.items()}
    skipped = engine.train_step(DATA[start:end], poisoned)
    kept_weights = all(torch.equal(weights[k], v) for k, v in whole_adapter(engine).items())
    kept_moments = all(torch.equal(moments[id(p)][k], v) for p, s in slot.optimizer.state.items()
                       for k, v in s.items() if torch.is_tensor(v))
    steps_counted = slot.steps
    after = train_steps(engine, ctx, 1)[0]
    moved = any(not torch.equal(weights[k], v) for k, v in whole_adapter(engine).items())
    engine.close()
    return {"update_skipped": skipped["update_skipped"], "grad_norm_finite": math.isfinite(skipped["grad_norm"]),
            "weights_kept": kept_weights, "moments_kept": kept_moments, "moments_checked": len(moments),
            "steps_counted": steps_counted,
            "next_skipped": after["update_skipped"], "next_moved": moved}


def case_multi_adapter(ctx):
    from megatron_multi_adapter_cases import case_multi_adapter as run

    return run(ctx)


CASES = {"conversion": case_conversion, "train_export": case_train_export,
         "checkpoint": case_checkpoint, "misuse": case_misuse, "multi_adapter": case_multi_adapter,
         "non_finite": case_non_finite}


def main(plan_path: str) -> int:
    plan = json.loads(Path(plan_path).read_text())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world > 1:
        backend = "nccl" if os.environ.get("AREAL_TEST_DEVICE") == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world)
    out = Path(plan["out"])
    results = {}
    for case in plan["cases"]:
        name, kind, args = case["name"], case["kind"], case.get("args", {})
        ctx = {"rank": rank, "world": world, "tp": plan["tp"], "models": plan["models"],
               "dir": out / name}
        ctx["dir"].mkdir(parents=True, exist_ok=True)
        try:
            results[name] = {"ok": True, **CASES[kind](ctx, **args)}
        except Exception:
            results[name] = {"ok": False, "error": traceback.format_exc()}
            (out / f"rank{rank}.json").write_text(json.dumps(results, indent=1, default=str))
            return 1  # the other ranks may be stuck in a collective: stop the launch
    (out / f"rank{rank}.json").write_text(json.dumps(results, indent=1, default=str))
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    exit_now(main(sys.argv[1]))  # see areal_core.process_exit: the teardown can abort after gloo
