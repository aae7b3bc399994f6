"""Every multi-process fsdp2 case, run by ONE launch of two processes (see conftest.py).

Not a test module: each process runs this script as ``python distributed_cases.py`` with
RANK/WORLD_SIZE set, executes the cases in order, and writes what it observed to
``<out>/rank<N>.json`` (numbers, messages) and ``<out>/<case>.rank<N>.<what>.safetensors``
(tensors). The tests in ``test_two_ranks.py`` assert on those files.

Phases (each a fresh process group on its own port):
  1. two ranks: export equivalence cases, gradient checkpointing, mixed precision, full
     fine-tuning, errors raised on every rank, the 2-rank half of the gradient equivalence,
     4 steps straight, and 2 steps + checkpoint;
  2. two ranks, new process group: resume from that checkpoint and train 2 more steps;
  3. rank 0 alone, no group (the engine starts its own): the 1-rank gradient equivalence.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import traceback
import zlib
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from areal_core.config import ActorConfig, OptimizerConfig, RunConfig, TrainConfig  # noqa: E402
from areal_core.process_exit import exit_now  # noqa: E402
from areal_core.registry import Registry  # noqa: E402

REGISTRY = Registry()
BACKEND = "fsdp2"
VOCAB = 32  # the tiny models' vocabulary
EVAL_SEQUENCES = {
    0: [[1, 5, 6, 7, 8, 9, 10], [1, 20, 21, 4], [1, 30, 31, 12, 13, 14, 15, 16, 17]],
    1: [[1, 11, 12, 13], [1, 7, 7, 7, 7, 7, 2]],
}


def make_sequences(seed: int, count: int) -> list[list[int]]:
    """``count`` deterministic token sequences (bos first), lengths 3..9."""
    rng = random.Random(seed)
    return [[1] + [rng.randrange(4, VOCAB) for _ in range(rng.randrange(2, 9))] for _ in range(count)]


def grpo_like_loss(advantages: list[float], normaliser: float):
    """A policy-gradient loss: -sum(adv_i * sum_t logp_i,t) / normaliser, like the loop's."""

    def loss_fn(logprobs, indices):
        terms = [-advantages[i] * lp.sum() for lp, i in zip(logprobs, indices)]
        loss = torch.stack(terms).sum() / normaliser
        return loss, {"sequences_seen": float(len(indices))}

    return loss_fn


def step_data(case_seed: int, step: int, counts: list[int], rank: int):
    """This rank's sequences and loss for one step; every rank derives every rank's data."""
    batches = [make_sequences(case_seed * 1000 + step * 10 + r, n) for r, n in enumerate(counts)]
    normaliser = float(sum(len(s) for batch in batches for s in batch))
    mine = batches[rank] if rank < len(batches) else []
    advantages = [1.0 if i % 2 == 0 else -0.5 for i in range(len(mine))]
    return mine, grpo_like_loss(advantages, normaliser)


class Recorder:
    def __init__(self, out: Path, rank: int):
        self.out, self.rank, self.results = out, rank, {}

    def save_tensors(self, case: str, what: str, tensors: dict[str, torch.Tensor]) -> None:
        if tensors:
            path = self.out / f"{case}.rank{self.rank}.{what}.safetensors"
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))

    def save_list(self, case: str, what: str, tensors: list[torch.Tensor]) -> None:
        self.save_tensors(case, what, {str(i): t for i, t in enumerate(tensors)})

    def flush(self) -> None:
        (self.out / f"rank{self.rank}.json").write_text(json.dumps(self.results, indent=1, sort_keys=True))


# AdamW for the cases whose adapters are compared after training along two routes that round
# differently (sharded or replicated adapter, two ranks or one, resumed or straight): a large
# eps (1e-3; the default 1e-8) keeps the update a smooth function of the gradient. With a tiny
# eps an entry whose gradient is at rounding level (lora_A while lora_B is still near zero)
# moves by about lr * g / |g|, so the routes' rounding noise becomes jumps of up to lr: sharded
# vs replicated adapters after 3 steps of lr 1e-2 differed by 2.8e-7 to 4.2e-5 on one entry
# (33 u to 5000 u of the adapter's largest entry, u = 2^-24), with ATEN_CPU_CAPABILITY (which
# also moves the tiny model's random weights by 2e-7); with eps 1e-3, by 1.4 u to 1.5 u in norm.
SMOOTH_ADAMW = {"lr": 1e-2, "eps": 1e-3}


def build(path: str, seed: int = 7, **actor_options) -> object:
    """An fsdp2 engine through the hooks, as the loop drives it: build, load, inject, shard."""
    optimizer = OptimizerConfig(**actor_options.pop("optimizer", {"lr": 1e-2}))
    actor = ActorConfig(backend=BACKEND, path=path, device="cpu", optimizer=optimizer, **actor_options)
    config = RunConfig(actor=actor, train=TrainConfig(seed=seed))
    engine = REGISTRY.build_engine(BACKEND, config)
    engine.load_base_model()
    REGISTRY.call("areal_inject_adapter", BACKEND, engine=engine, actor=actor)
    REGISTRY.call("areal_shard_model", BACKEND, engine=engine, actor=actor)
    return engine


def train(engine, case_seed: int, steps: range, counts: list[int]) -> list[dict]:
    return [engine.train_step(*step_data(case_seed, step, counts, engine.rank)) for step in steps]


def export(engine, rec: Recorder, case: str, version: int) -> dict:
    directory = rec.out / case / f"adapter-v{version}"
    exported = REGISTRY.call("areal_export_adapter", BACKEND, engine=engine, directory=str(directory), version=version)
    return {"path": exported.path, "version": exported.version, "rank": exported.rank,
            "alpha": exported.alpha, "target_modules": list(exported.target_modules),
            "num_bytes": exported.num_bytes, "seconds": exported.seconds}


def export_case(rec: Recorder, case: str, path: str, steps: int, data: str = "", **actor_options) -> None:
    """Train, export, and record the sharded model's logits and log-probabilities.

    ``data`` names the case whose training data to reuse (default: this case's own).
    """
    engine = build(path, **actor_options)
    metrics = train(engine, zlib.crc32((data or case).encode()) % 997, range(steps), [3, 2])
    result = {"metrics": metrics, "export": export(engine, rec, case, steps)}
    mine = EVAL_SEQUENCES[engine.rank]
    rec.save_list(case, "logits", engine.forward_logits(mine))
    rec.save_list(case, "logprobs", engine.compute_logprobs(mine))
    rec.save_list(case, "base_logprobs", engine.compute_logprobs(mine, disable_adapter=True))
    result["eval_sequences"] = mine
    result["max_tokens_per_microbatch"] = engine.actor.max_tokens_per_microbatch
    params = list(engine.model.parameters())
    result["sharded"] = {"frozen": sum(isinstance(p, DTensor) for p in params if not p.requires_grad),
                         "trainable": sum(isinstance(p, DTensor) for p in params if p.requires_grad)}
    rec.results[case] = result
    engine.close()


def full_finetune_case(rec: Recorder, path: str) -> None:
    engine = build(path, full_finetune=True, optimizer={"lr": 1e-3})
    total = sum(p.numel() for p in engine.model.parameters())
    trainable = sum(p.numel() for p in engine.model.parameters() if p.requires_grad)
    before = engine.trainable_state()
    metrics = train(engine, 5, range(2), [3, 2])
    after = engine.trainable_state()
    result = {"total": total, "trainable": trainable, "metrics": metrics}
    if engine.rank == 0:
        result["changed"] = sorted(n for n in before if not torch.equal(before[n], after[n]))
        result["parameters"] = sorted(before)
    for what, call in (
        ("export_error", lambda: export(engine, rec, "full_ft", 2)),
        ("disable_adapter_error", lambda: engine.compute_logprobs([[1, 2, 3]], disable_adapter=True)),
    ):
        try:
            call()
            result[what] = None
        except Exception as exc:
            result[what] = f"{type(exc).__name__}: {exc}"
    rec.results["full_ft"] = result
    engine.close()


def collective_errors_case(rec: Recorder, path: str) -> None:
    """Errors met on rank 1 only are raised on both ranks; the engine keeps working after."""
    engine = build(path, lora_rank=4, lora_alpha=8)
    result = {}
    bad = [[1, 2, 999]] if engine.rank == 1 else [[1, 2, 3]]
    try:
        engine.compute_logprobs(bad)
        result["bad_tokens"] = None
    except Exception as exc:
        result["bad_tokens"] = f"{type(exc).__name__}: {exc}"

    def failing_loss(logprobs, indices):
        if engine.rank == 1:
            raise ValueError("advantage missing")
        return torch.stack([lp.sum() for lp in logprobs]).sum() * 0.1, {}

    sequences = make_sequences(engine.rank, 3)
    try:
        engine.train_step(sequences, failing_loss)
        result["failing_loss"] = None
    except Exception as exc:
        result["failing_loss"] = f"{type(exc).__name__}: {exc}"
    result["step_after_errors"] = engine.step

    def poisoned_loss(logprobs, indices):  # a NaN on rank 1 only: the summed gradient is NaN everywhere
        loss = torch.stack([lp.sum() for lp in logprobs]).sum() * 0.1
        return (loss * float("nan") if engine.rank == 1 else loss), {}

    before = engine.trainable_state()
    poisoned = engine.train_step(sequences, poisoned_loss)
    after = engine.trainable_state()
    result["non_finite"] = {"update_skipped": poisoned["update_skipped"], "grad_norm": poisoned["grad_norm"],
                            "weights_unchanged": all(torch.equal(before[k], after[k]) for k in before),
                            "step_counted": engine.step}
    result["metrics_after_errors"] = train(engine, 9, range(1), [2, 2])
    rec.results["collective_errors"] = result
    engine.close()


GRAD_EQUIV_OPTIONS = dict(lora_rank=4, lora_alpha=8, max_tokens_per_microbatch=12,
                          optimizer={**SMOOTH_ADAMW, "grad_clip": 0.05})
# step 0: rank 0 holds 3 sequences, rank 1 holds 1; step 1: rank 0 holds all 4, rank 1 none.
GRAD_EQUIV_SPLITS = [[3, 1], [4, 0]]


def grad_equiv_data(step: int, rank: int, world_size: int):
    """One step's data split over ``world_size`` ranks; the 1-rank run concatenates both halves."""
    counts = GRAD_EQUIV_SPLITS[step]
    batches = [make_sequences(500 + step * 10 + r, n) for r, n in enumerate(counts)]
    normaliser = float(sum(len(s) for batch in batches for s in batch))
    mine = batches[rank] if world_size == 2 else batches[0] + batches[1]
    # Advantages are a property of each sequence, wherever it lands.
    every = [(s, 1.0 if (r + i) % 2 == 0 else -0.5) for r, batch in enumerate(batches) for i, s in enumerate(batch)]
    lookup = {tuple(s): a for s, a in every}
    return mine, grpo_like_loss([lookup[tuple(s)] for s in mine], normaliser)


def grad_equiv_case(rec: Recorder, path: str, case: str) -> None:
    # Rank 1 draws another initial adapter: only the broadcast from rank 0 makes the two-rank
    # run start where the one-rank run (seed 7) starts.
    rank = dist.get_rank() if dist.is_initialized() else 0
    engine = build(path, seed=7 + 100 * rank, **GRAD_EQUIV_OPTIONS)
    metrics = []
    for step in range(len(GRAD_EQUIV_SPLITS)):
        mine, loss_fn = grad_equiv_data(step, engine.rank, engine.world_size)
        metrics.append({**engine.train_step(mine, loss_fn), "local_sequences": len(mine)})
        rec.save_tensors(case, f"step{step}", engine.trainable_state())
    rec.results[case] = {"metrics": metrics, "world_size": engine.world_size}
    engine.close()


RESUME_OPTIONS = dict(lora_rank=4, lora_alpha=8, max_tokens_per_microbatch=16, optimizer=SMOOTH_ADAMW)


def resume_straight_case(rec: Recorder, path: str) -> None:
    engine = build(path, **RESUME_OPTIONS)
    metrics = train(engine, 77, range(4), [2, 3])
    rec.save_tensors("resume_straight", "final", engine.trainable_state())
    rec.results["resume_straight"] = {"metrics": metrics, "step": engine.step}
    engine.close()


def resume_first_half_case(rec: Recorder, path: str, checkpoint: Path) -> None:
    engine = build(path, **RESUME_OPTIONS)
    metrics = train(engine, 77, range(2), [2, 3])
    rng_at_save = torch.get_rng_state().tolist()
    engine.save_checkpoint(str(checkpoint))
    # Advance the RNG after saving: resume must bring back the state saved, not the current one.
    torch.rand(7)
    rec.results["resume_first_half"] = {"metrics": metrics, "step": engine.step, "rng_at_save": rng_at_save}
    engine.close()


def resume_second_half_case(rec: Recorder, path: str, checkpoint: Path, case: str = "resume_second_half",
                            **options) -> None:
    torch.manual_seed(12345)  # a different RNG state than at save time
    engine = build(path, **RESUME_OPTIONS, **options, seed=99)  # another initial adapter, overwritten by the load
    engine.load_checkpoint(str(checkpoint))
    restored_step = engine.step
    rng_after_load = torch.get_rng_state().tolist()
    metrics = train(engine, 77, range(2, 4), [2, 3])
    rec.save_tensors(case, "final", engine.trainable_state())
    rec.results[case] = {
        "metrics": metrics, "restored_step": restored_step, "step": engine.step,
        "rng_after_load": rng_after_load,
    }
    engine.close()


def init_group(port: int, rank: int, world_size: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)


def run(args) -> None:
    rank = int(os.environ["RANK"])
    out = Path(args.out)
    rec = Recorder(out, rank)
    ports = [int(p) for p in args.ports.split(",")]
    checkpoint = out / "resume" / "checkpoint"
    try:
        init_group(ports[0], rank, 2)
        # Plain, checkpointed and replicated: three routes to one update, compared after.
        export_case(rec, "qwen2_r16_all", args.qwen2, 3, lora_rank=16, lora_alpha=32,
                    max_tokens_per_microbatch=24, optimizer=SMOOTH_ADAMW)
        export_case(rec, "qwen2_r16_all_gc", args.qwen2, 3, data="qwen2_r16_all", lora_rank=16, lora_alpha=32,
                    max_tokens_per_microbatch=24, gradient_checkpointing=True, optimizer=SMOOTH_ADAMW)
        export_case(rec, "qwen2_r16_all_replicated", args.qwen2, 3, data="qwen2_r16_all", lora_rank=16,
                    lora_alpha=32, max_tokens_per_microbatch=24, replicate_adapter=True, optimizer=SMOOTH_ADAMW)
        # The frozen base kept whole on every rank (actor.replicate_base), the adapter sharded or not.
        export_case(rec, "qwen2_r16_all_whole_base", args.qwen2, 3, data="qwen2_r16_all", lora_rank=16,
                    lora_alpha=32, max_tokens_per_microbatch=24, replicate_base=True, optimizer=SMOOTH_ADAMW)
        export_case(rec, "qwen2_r16_all_all_whole", args.qwen2, 3, data="qwen2_r16_all", lora_rank=16,
                    lora_alpha=32, max_tokens_per_microbatch=24, replicate_base=True, replicate_adapter=True,
                    optimizer=SMOOTH_ADAMW)
        export_case(rec, "llama_r1_subset", args.llama, 3, lora_rank=1, lora_alpha=3,
                    target_modules=["v_proj", "q_proj", "down_proj"], max_tokens_per_microbatch=20)
        export_case(rec, "qwen2_bf16_base", args.qwen2, 2, lora_rank=8, lora_alpha=16, dtype="bfloat16")
        export_case(rec, "qwen2_param_bf16", args.qwen2, 2, lora_rank=8, lora_alpha=16,
                    param_dtype="bfloat16", reduce_dtype="float32")
        full_finetune_case(rec, args.qwen2)
        collective_errors_case(rec, args.qwen2)
        grad_equiv_case(rec, args.qwen2, "grad_equiv_2rank")
        resume_straight_case(rec, args.qwen2)
        resume_first_half_case(rec, args.qwen2, checkpoint)
        dist.destroy_process_group()

        init_group(ports[1], rank, 2)
        resume_second_half_case(rec, args.qwen2, checkpoint)
        # The same checkpoint (saved sharded) resumed with the adapter kept whole on each rank.
        resume_second_half_case(rec, args.qwen2, checkpoint, "resume_second_half_replicated",
                                replicate_adapter=True)
        dist.destroy_process_group()

        if rank == 0:
            # No process group: the engine must start a one-process group by itself.
            grad_equiv_case(rec, args.qwen2, "grad_equiv_1rank")
            rec.results["group_after_close"] = dist.is_initialized()
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
    parser.add_argument("--llama", required=True)
    parser.add_argument("--ports", required=True, help="two free ports, comma-separated")
    try:
        run(parser.parse_args())
    except BaseException:  # recorded in rank<N>.json by run()
        traceback.print_exc()
        exit_now(1)
    exit_now(0)  # see areal_core.process_exit: the interpreter's teardown can abort after gloo
