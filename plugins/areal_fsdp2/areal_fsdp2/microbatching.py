"""Splitting a rank's sequences into micro-batches by a token budget, and checking them first."""

from __future__ import annotations

import numbers
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


def sequence_problem(sequences: Sequence[Sequence[int]], vocab_size: int) -> str | None:
    """What is wrong with ``sequences`` (None when every one is usable).

    Each must be a sequence of at least two token ids in ``[0, vocab_size)``.
    """
    for index, sequence in enumerate(sequences):
        if isinstance(sequence, (str, bytes)) or not hasattr(sequence, "__len__"):
            return f"sequence {index} is {type(sequence).__name__}, not a sequence of token ids"
        if len(sequence) < 2:
            return (
                f"sequence {index} has {len(sequence)} token(s); log-probabilities need at least "
                f"two tokens (a prefix and a next token)"
            )
        for token in sequence:
            is_id = isinstance(token, numbers.Integral) and not isinstance(token, bool)
            if not is_id or not 0 <= token < vocab_size:
                return (
                    f"sequence {index} holds token {token!r}, not an integer id in "
                    f"[0, {vocab_size}) (the model's vocabulary)"
                )
    return None
