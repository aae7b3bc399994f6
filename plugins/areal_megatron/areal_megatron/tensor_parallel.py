"""How each megatron-core tensor is split across tensor-parallel ranks, and put back together.

One rule per tensor name, for the base weights and the LoRA adapter alike ("like the base
weight", as megatron-bridge does):

- ``column``: split along dim 0 in contiguous chunks (linear_qkv weight and bias, whose chunks
  are whole query groups; LoRA A of a column-parallel layer, split along the rank; LoRA B of a
  row-parallel layer, whose output is gathered);
- ``gate_up``: linear_fc1's ``[gate; up]``, each rank holding ``[gate_r; up_r]`` (also its LoRA B);
- ``row``: split along dim 1 (linear_proj and linear_fc2 weights; LoRA A of those layers);
- ``vocab``: the embedding and output layer, split along the vocabulary, padded with zero rows to
  a multiple of the TP size (the padded logits are cut off before any softmax);
- ``replicated``: norms, held whole by every rank.
"""

from __future__ import annotations

import torch

from areal_megatron.models import fused_layout

COLUMN, ROW, GATE_UP, VOCAB, REPLICATED = "column", "row", "gate_up", "vocab", "replicated"


def padded_vocab_size(vocab_size: int, tp_size: int) -> int:
    return -(-vocab_size // tp_size) * tp_size


def partition_rule(name: str) -> str:
    """The split rule of a megatron-core tensor (base weight or LoRA parameter) by its name."""
    if name.startswith(("embedding.word_embeddings.", "output_layer.")):
        return VOCAB
    if ".adapter" in name:
        column_base = ".linear_qkv." in name or ".linear_fc1." in name
        if name.endswith("linear_in.weight"):
            return COLUMN if column_base else ROW
        if ".linear_fc1.adapter.linear_out" in name:  # the fused adapter's B, [gate; up]
            return GATE_UP
        return COLUMN
    if ".linear_fc1." in name:
        return GATE_UP
    if ".linear_qkv." in name:
        return COLUMN
    if ".linear_proj." in name or ".linear_fc2." in name:
        return ROW
    return REPLICATED


def shard(name: str, tensor: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """This rank's part of a whole-model tensor."""
    rule = partition_rule(name)
    if size == 1 or rule == REPLICATED:
        return tensor
    if rule == VOCAB:
        padded = padded_vocab_size(tensor.shape[0], size)
        if padded != tensor.shape[0]:
            extra = tensor.new_zeros((padded - tensor.shape[0], *tensor.shape[1:]))
            tensor = torch.cat([tensor, extra])
        return tensor.chunk(size, dim=0)[rank]
    if rule == GATE_UP:
        return fused_layout.shard_gate_up(tensor, rank, size)
    dim = 1 if rule == ROW else 0
    if tensor.shape[dim] % size:
        raise ValueError(f"{name}: dimension {dim} of size {tensor.shape[dim]} does not split into {size} ranks")
    return tensor.chunk(size, dim=dim)[rank]


def unshard(name: str, shards: list[torch.Tensor], vocab_size: int | None = None) -> torch.Tensor:
    """The whole-model tensor from every rank's part, in rank order (inverse of ``shard``).

    ``vocab_size`` cuts the padding off vocabulary-split tensors.
    """
    rule = partition_rule(name)
    if len(shards) == 1 or rule == REPLICATED:
        whole = shards[0]
    elif rule == GATE_UP:
        whole = fused_layout.unshard_gate_up(shards)
    else:
        whole = torch.cat(shards, dim=1 if rule == ROW else 0)
    if rule == VOCAB and vocab_size is not None:
        whole = whole[:vocab_size]
    return whole
