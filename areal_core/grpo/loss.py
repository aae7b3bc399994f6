"""The GRPO objective handed to ``Engine.train_step``: a clipped policy gradient over completion
tokens, plus an optional KL to the base policy. Settings and their reference-system names in
docs/rl-options.md.

Three log-probabilities of each completion token may meet here:

    behaviour  the server's, reported while it sampled the token (any version in the window)
    proximal   the trainer's, before this batch's update (``recompute_logprob``; one extra forward)
    new        the trainer's, in this training forward (it carries the gradient)

The ratio is ``exp(new - old)`` with ``old`` the proximal log-probability when the trainer
recomputed it, else the behaviour one. With ``use_decoupled_loss`` (the reference system's
decoupled PPO) each token's clipped term is also weighted by ``exp(proximal - behaviour)``: the
importance weight that corrects for sampling by a stale version or by a server whose arithmetic
differs from the trainer's. A token whose weight exceeds ``behav_imp_weight_cap`` is dropped (it
weighs 0 but still counts in the normaliser), as the reference system does: such a token is one
the two policies disagree on by more than the cap allows, and truncating its weight to the cap
(verl's and slime's truncated importance sampling) would still put the largest weight any token
may have on the token the sample is least trustworthy about. Keeping the reference's rule also
keeps its recipes' cap values meaning the same here.

Per token, with advantage A and ratio r::

    pg = max(-A r, -A clip(r, 1 - eps_clip, 1 + eps_clip_higher))    (eps_clip_higher: eps_clip)
    pg = min(pg, -c_clip A)                      where A < 0 (dual clip; c_clip > 1)
    loss_t = w pg + kl_ctl (exp(ref - new) - (ref - new) - 1)         (k3 KL; w: behaviour weight)

Aggregation (``loss_agg_mode``): every token's loss is multiplied by its sequence's share of the
batch loss, so the micro-batch losses of every rank add up to the batch loss:

    token-mean               1 / T            T: completion tokens of the (mini)batch, all ranks
    seq-mean-token-mean      1 / (N n_i)      N: its sequences, n_i: this sequence's tokens (GRPO)
    seq-mean-token-sum-norm  1 / (N L)        L: gconfig.max_new_tokens (Dr. GRPO's constant)
"""

from __future__ import annotations

from typing import Sequence

import attrs

from areal_core.grpo.batch import TrainItem
from areal_core.grpo.mismatch import MismatchMeter

#: The sums each loss call reports, over this rank's tokens; the loop adds them over minibatches
#: and ranks and divides by the tokens (``objective_metrics``).
STAT_KEYS = ("tokens", "clipped", "dual_clipped", "ratio_sum", "kl_sum", "behav_weight_sum",
             "behav_kept", "behav_capped")


@attrs.frozen
class Objective:
    """The loss's settings, from ``actor`` (see the module docstring)."""

    eps_clip: float = 0.2
    eps_clip_higher: float | None = None
    c_clip: float | None = None
    kl_ctl: float = 0.0
    use_decoupled_loss: bool = False
    behav_imp_weight_cap: float | None = None
    loss_agg_mode: str = "token-mean"

    @classmethod
    def from_actor(cls, actor) -> "Objective":
        return cls(eps_clip=actor.eps_clip, eps_clip_higher=actor.eps_clip_higher, c_clip=actor.c_clip,
                   kl_ctl=actor.kl_ctl, use_decoupled_loss=actor.use_decoupled_loss,
                   behav_imp_weight_cap=actor.behav_imp_weight_cap, loss_agg_mode=actor.loss_agg_mode)


def sequence_scales(lengths: Sequence[int], mode: str, max_new_tokens: int) -> list[float]:
    """Each sequence's per-token factor under ``mode``, for the (mini)batch whose completion
    lengths (over every rank) are ``lengths``."""
    total, count = sum(lengths), len(lengths)
    if mode == "token-mean":
        return [1.0 / max(total, 1)] * count
    if mode == "seq-mean-token-mean":
        return [1.0 / (count * max(n, 1)) for n in lengths]
    if mode == "seq-mean-token-sum-norm":
        return [1.0 / (count * max_new_tokens)] * count
    raise ValueError(f"unknown loss_agg_mode {mode!r}")


def token_losses(new, behaviour, advantage, objective: Objective, proximal=None, reference=None):
    """Per-token loss of one sequence's completion tokens (1-D tensors of equal length) and the
    sums of ``STAT_KEYS`` (floats). ``advantage``: a float or a tensor of per-token values."""
    import torch

    behaviour = behaviour.to(new.dtype)
    if proximal is None:
        old, weight = behaviour, None
    else:
        proximal = proximal.to(new.dtype)
        old = proximal
        weight = torch.exp(proximal - behaviour) if objective.use_decoupled_loss else None
    advantage = torch.as_tensor(advantage, dtype=new.dtype, device=new.device).expand_as(new)
    ratio = torch.exp(new - old)
    upper = objective.eps_clip if objective.eps_clip_higher is None else objective.eps_clip_higher
    unclipped = -advantage * ratio
    clipped = -advantage * torch.clamp(ratio, 1.0 - objective.eps_clip, 1.0 + upper)
    pg = torch.maximum(unclipped, clipped)
    clip_active = clipped > unclipped
    dual_active = torch.zeros_like(clip_active)
    if objective.c_clip is not None:
        floor = -objective.c_clip * advantage
        dual_active = (advantage < 0) & (pg > floor)
        pg = torch.where(dual_active, floor, pg)
    stats = {key: 0.0 for key in STAT_KEYS}
    if weight is not None:
        keep = torch.ones_like(weight, dtype=torch.bool)
        if objective.behav_imp_weight_cap is not None:
            keep = weight <= objective.behav_imp_weight_cap
        weight = torch.where(keep, weight, torch.zeros_like(weight))
        pg = pg * weight
        stats["behav_weight_sum"] = float(weight.sum())
        stats["behav_kept"] = float(keep.sum())
        stats["behav_capped"] = float((~keep).sum())
    loss = pg
    if objective.kl_ctl > 0:
        if reference is None:
            raise ValueError("kl_ctl > 0 needs the reference log-probabilities")
        delta = reference.to(new.dtype) - new
        kl = torch.exp(delta) - delta - 1.0
        loss = loss + objective.kl_ctl * kl
        stats["kl_sum"] = float(kl.detach().sum())
    stats["tokens"] = float(new.numel())
    stats["clipped"] = float(clip_active.sum())
    stats["dual_clipped"] = float(dual_active.sum())
    stats["ratio_sum"] = float(ratio.detach().sum())
    return loss, stats


def make_grpo_loss(
    items: Sequence[TrainItem],
    *,
    objective: Objective,
    scales: Sequence[float],
    proximal: Sequence | None = None,
    reference: Sequence | None = None,
    mismatch: MismatchMeter | None = None,
    mismatch_version: int | None = None,
):
    """A ``LossFn`` over ``items`` (this rank's share of one (mini)batch, in the order given to
    train_step). ``scales[i]``: item i's per-token factor (``sequence_scales``). ``proximal[i]``
    and ``reference[i]``: the trainer's pre-update and base-model (adapter disabled)
    log-probabilities of item i's whole sequence. ``mismatch`` is fed, on the items
    ``mismatch_version`` produced, the trainer's pre-update log-probabilities against the
    server's: the proximal ones when there are, else those of this forward (one minibatch).
    """
    import torch

    if objective.kl_ctl > 0 and reference is None:
        raise ValueError("kl_ctl > 0 needs the reference log-probabilities")

    def loss_fn(logprobs: list, indices: list[int]):
        total = logprobs[0].new_zeros(()) if logprobs else torch.zeros(())
        sums = {key: 0.0 for key in STAT_KEYS}
        for lp, index in zip(logprobs, indices):
            item = items[index]
            start = item.prompt_len - 1
            new = lp[start:]
            behaviour = torch.tensor(item.behaviour_logprobs, dtype=new.dtype, device=new.device)
            prox = proximal[index][start:].to(new.device) if proximal is not None else None
            ref = reference[index][start:].to(new.device) if reference is not None else None
            if mismatch is not None and item.version == mismatch_version:
                mismatch.add(prox if prox is not None else new, behaviour)
            per_token, stats = token_losses(new, behaviour, item.advantage, objective, prox, ref)
            total = total + per_token.sum() * scales[index]
            for key, value in stats.items():
                sums[key] += value
        return total, sums  # the engine reports the loss itself (summed over micro-batches)

    return loss_fn


def objective_metrics(sums: dict[str, float], decoupled: bool) -> dict:
    """The metrics.jsonl keys from the ``STAT_KEYS`` sums over every minibatch and rank."""
    tokens = max(sums["tokens"], 1.0)
    metrics = {
        "clip_fraction": sums["clipped"] / tokens,
        "dual_clip_fraction": sums["dual_clipped"] / tokens,
        "ratio_mean": sums["ratio_sum"] / tokens,
        "kl": sums["kl_sum"] / tokens,
    }
    if decoupled:
        metrics["behav_weight_mean"] = sums["behav_weight_sum"] / max(sums["behav_kept"], 1.0)
        metrics["behav_capped_fraction"] = sums["behav_capped"] / tokens
    return metrics
