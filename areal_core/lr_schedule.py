"""The learning rate of every optimizer step: warm-up, then constant, linear or cosine decay.

The rate is a pure function of the optimizer step's index k (0, 1, ..., N - 1, counted over the
whole run), with N = ``train.steps`` x ``actor.ppo_n_minibatches``. The schedule's only state is
k, the engine's optimizer-step count, which its checkpoint holds: a resumed run continues the
schedule exactly.

    W = ceil(warmup_steps_proportion x N)         warm-up steps
    k < W:   lr (k + 1) / W                       (the first step already moves; W = 1 is no warm-up)
    k >= W:  t = (k - W) / max(N - W, 1)          in [0, 1)
             constant  lr
             linear    lr (m + (1 - m) (1 - t))
             cosine    lr (m + (1 - m) (1 + cos(pi t)) / 2)      m = min_lr_ratio

These are the reference system's settings (``actor.optimizer.lr_scheduler_type``,
``warmup_steps_proportion``, ``min_lr_ratio``) with Hugging Face's curves, except that warm-up
starts at lr / W instead of 0, so no step is spent at a zero rate.
"""

from __future__ import annotations

import math

from areal_core.config import OptimizerConfig, RunConfig


def total_optimizer_steps(config: RunConfig) -> int:
    """N: the optimizer steps of the whole run."""
    return config.train.steps * config.actor.ppo_n_minibatches


def warmup_steps(optimizer: OptimizerConfig, total: int) -> int:
    return math.ceil(optimizer.warmup_steps_proportion * total - 1e-9) if total > 0 else 0


def learning_rate(optimizer: OptimizerConfig, step: int, total: int) -> float:
    """The rate of optimizer step ``step`` (0-based) of ``total``."""
    warmup = warmup_steps(optimizer, total)
    if step < warmup:
        return optimizer.lr * (step + 1) / warmup
    kind = optimizer.lr_scheduler_type
    if kind == "constant":
        return optimizer.lr
    t = min((step - warmup) / max(total - warmup, 1), 1.0)
    m = optimizer.min_lr_ratio
    if kind == "linear":
        return optimizer.lr * (m + (1.0 - m) * (1.0 - t))
    if kind == "cosine":
        return optimizer.lr * (m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * t)))
    raise ValueError(f"unknown lr_scheduler_type {kind!r}; use constant, linear or cosine")
