"""The training-inference mismatch of every step, from the training pass itself.

On the completion tokens that the trainer's current version produced, ``d = trainer - server``
per token: the trainer's log-probability from the training forward (before the update) against
the behaviour log-probability the server reported while sampling. No extra forward pass: the
loss function feeds the meter the log-probabilities it already has. The keys in
``metrics.jsonl``:

    mismatch_mean_abs, mismatch_max_abs   mean and max of |d|
    mismatch_kl                           k3 estimate of KL(server || trainer): mean of exp(d) - 1 - d
    mismatch_ratio_outside                share of tokens whose exp(d) leaves [0.8, 1.25]
    mismatch_tokens                       tokens compared

A step with no token of the current version (asynchronous rollouts) has the first four null and
``mismatch_tokens`` 0. This is the figure verl, AReaL and slime users watch.
"""

from __future__ import annotations

import math

RATIO_BAND = (0.8, 1.25)
KEYS = ("mismatch_mean_abs", "mismatch_max_abs", "mismatch_kl", "mismatch_ratio_outside")


class MismatchMeter:
    """Sums over this rank's micro-batches; ``sums()``/``maxima()`` go through the collectives."""

    def __init__(self):
        self.tokens = 0
        self.abs_sum = 0.0
        self.kl_sum = 0.0
        self.outside = 0
        self.max_abs = 0.0

    def add(self, trainer, server) -> None:
        """``trainer`` and ``server``: 1-D tensors of the same completion tokens."""
        d = (trainer.detach().double() - server.detach().double())
        if d.numel() == 0:
            return
        ratio = d.exp()
        self.tokens += d.numel()
        self.abs_sum += float(d.abs().sum())
        self.kl_sum += float((ratio - 1.0 - d).sum())
        self.outside += int(((ratio < RATIO_BAND[0]) | (ratio > RATIO_BAND[1])).sum())
        self.max_abs = max(self.max_abs, float(d.abs().max()))

    def sums(self) -> dict[str, float]:
        return {"mismatch_tokens": float(self.tokens), "mismatch_abs_sum": self.abs_sum,
                "mismatch_kl_sum": self.kl_sum, "mismatch_outside": float(self.outside)}


def mismatch_metrics(sums: dict[str, float], max_abs: float) -> dict:
    """The metrics.jsonl keys from the sums over every rank and the largest |d| of any rank."""
    tokens = int(sums["mismatch_tokens"])
    if tokens == 0:
        return {**{key: None for key in KEYS}, "mismatch_tokens": 0}
    return {
        "mismatch_mean_abs": sums["mismatch_abs_sum"] / tokens,
        "mismatch_max_abs": max_abs if math.isfinite(max_abs) else None,
        "mismatch_kl": sums["mismatch_kl_sum"] / tokens,
        "mismatch_ratio_outside": sums["mismatch_outside"] / tokens,
        "mismatch_tokens": tokens,
    }
