"""One rank of one training-cost configuration (started by ``training_cost.py`` through ``ranks.py``).

Builds the fsdp2 engine through the hooks (load, inject, shard) as the GRPO loop does, runs
``--warmup`` untimed and ``--steps`` timed optimisation steps on random token sequences, and
writes its figures to ``<out>/rank<N>.json``: the RSS after imports (before the model is built),
the peak RSS of the process, the seconds of each step, and the parameter counts.
"""

from __future__ import annotations

import argparse
import os
import random
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import peft  # noqa: E402,F401  (imported before the baseline RSS is taken, as the engine needs it)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import transformers  # noqa: E402,F401
from transformers import AutoModelForCausalLM  # noqa: E402,F401

import areal_fsdp2.engine  # noqa: E402,F401
from areal_core.config import ActorConfig, OptimizerConfig, RunConfig, TrainConfig  # noqa: E402
from areal_core.registry import default_registry  # noqa: E402
from ranks import init_rank, rss_bytes, write_rank_result  # noqa: E402

BACKEND = "fsdp2"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--full-finetune", action="store_true")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--dtype", default="float32", help="dtype of the base weights as loaded")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step over all ranks")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    return parser.parse_args()


def step_sequences(step: int, batch: int, seq_len: int, vocab: int) -> list[list[int]]:
    """The step's whole batch (the same on every rank): random ids, bos first."""
    rng = random.Random(step)
    return [[1] + [rng.randrange(4, vocab) for _ in range(seq_len - 1)] for _ in range(batch)]


def mean_nll_loss(total_tokens: int):
    """Negative log-likelihood summed over tokens, divided by the batch's token count."""

    def loss_fn(logprobs, indices):
        return -torch.stack([lp.sum() for lp in logprobs]).sum() / total_tokens, {}

    return loss_fn


def main() -> None:
    args = parse_args()
    rank = init_rank()
    registry = default_registry()
    rss_after_imports, _ = rss_bytes()

    actor = ActorConfig(
        backend=BACKEND, path=args.model, device="cpu", dtype=args.dtype,
        full_finetune=args.full_finetune, lora_rank=args.lora_rank, lora_alpha=2 * args.lora_rank,
        gradient_checkpointing=args.checkpointing, optimizer=OptimizerConfig(lr=1e-5),
    )
    engine = registry.build_engine(BACKEND, RunConfig(actor=actor, train=TrainConfig(seed=1)))
    phases = {}  # (RSS, peak RSS) after each phase: where the peak comes from
    engine.load_base_model()
    phases["loaded"] = rss_bytes()
    registry.call("areal_inject_adapter", BACKEND, engine=engine, actor=actor)
    registry.call("areal_shard_model", BACKEND, engine=engine, actor=actor)
    phases["sharded"] = rss_bytes()
    parameters = list(engine.model.parameters())
    total = sum(p.numel() for p in parameters)  # a DTensor counts its global size
    trainable = sum(p.numel() for p in parameters if p.requires_grad)

    world = dist.get_world_size()
    seconds, grad_norms = [], []
    for step in range(args.warmup + args.steps):
        batch = step_sequences(step, args.batch, args.seq_len, engine.vocab_size)
        mine = batch[rank::world]
        loss_fn = mean_nll_loss(sum(len(s) - 1 for s in batch))
        dist.barrier()
        start = time.perf_counter()
        metrics = engine.train_step(mine, loss_fn)
        seconds.append(time.perf_counter() - start)
        grad_norms.append(metrics["grad_norm"])
        phases.setdefault("first_step", rss_bytes())
    _, peak = rss_bytes()
    engine.close()
    write_rank_result(args.out, rank, {
        "rss_after_imports": rss_after_imports, "peak_rss": peak, "step_seconds": seconds,
        "warmup": args.warmup, "grad_norms": grad_norms, "phases": phases,
        "parameters": total, "trainable_parameters": trainable,
    })
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
