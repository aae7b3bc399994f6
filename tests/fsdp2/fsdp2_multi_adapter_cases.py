"""The two-rank cases of several adapters on one base, run by ONE launch of two processes.

Not a test module: each process runs this script with RANK/WORLD_SIZE set (see
``test_multi_adapter_fsdp2.py``'s fixture), executes the cases in order, and writes what it observed to
``<out>/rank<N>.json`` and ``<out>/<case>.rank<N>.<what>.safetensors``.

Phases (each a fresh process group on its own port):
  1. isolation (sharded, replicated, and on a bfloat16 base): A steps on a real batch, B on a zero-advantage
     batch; every adapter's gradients are recorded as each optimizer steps. Then two adapters of
     other ranks and target modules train in turns (A, B, A, B), checkpoint, train A, B again,
     export both and record their log-probabilities;
  2. resume that checkpoint in a new engine (another seed) and train A, B as the first run did.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import traceback
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from areal_core.adapters import adapter_views  # noqa: E402
from areal_core.config import ActorConfig, RunConfig, TrainConfig  # noqa: E402
from areal_core.process_exit import exit_now  # noqa: E402
from areal_core.registry import Registry  # noqa: E402
from areal_core.testing.two_adapters import TWO_ADAPTERS  # noqa: E402

REGISTRY = Registry()
BACKEND = "fsdp2"
VOCAB = 32
TOTAL_STEPS = 6  # train.steps: the schedule's N (ppo_n_minibatches 1)
EVAL_SEQUENCES = {
    0: [[1, 5, 6, 7, 8, 9, 10], [1, 20, 21, 4], [1, 30, 31, 12, 13, 14, 15, 16, 17]],
    1: [[1, 11, 12, 13], [1, 7, 7, 7, 7, 7, 2]],
}
MAX_TOKENS = 20
# A decays linearly over its own steps, B stays constant at another rate (see two_adapters).
ADAPTERS = list(TWO_ADAPTERS)


def make_sequences(seed: int, count: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(4, VOCAB) for _ in range(rng.randrange(2, 9))] for _ in range(count)]


def grpo_like_loss(advantages: list[float], normaliser: float):
    def loss_fn(logprobs, indices):
        terms = [-advantages[i] * lp.sum() for lp, i in zip(logprobs, indices)]
        return torch.stack(terms).sum() / normaliser, {"sequences_seen": float(len(indices))}

    return loss_fn


def step_data(seed: int, rank: int, zero: bool = False):
    """This rank's sequences and loss (every rank derives both ranks' data for the normaliser)."""
    batches = [make_sequences(seed * 10 + r, n) for r, n in enumerate([3, 2])]
    normaliser = float(sum(len(s) for batch in batches for s in batch))
    mine = batches[rank]
    advantages = [0.0 if zero else (1.0 if i % 2 == 0 else -0.5) for i in range(len(mine))]
    return mine, grpo_like_loss(advantages, normaliser)


class Recorder:
    def __init__(self, out: Path, rank: int):
        self.out, self.rank, self.results = out, rank, {}

    def save_tensors(self, case: str, what: str, tensors: dict[str, torch.Tensor]) -> None:
        if tensors:
            save_file({k: v.contiguous() for k, v in tensors.items()},
                      str(self.out / f"{case}.rank{self.rank}.{what}.safetensors"))

    def save_list(self, case: str, what: str, tensors: list[torch.Tensor]) -> None:
        self.save_tensors(case, what, {str(i): t for i, t in enumerate(tensors)})

    def flush(self) -> None:
        (self.out / f"rank{self.rank}.json").write_text(json.dumps(self.results, indent=1, sort_keys=True))


def build(path: str, seed: int = 7, **actor_options):
    """An fsdp2 engine with ``ADAPTERS``, driven through the hooks as the core drives it."""
    actor = ActorConfig(backend=BACKEND, path=path, device="cpu", max_tokens_per_microbatch=MAX_TOKENS,
                        **actor_options)
    config = RunConfig(actor=actor, train=TrainConfig(seed=seed, steps=TOTAL_STEPS), adapters=ADAPTERS)
    engine = REGISTRY.build_engine(BACKEND, config)
    engine.load_base_model()
    views = adapter_views(config)
    for entry, view in views:
        REGISTRY.call("areal_inject_adapter", BACKEND, engine=engine, actor=view.actor, adapter_name=entry.name)
    REGISTRY.call("areal_shard_model", BACKEND, engine=engine, actor=views[0][1].actor)
    return engine


def requires_grad(engine) -> dict[str, bool]:
    return {name: param.requires_grad for name, param in engine.model.named_parameters()}


def watch_gradients(engine, log: list) -> None:
    """As any adapter's AdamW steps, log every adapter's gradients on this rank: None (no
    gradient on any of its parameters), or the largest |entry| of this rank's shards."""

    def snapshot(stepping: str):
        entry = {"stepping": stepping}
        for name, slot in engine.adapters.items():
            grads = [p.grad for p in slot.parameters]
            if all(g is None for g in grads):
                entry[name] = None
            else:
                local = [(g.to_local() if isinstance(g, DTensor) else g) for g in grads if g is not None]
                entry[name] = max(float(t.abs().max()) if t.numel() else 0.0 for t in local)
                entry[name + "_count"] = len(local)
        log.append(entry)

    for name, slot in engine.adapters.items():
        slot.optimizer.register_step_pre_hook(lambda opt, args, kwargs, name=name: snapshot(name))


def isolation_case(rec: Recorder, path: str, case: str, **options) -> None:
    engine = build(path, **options)
    log: list = []
    watch_gradients(engine, log)
    flags = requires_grad(engine)
    result = {"metrics": []}
    rec.save_tensors(case, "initial", engine.trainable_state())
    result["metrics"].append(engine.train_step(*step_data(11, engine.rank), adapter="alpha"))
    rec.save_tensors(case, "after_alpha", engine.trainable_state())
    result["metrics"].append(engine.train_step(*step_data(12, engine.rank, zero=True), adapter="beta"))
    rec.save_tensors(case, "after_beta", engine.trainable_state())
    engine.compute_logprobs(EVAL_SEQUENCES[engine.rank], adapter="beta")
    engine.compute_logprobs(EVAL_SEQUENCES[engine.rank], disable_adapter=True)
    result["requires_grad_unchanged"] = requires_grad(engine) == flags
    result["trainable"] = sorted(n for n, f in flags.items() if f)
    result["gradients"] = log
    result["peft_names"] = {name: slot.peft_name for name, slot in engine.adapters.items()}
    try:
        engine.train_step(*step_data(13, engine.rank))
        result["unnamed_error"] = None
    except Exception as exc:
        result["unnamed_error"] = f"{type(exc).__name__}: {exc}"
    rec.results[case] = result
    engine.close()


# The turns of the train/resume case: (adapter, data seed), 4 before the checkpoint, 2 after.
TURNS = [("alpha", 21), ("beta", 22), ("alpha", 23), ("beta", 24), ("alpha", 25), ("beta", 26)]
SAVED_AFTER = 4


def train_turns(engine, turns) -> list[dict]:
    return [{**engine.train_step(*step_data(seed, engine.rank), adapter=name), "adapter": name}
            for name, seed in turns]


def train_case(rec: Recorder, path: str, checkpoint: Path) -> None:
    engine = build(path)
    metrics = train_turns(engine, TURNS[:SAVED_AFTER])
    engine.save_checkpoint(str(checkpoint))
    torch.rand(5)  # the RNG moves on after saving: the resumed run must restore the saved state
    metrics += train_turns(engine, TURNS[SAVED_AFTER:])
    rec.save_tensors("train", "final", engine.trainable_state())
    result = {"metrics": metrics, "step": engine.step,
              "steps": {name: slot.step for name, slot in engine.adapters.items()}, "export": {}}
    mine = EVAL_SEQUENCES[engine.rank]
    for name in ("alpha", "beta"):
        directory = rec.out / "train" / name / "v3"
        exported = REGISTRY.call("areal_export_adapter", BACKEND, engine=engine, directory=str(directory),
                                 version=3, adapter_name=name)
        result["export"][name] = {"path": exported.path, "version": exported.version, "rank": exported.rank,
                                  "alpha": exported.alpha, "target_modules": list(exported.target_modules)}
        rec.save_list("train", f"logprobs_{name}", engine.compute_logprobs(mine, adapter=name))
        rec.save_list("train", f"logits_{name}", engine.forward_logits(mine, adapter=name))
    rec.save_list("train", "base_logprobs", engine.compute_logprobs(mine, disable_adapter=True))
    result["eval_sequences"] = mine
    rec.results["train"] = result
    engine.close()


def resume_case(rec: Recorder, path: str, checkpoint: Path) -> None:
    torch.manual_seed(4321)
    engine = build(path, seed=99)  # other initial adapters, overwritten by the load
    engine.load_checkpoint(str(checkpoint))
    result = {"restored_step": engine.step,
              "restored_steps": {name: slot.step for name, slot in engine.adapters.items()}}
    result["metrics"] = train_turns(engine, TURNS[SAVED_AFTER:])
    rec.save_tensors("resume", "final", engine.trainable_state())
    rec.results["resume"] = result
    engine.close()


def init_group(port: int, rank: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)


def run(args) -> None:
    rank = int(os.environ["RANK"])
    out = Path(args.out)
    rec = Recorder(out, rank)
    ports = [int(p) for p in args.ports.split(",")]
    checkpoint = out / "checkpoint"
    try:
        init_group(ports[0], rank)
        isolation_case(rec, args.qwen2, "isolation")
        isolation_case(rec, args.qwen2, "isolation_replicated", replicate_adapter=True)
        isolation_case(rec, args.qwen2, "isolation_bf16_base", dtype="bfloat16")
        train_case(rec, args.qwen2, checkpoint)
        dist.destroy_process_group()
        init_group(ports[1], rank)
        resume_case(rec, args.qwen2, checkpoint)
        dist.destroy_process_group()
    except BaseException:
        rec.results["error"] = traceback.format_exc()
        rec.flush()
        raise
    rec.results["done"] = True
    rec.flush()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--qwen2", required=True)
    parser.add_argument("--ports", required=True, help="two free ports, comma-separated")
    try:
        run(parser.parse_args())
    except BaseException:
        traceback.print_exc()
        exit_now(1)
    exit_now(0)
