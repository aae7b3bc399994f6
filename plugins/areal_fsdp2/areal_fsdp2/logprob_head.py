"""The output layer computing per-token log-probabilities in chunks, never the whole logits.

A ``[batch, tokens, vocab]`` float32 logits tensor and its gradient are the largest activations
of a small-to-mid model (2 x 256 tokens x 32k vocab is 65 MB, and the log-softmax and its
backward hold three or four such tensors). ``LogprobHead`` replaces the model's ``lm_head``
(same Parameter objects, so names and weight tying are unchanged): while ``targets`` are set it
returns ``log p(target)`` for each position, computing the logits a chunk of tokens at a time,
and with ``recompute`` (gradient checkpointing) it keeps only the chunk's hidden states for the
backward pass, recomputing the chunk's logits there. Without targets it is the plain linear
layer, so ``forward_logits`` and generation-style calls see real logits.

It is installed only on architectures whose forward returns ``lm_head``'s output untouched
(no soft-capping or logit scaling) and only when ``lm_head`` is a plain ``nn.Linear`` (not a
LoRA-wrapped one); elsewhere the engine computes log-probabilities from full logits.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils.checkpoint import checkpoint

#: Causal-LM classes whose forward is ``logits = self.lm_head(hidden_states[:, slice])``.
PLAIN_HEAD_ARCHITECTURES = frozenset(
    {"LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM"}
)
#: Logit elements per chunk: 2M float32 values, 8 MB (64 tokens of a 32k vocabulary).
CHUNK_ELEMENTS = 1 << 21


class LogprobHead(torch.nn.Linear):
    """``nn.Linear`` that, while ``targets`` are set, returns their log-probabilities."""

    def __init__(self, linear: torch.nn.Linear, *, recompute: bool):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.recompute = recompute
        self.targets: torch.Tensor | None = None

    @contextlib.contextmanager
    def scoring(self, targets: torch.Tensor):
        """Within the block, forward passes return ``[batch, positions]`` log-probabilities of
        ``targets`` (``[batch, positions]``, aligned with the hidden states it receives)."""
        self.targets = targets
        try:
            yield
        finally:
            self.targets = None

    def _chunk_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = torch.nn.functional.linear(hidden, self.weight, self.bias).float()
        picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return picked - torch.logsumexp(logits, dim=-1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.targets is None:
            return super().forward(hidden)
        batch, positions = self.targets.shape
        flat_hidden = hidden[:, :positions].reshape(batch * positions, -1)
        flat_targets = self.targets.reshape(-1)
        step = max(1, CHUNK_ELEMENTS // self.out_features)
        pieces = []
        for start in range(0, flat_targets.numel(), step):
            chunk = (flat_hidden[start: start + step], flat_targets[start: start + step])
            if self.recompute and torch.is_grad_enabled():
                pieces.append(checkpoint(self._chunk_logprobs, *chunk, use_reentrant=False))
            else:
                pieces.append(self._chunk_logprobs(*chunk))
        # A copy, not a view: FSDP2 cannot hook an in-place change of a view it returned.
        return torch.cat(pieces).view(batch, positions).clone()


def install(hf_model: torch.nn.Module, *, recompute: bool) -> LogprobHead | None:
    """Replace ``hf_model``'s output layer by a ``LogprobHead``; None where it cannot be."""
    if type(hf_model).__name__ not in PLAIN_HEAD_ARCHITECTURES:
        return None
    head = hf_model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:  # noqa: E721  (a subclass or LoRA wrapper differs)
        return None
    replacement = LogprobHead(head, recompute=recompute)
    hf_model.set_output_embeddings(replacement)
    return replacement
