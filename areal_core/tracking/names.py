"""The names trackers show for the scalars of ``metrics.jsonl``, grouped by phase.

One table (docs/tracking.md prints it): an exact name first, then the first matching prefix or
suffix rule. A key no rule knows goes under ``other/`` (a test keeps the loop's own keys out of
it). Several adapters' figures carry their adapter's name in front: ``<adapter>/reward/mean``.
"""

from __future__ import annotations

import math

EXACT = {
    "reward_mean": "reward/mean",
    "accuracy": "reward/accuracy",
    "eval_accuracy": "eval/accuracy",
    "eval_seconds": "timing/eval",
    "loss": "train/loss",
    "kl": "train/kl",
    "grad_norm": "train/grad_norm",
    "lr": "train/lr",
    "updates_skipped": "train/updates_skipped",
    "clip_fraction": "train/clip_fraction",
    "dual_clip_fraction": "train/dual_clip_fraction",
    "ratio_mean": "train/ratio_mean",
    "behav_weight_mean": "train/behav_weight_mean",
    "behav_capped_fraction": "train/behav_capped_fraction",
    "version": "progress/version",
    "data_position": "progress/data_position",
    "published": "progress/published",
    "num_samples": "rollout/num_samples",
    "dropped_groups": "rollout/dropped_groups",
    "refill_rounds": "rollout/refill_rounds",
    "dynamic_sampling_short": "rollout/dynamic_sampling_short",
    "server_recoveries": "rollout/server_recoveries",
    "adapter_bytes": "sync/adapter_bytes",
}

#: (prefix or suffix of the key, group): the key loses the prefix or suffix and joins the group.
PREFIXES = (("mismatch_", "mismatch/"), ("agreement_", "agreement/"), ("reward_", "reward/"))
SUFFIXES = (("_seconds", "timing/"), ("_at", "clock/"))
FALLBACK = "other/"

#: Keys of metrics.jsonl that are not figures: the step axis itself.
NOT_SENT = frozenset({"step"})


def tracker_name(key: str, adapter: str | None = None) -> str:
    """The tracker's name for metrics.jsonl key ``key`` (of adapter ``adapter``, if several)."""
    name = EXACT.get(key)
    if name is None:
        name = next((group + key[len(p):] for p, group in PREFIXES if key.startswith(p)), None)
    if name is None:
        name = next((group + key[: -len(s)] for s, group in SUFFIXES if key.endswith(s)), None)
    if name is None:
        name = FALLBACK + key
    return f"{adapter}/{name}" if adapter else name


def scalars(record: dict, adapter: str | None = None) -> dict[str, float]:
    """The record's scalar figures under their tracker names: numbers and booleans (as 0/1);
    lists, strings, nulls and non-finite numbers are left out (trackers take finite floats)."""
    out = {}
    for key, value in record.items():
        if key in NOT_SENT or value is None or isinstance(value, (str, list, dict)):
            continue
        if isinstance(value, (bool, int, float)) and math.isfinite(float(value)):
            out[tracker_name(key, adapter)] = float(value)
    return out
