"""One forward pass over a micro-batch: padded token ids in, logits and per-token log-probs out."""

from __future__ import annotations

from typing import Sequence

import torch

from areal_fsdp2.logprob_head import LogprobHead


def pad_right(
    sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of shape ``[batch, longest]``, padded on the right.

    Right padding keeps every real token at position ``0..len-1``, so the default position ids
    are right and padding never influences a real token under causal attention.
    """
    longest = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.as_tensor(list(sequence), dtype=torch.long)
        mask[row, : len(sequence)] = 1
    return input_ids.to(device), mask.to(device)


def forward_logits(
    model: torch.nn.Module, sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> torch.Tensor:
    """The model's logits ``[batch, longest, vocab]`` for the right-padded ``sequences``."""
    input_ids, mask = pad_right(sequences, pad_id, device)
    return model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits


def next_token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """``[batch, longest - 1]`` float32: element t is log p(token t+1 | tokens 0..t)."""
    shifted = logits[:, :-1, :].float()
    targets = input_ids[:, 1:].unsqueeze(-1)
    return shifted.gather(-1, targets).squeeze(-1) - torch.logsumexp(shifted, dim=-1)


def sequence_logprobs(
    model: torch.nn.Module,
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    device: torch.device,
    head: LogprobHead | None = None,
) -> list[torch.Tensor]:
    """One 1-D float32 tensor of length ``len(seq) - 1`` per sequence (on ``device``).

    With ``head`` (the model's installed ``LogprobHead``) the whole logits are never built.
    Keeps the autograd graph when gradients are enabled.
    """
    input_ids, mask = pad_right(sequences, pad_id, device)
    if head is None:
        logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
        logprobs = next_token_logprobs(logits, input_ids)
    else:
        with head.scoring(input_ids[:, 1:]):
            logprobs = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
    return [logprobs[row, : len(sequence) - 1] for row, sequence in enumerate(sequences)]
