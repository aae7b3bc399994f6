"""AdamW over the trainable parameters, and gradient clipping that is safe on every rank."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from areal_core.config import OptimizerConfig


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [param for param in model.parameters() if param.requires_grad]


def build_adamw(model: torch.nn.Module, config: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW over the (sharded) trainable parameters of ``model``."""
    return adamw(trainable_parameters(model), config)


def adamw(params: list[torch.nn.Parameter], config: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW over ``params`` (one adapter's) with ``config``'s settings."""
    return torch.optim.AdamW(
        params,
        lr=config.lr,
        betas=tuple(config.betas),
        eps=config.eps,
        weight_decay=config.weight_decay,
    )


def apply_hyperparameters(optimizer: torch.optim.Optimizer, config: OptimizerConfig) -> None:
    """Set lr, betas, eps and weight decay from ``config`` (the configuration wins on resume)."""
    for group in optimizer.param_groups:
        group.update(lr=config.lr, betas=tuple(config.betas), eps=config.eps,
                     weight_decay=config.weight_decay)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The rate of the coming step (``areal_core.lr_schedule``) on every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_grad_norm(
    params: list[torch.nn.Parameter], max_norm: float, device: torch.device
) -> float:
    """Global L2 norm of the gradients of ``params`` before clipping; scales them to ``max_norm``.

    Collective, and the same on every rank: each rank sums the squares of its own shards (a
    rank whose shard is empty, or that has no gradient at all, adds zero) and ONE all-reduce
    runs on every rank. ``max_norm <= 0`` only measures. A non-finite norm leaves the
    gradients unscaled (the caller skips the step).
    """
    squares = torch.zeros((), dtype=torch.float32, device=device)
    for param in params:
        grad = param.grad
        if grad is None:
            continue
        if isinstance(grad, DTensor):
            local = grad.to_local()
        elif dist.get_rank() == 0:
            local = grad  # a replicated (unsharded) gradient counts once
        else:
            continue
        squares += local.detach().float().pow(2).sum()
    dist.all_reduce(squares, op=dist.ReduceOp.SUM)
    total = math.sqrt(squares.item())
    if max_norm > 0 and math.isfinite(total) and total > max_norm:
        scale = max_norm / (total + 1e-6)
        for param in params:
            if param.grad is not None:
                param.grad.mul_(scale)
    return total
