"""Group-normalised advantages: each sample against the other samples of its prompt."""

from __future__ import annotations

import statistics


def group_advantages(rewards: list[float], eps: float = 1e-4) -> list[float]:
    """``(r - mean) / (std + eps)`` within one group; all-equal rewards give all zeros.

    The population standard deviation is used, so a group of n samples is normalised the same
    way whatever n is.
    """
    if not rewards:
        return []
    mean = statistics.fmean(rewards)
    std = statistics.pstdev(rewards)
    return [(r - mean) / (std + eps) for r in rewards]
