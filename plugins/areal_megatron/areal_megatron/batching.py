"""Checked sequences, padded inputs for megatron-core, and per-token log-probabilities.

The micro-batch plan is the core's (``areal_core.microbatching``).
"""

from __future__ import annotations

from typing import Sequence

import torch


def check_sequences(sequences: Sequence[Sequence[int]], vocab_size: int, max_len: int) -> list[list[int]]:
    """Plain lists of token ids; ValueError names the first sequence that cannot be scored."""
    out = []
    for i, seq in enumerate(sequences):
        seq = [int(t) for t in seq]
        if len(seq) < 2:
            raise ValueError(f"sequence {i} has {len(seq)} token(s); log-probabilities need at least 2")
        if len(seq) > max_len:
            raise ValueError(f"sequence {i} has {len(seq)} tokens, more than the model's "
                             f"max_position_embeddings={max_len}")
        bad = [t for t in seq if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"sequence {i} holds token id {bad[0]} outside the vocabulary [0, {vocab_size})")
        out.append(seq)
    return out


def model_inputs(sequences: list[list[int]], device: torch.device, pad_id: int = 0):
    """``(input_ids [b, s], position_ids [b, s], attention_mask [1, 1, s, s])`` for GPTModel.

    Sequences are right-padded; the causal mask (True = masked) alone suffices, since a real
    token never attends to the padding that follows it.
    """
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    positions = torch.arange(length, dtype=torch.long).unsqueeze(0).expand(len(sequences), -1)
    mask = torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)[None, None]
    return ids.to(device), positions.to(device), mask.to(device)


def token_logprobs(logits: torch.Tensor, sequences: list[list[int]], vocab_size: int) -> list[torch.Tensor]:
    """log p(token t+1 | tokens <= t) of each sequence, float32, from logits ``[b, s, V_padded]``."""
    out = []
    for row, seq in enumerate(sequences):
        n = len(seq)
        scores = logits[row, : n - 1, :vocab_size].float()
        targets = torch.tensor(seq[1:], dtype=torch.long, device=logits.device)
        out.append(torch.log_softmax(scores, dim=-1).gather(-1, targets[:, None]).squeeze(-1))
    return out
