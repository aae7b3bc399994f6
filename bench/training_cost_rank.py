"""One rank of a training-cost launch (started by ``training_cost.py`` through ``ranks.py``).

Builds one fsdp2 engine per configuration of ``--configs`` through the hooks (load, inject,
shard), as the GRPO loop builds it, then runs rounds of optimisation steps on random token
sequences: every round takes one step of each engine, in an order reversed every other round, so
the configurations share the machine's conditions. Writes ``<out>/rank<N>.json``: the RSS after
imports (before any model is built), the peak RSS of the process, the RSS after each phase
(a launch of one configuration measures its memory), and the seconds of every step.
"""

from __future__ import annotations

import argparse
import json
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
from areal_core.process_exit import exit_now  # noqa: E402
from areal_core.registry import default_registry  # noqa: E402
from ranks import init_rank, rss_bytes, write_rank_result  # noqa: E402

BACKEND = "fsdp2"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--configs", required=True,
                        help='JSON list of {"name", "full_finetune", "lora_rank", "dtype", "checkpointing"}')
    parser.add_argument("--batch", type=int, default=4, help="sequences per step over all ranks")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=4, help="steps of each configuration")
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


def build_engine(registry, model: str, config: dict):
    actor = ActorConfig(
        backend=BACKEND, path=model, device="cpu", dtype=config["dtype"],
        full_finetune=config["full_finetune"], lora_rank=config["lora_rank"],
        lora_alpha=2 * config["lora_rank"], gradient_checkpointing=config["checkpointing"],
        optimizer=OptimizerConfig(lr=1e-5),
    )
    engine = registry.build_engine(BACKEND, RunConfig(actor=actor, train=TrainConfig(seed=1)))
    engine.load_base_model()
    registry.call("areal_inject_adapter", BACKEND, engine=engine, actor=actor)
    registry.call("areal_shard_model", BACKEND, engine=engine, actor=actor)
    return engine


def main() -> None:
    args = parse_args()
    configs = json.loads(args.configs)
    rank = init_rank()
    registry = default_registry()
    rss_after_imports, _ = rss_bytes()
    phases = {}  # (RSS, peak RSS) after each phase: where a single configuration's peak comes from
    engines = []
    for config in configs:
        engines.append(build_engine(registry, args.model, config))
        phases[f"built {config['name']}"] = rss_bytes()
    counts = {c["name"]: (sum(p.numel() for p in e.model.parameters()),  # a DTensor counts its global size
                          sum(p.numel() for p in e.model.parameters() if p.requires_grad))
              for c, e in zip(configs, engines)}

    world = dist.get_world_size()
    seconds = {config["name"]: [] for config in configs}
    order = list(zip(configs, engines))
    for step in range(args.rounds):
        for config, engine in (order if step % 2 == 0 else order[::-1]):
            batch = step_sequences(step, args.batch, args.seq_len, engine.vocab_size)
            loss_fn = mean_nll_loss(sum(len(s) - 1 for s in batch))
            dist.barrier()
            start = time.perf_counter()
            engine.train_step(batch[rank::world], loss_fn)
            seconds[config["name"]].append(time.perf_counter() - start)
        phases.setdefault("first round", rss_bytes())
    _, peak = rss_bytes()
    for engine in engines:
        engine.close()
    write_rank_result(args.out, rank, {
        "rss_after_imports": rss_after_imports, "peak_rss": peak, "phases": phases,
        "step_seconds": seconds,
        "parameters": {name: total for name, (total, _) in counts.items()},
        "trainable_parameters": {name: trainable for name, (_, trainable) in counts.items()},
    })
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_now(0)  # see areal_core.process_exit: the teardown can abort after gloo
