"""The GRPO objective handed to ``Engine.train_step``: PPO-clip over completion tokens, plus KL.

Token-mean normalisation over the whole global batch: each micro-batch's loss is its tokens'
summed loss divided by the number of completion tokens in the batch across all ranks, so the
micro-batch losses of every rank add up to the batch mean.
"""

from __future__ import annotations

from typing import Sequence

from areal_core.grpo.batch import TrainItem
from areal_core.grpo.mismatch import MismatchMeter


def make_grpo_loss(
    items: Sequence[TrainItem],
    *,
    total_tokens: int,
    clip: float,
    kl_coef: float = 0.0,
    reference_logprobs: Sequence | None = None,
    mismatch: "MismatchMeter | None" = None,
    mismatch_version: int | None = None,
):
    """A ``LossFn`` over ``items`` (this rank's share, in the order given to train_step).

    ``reference_logprobs[i]`` (base-model log-probabilities of item i's whole sequence, from
    ``compute_logprobs(..., disable_adapter=True)``) is needed when ``kl_coef > 0``; the KL term is
    the k3 estimator ``exp(ref - new) - (ref - new) - 1`` per token. ``mismatch`` (a
    ``MismatchMeter``) is fed the completion tokens of the items ``mismatch_version`` produced.
    """
    import torch

    if kl_coef > 0 and reference_logprobs is None:
        raise ValueError("kl_coef > 0 needs the reference log-probabilities")

    def loss_fn(logprobs: list, indices: list[int]):
        total = logprobs[0].new_zeros(()) if logprobs else torch.zeros(())
        clipped = kl_sum = ratio_sum = 0.0
        for lp, index in zip(logprobs, indices):
            item = items[index]
            new = lp[item.prompt_len - 1:]
            old = torch.tensor(item.behaviour_logprobs, dtype=new.dtype, device=new.device)
            if mismatch is not None and item.version == mismatch_version:
                mismatch.add(new, old)
            ratio = torch.exp(new - old)
            advantage = item.advantage
            unclipped = ratio * advantage
            bounded = torch.clamp(ratio, 1.0 - clip, 1.0 + clip) * advantage
            per_token = -torch.minimum(unclipped, bounded)
            if kl_coef > 0:
                ref = reference_logprobs[index][item.prompt_len - 1:].to(new.device, new.dtype)
                delta = ref - new
                kl = torch.exp(delta) - delta - 1.0
                per_token = per_token + kl_coef * kl
                kl_sum += float(kl.detach().sum())
            total = total + per_token.sum() / total_tokens
            clipped += float((bounded != unclipped).sum())
            ratio_sum += float(ratio.detach().sum())
        metrics = {
            "loss": float(total.detach()),
            "clip_fraction": clipped / total_tokens,
            "kl": kl_sum / total_tokens,
            "ratio_mean": ratio_sum / total_tokens,
        }
        return total, metrics

    return loss_fn
