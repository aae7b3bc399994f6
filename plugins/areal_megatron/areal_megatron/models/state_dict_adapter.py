"""HF <-> megatron-core weights for the dense decoders, driven by each architecture's name table.

An architecture module (``llama``, ``qwen2``) lists its ``Mapping`` rows: which megatron-core
parameter is made of which HF tensors, and how (copied, q/k/v fused, gate/up fused). This module
applies a table in both directions. The result is the whole-model ("TP=1") megatron-core state;
``areal_megatron.tensor_parallel`` cuts it into tensor-parallel shards.
"""

from __future__ import annotations

from typing import Mapping as MappingType

import attrs
import torch

from areal_megatron.models import fused_layout
from areal_megatron.models.decoder_spec import DecoderSpec

COPY, QKV, GATE_UP = "copy", "qkv", "gate_up"
LAYER = "{layer}"


@attrs.frozen
class Mapping:
    """One megatron-core tensor and the HF tensors it is made of.

    Names may contain ``{layer}``; ``megatron`` is relative to ``decoder.layers.{layer}`` for
    per-layer rows, ``hf`` relative to ``model.layers.{layer}``.
    """

    megatron: str
    hf: tuple[str, ...]
    kind: str = COPY


def _expand(rows, spec: DecoderSpec, layer_rows):
    for row in rows:
        yield row.megatron, row.hf, row.kind
    for layer in range(spec.num_layers):
        for row in layer_rows:
            yield (f"decoder.layers.{layer}.{row.megatron}",
                   tuple(f"model.layers.{layer}.{name}" for name in row.hf), row.kind)


def global_rows(spec: DecoderSpec) -> tuple[Mapping, ...]:
    """Embedding, final norm and (untied) output layer: the same for every dense decoder."""
    rows = [Mapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
            Mapping("decoder.final_layernorm.weight", ("model.norm.weight",))]
    if not spec.tie_word_embeddings:
        rows.append(Mapping("output_layer.weight", ("lm_head.weight",)))
    return tuple(rows)


class StateDictAdapter:
    """Converts whole-model state dicts between HF naming/layout and megatron-core's."""

    def __init__(self, spec: DecoderSpec, layer_rows: tuple[Mapping, ...]):
        self.spec = spec
        self.layer_rows = layer_rows
        self.rows = list(_expand(global_rows(spec), spec, layer_rows))

    def to_megatron(self, hf_state: MappingType[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """megatron-core tensors from HF tensors; KeyError names a tensor the HF state lacks."""
        spec = self.spec
        missing = sorted({n for _, names, _ in self.rows for n in names} - set(hf_state))
        if missing:
            raise KeyError(f"the HF checkpoint lacks {len(missing)} tensor(s) the {spec.architecture} "
                           f"model needs, e.g. {missing[:3]}")
        out = {}
        for megatron, names, kind in self.rows:
            parts = [hf_state[name] for name in names]
            if kind == QKV:
                out[megatron] = fused_layout.fuse_qkv(*parts, num_groups=spec.num_kv_heads)
            elif kind == GATE_UP:
                out[megatron] = fused_layout.fuse_gate_up(*parts)
            else:
                out[megatron] = parts[0]
        return out

    def to_hf(self, megatron_state: MappingType[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """HF tensors from whole-model megatron-core tensors (the inverse of ``to_megatron``)."""
        spec = self.spec
        out = {}
        for megatron, names, kind in self.rows:
            tensor = megatron_state[megatron]
            if kind == QKV:
                parts = fused_layout.split_qkv(tensor, spec.num_heads, spec.num_kv_heads, spec.head_dim)
            elif kind == GATE_UP:
                parts = fused_layout.split_gate_up(tensor)
            else:
                parts = (tensor,)
            out.update({name: part.clone() for name, part in zip(names, parts)})
        return out  # tied models: no lm_head.weight, as in their HF checkpoint

    def linear_targets(self) -> dict[str, "LinearTarget"]:
        """The adaptable linear layers of a decoder layer, keyed by short megatron name.

        Derived from the weight rows: ``linear_qkv``, ``linear_proj``, ``linear_fc1`` and
        ``linear_fc2``, each with the HF modules it stands for, in fused order.
        """
        targets = {}
        for row in self.layer_rows:
            if not row.megatron.endswith(".weight") or "layernorm" in row.megatron:
                continue
            path = row.megatron[: -len(".weight")]
            hf_paths = tuple(name[: -len(".weight")] for name in row.hf)
            targets[path.rsplit(".", 1)[-1]] = LinearTarget(path, hf_paths, row.kind)
        return targets


@attrs.frozen
class LinearTarget:
    """One adaptable megatron-core linear layer of a decoder layer.

    ``path`` is relative to the layer (``self_attention.linear_qkv``); ``hf_paths`` are the HF
    modules it fuses, relative to ``model.layers.{N}`` and in fused order
    (``self_attn.q_proj``, ``self_attn.k_proj``, ``self_attn.v_proj``); ``kind`` how they are fused.
    """

    path: str
    hf_paths: tuple[str, ...]
    kind: str

    @property
    def name(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    @property
    def hf_modules(self) -> tuple[str, ...]:
        """Short HF names (``q_proj``...), as in ``target_modules``."""
        return tuple(p.rsplit(".", 1)[-1] for p in self.hf_paths)
