"""Micro-batches by token budget: the plan every engine uses (pure Python, no torch)."""

from __future__ import annotations

from typing import Sequence


def plan_microbatches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices of the sequences of each micro-batch, in the given order.

    A micro-batch is right-padded to its longest sequence, so its cost is
    ``count * longest``; sequences are added while that stays within ``max_tokens``. A
    sequence longer than the budget on its own gets a micro-batch of its own (it cannot be
    split). Returns ``[]`` for no sequences.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 (got {max_tokens})")
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for index, length in enumerate(lengths):
        widened = max(longest, length)
        if current and (len(current) + 1) * widened > max_tokens:
            batches.append(current)
            current, widened = [], length
        current.append(index)
        longest = widened
    if current:
        batches.append(current)
    return batches
