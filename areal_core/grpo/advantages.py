"""From a batch's task rewards to one advantage per sample, as the reference system shapes them.

In order, with the settings under ``actor`` (docs/rl-options.md):

1. overlong penalty (DAPO, ``overlong_reward_penalty``): a completion of n tokens, with
   ``L = gconfig.max_new_tokens`` and ``c = overlong_tokens``, gets
   ``-overlong_penalty_factor * (n - (L - c)) / c`` added when ``n > L - c``: zero up to the
   last c tokens, then growing linearly to the whole factor at L;
2. ``(reward + reward_bias) * reward_scaling``, clipped to ``[-reward_clip, reward_clip]``;
3. ``reward_norm``: ``(x - mean) / (std + eps)`` over each prompt's group or the whole batch, per
   sample (``mean_level``/``std_level`` null: no centring / no scaling). group/group is GRPO;
   mean-centring alone (``std_level: null``) is Dr. GRPO's;
4. ``adv_norm``: the same over the batch's completion TOKENS (each sample weighs its length),
   as the reference system normalises its per-token advantages.

An outcome reward with no discount gives every token of a completion the same advantage, so an
advantage per sample is exact. The standard deviation divides by n (``std_unbiased: false``,
this project's default, so a group is scaled the same whatever its size) or by n - 1 (the
reference's and TRL's default).
"""

from __future__ import annotations

import math
from typing import Sequence

from areal_core.config import ActorConfig, NormConfig


def overlong_penalty(length: int, max_new_tokens: int, tokens: int, factor: float) -> float:
    """DAPO's soft penalty of a completion of ``length`` tokens (0 or negative)."""
    over = length - (max_new_tokens - tokens)
    return -factor * min(over, tokens) / tokens if over > 0 else 0.0


def _moments(values, keys, weights, unbiased: bool) -> dict:
    """``key -> (weighted mean, weighted std)`` of the values sharing each key."""
    groups: dict = {}
    for key, x, w in zip(keys, values, weights):
        groups.setdefault(key, []).append((x, w))
    out = {}
    for key, members in groups.items():
        total = sum(w for _, w in members)
        mean = sum(w * x for x, w in members) / total if total > 0 else 0.0
        denominator = total - 1 if unbiased else total
        second = sum(w * (x - mean) ** 2 for x, w in members)
        out[key] = (mean, math.sqrt(second / denominator) if denominator > 0 else 0.0)
    return out


def normalise(values: Sequence[float], groups: Sequence[int], weights: Sequence[float],
              norm: NormConfig) -> list[float]:
    """``(x - mean) / (std + eps)`` of ``values`` with ``weights``, within each group id in
    ``groups`` (level ``group``) or over all (level ``batch``); a level of None skips that part."""

    def keys(level: str) -> list:
        return list(groups) if level == "group" else [0] * len(values)

    out = list(values)
    if norm.mean_level is not None:
        k = keys(norm.mean_level)
        stats = _moments(values, k, weights, norm.std_unbiased)
        out = [x - stats[key][0] for x, key in zip(values, k)]
    if norm.std_level is not None:
        k = keys(norm.std_level)
        stats = _moments(values, k, weights, norm.std_unbiased)
        out = [x / (stats[key][1] + norm.eps) for x, key in zip(out, k)]
    return out


def shaped_rewards(rewards: Sequence[float], lengths: Sequence[int], actor: ActorConfig,
                   max_new_tokens: int) -> list[float]:
    """Steps 1 and 2 of the module docstring, per sample."""
    out = []
    for reward, length in zip(rewards, lengths):
        if actor.overlong_reward_penalty:
            reward += overlong_penalty(length, max_new_tokens, actor.overlong_tokens,
                                       actor.overlong_penalty_factor)
        reward = (reward + actor.reward_bias) * actor.reward_scaling
        out.append(min(max(reward, -actor.reward_clip), actor.reward_clip))
    return out


def batch_advantages(rewards: list[list[float]], lengths: list[list[int]], actor: ActorConfig,
                     max_new_tokens: int) -> list[list[float]]:
    """The advantage of every sample of every group (same nesting as ``rewards``)."""
    flat_rewards = [r for group in rewards for r in group]
    flat_lengths = [n for group in lengths for n in group]
    groups = [g for g, group in enumerate(rewards) for _ in group]
    values = shaped_rewards(flat_rewards, flat_lengths, actor, max_new_tokens)
    if actor.reward_norm is not None:
        values = normalise(values, groups, [1.0] * len(values), actor.reward_norm)
    if actor.adv_norm is not None:
        values = normalise(values, groups, [float(n) for n in flat_lengths], actor.adv_norm)
    out, start = [], 0
    for group in rewards:
        out.append(values[start:start + len(group)])
        start += len(group)
    return out

