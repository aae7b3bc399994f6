"""Checking a rank's sequences before they are micro-batched (the plan is areal_core.microbatching)."""

from __future__ import annotations

import numbers
from typing import Sequence



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
