"""Megatron-layout LoRA -> the PEFT interchange format (HF module naming, unfused projections).

``linear_in`` becomes ``lora_A`` and ``linear_out`` ``lora_B``. One adapter on a fused layer
becomes one adapter per HF projection: every projection gets the same A; B is cut into the
projections' rows (linear_qkv: per query group, q/k/v de-interleaved GQA-aware; linear_fc1: the
gate and up halves). Per-projection adapters (``adapter_q``...) map one to one. With several
adapters on the model, each is gathered and converted on its own.
"""

from __future__ import annotations

import re

import torch

from areal_core.adapter_format import peft_key
from areal_megatron import tensor_parallel
from areal_megatron.distributed import ParallelLayout, gather_tp
from areal_megatron.lora import PARTS, adapter_parameters
from areal_megatron.models import DecoderSpec, fused_layout
from areal_megatron.models.state_dict_adapter import GATE_UP, QKV, LinearTarget

_NAME = re.compile(
    r"^decoder\.layers\.(?P<layer>\d+)\.(?P<path>.+)\.(?P<adapter>adapter(?:_[a-z]+)?)\."
    r"(?P<which>linear_in|linear_out)\.weight$"
)


def gather_adapter(model, layout: ParallelLayout, key: str = "0") -> dict[str, torch.Tensor]:
    """The whole-model adapter ``key`` (default: the first) in megatron layout (CPU), by local
    name, on every rank. Collective over TP."""
    whole = {}
    for name, param in adapter_parameters(model, key).items():
        shards = [s.detach().to("cpu", copy=True) for s in gather_tp(param.detach(), layout)]
        whole[name] = tensor_parallel.unshard(name, shards)
    return whole


def to_peft(adapter: dict[str, torch.Tensor], spec: DecoderSpec,
            targets: dict[str, LinearTarget]) -> dict[str, torch.Tensor]:
    """PEFT file keys -> tensors for a whole-model megatron-layout adapter."""
    by_path = {t.path: t for t in targets.values()}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in adapter.items():
        match = _NAME.match(name)
        if not match:
            raise ValueError(f"{name} is not a megatron LoRA parameter name")
        target = by_path[match["path"]]
        prefix = f"model.layers.{match['layer']}."
        which = "A" if match["which"] == "linear_in" else "B"
        if match["adapter"] != "adapter":  # a per-projection adapter: adapter_<part>
            part = match["adapter"][len("adapter_"):]
            hf_path = target.hf_paths[PARTS[target.kind].index(part)]
            out[peft_key(prefix + hf_path, which)] = tensor.clone()
            continue
        if which == "A" or len(target.hf_paths) == 1:
            pieces = [tensor] * len(target.hf_paths)
        elif target.kind == QKV:
            pieces = fused_layout.split_qkv(tensor, spec.num_heads, spec.num_kv_heads, spec.head_dim)
        elif target.kind == GATE_UP:
            pieces = fused_layout.split_gate_up(tensor)
        else:
            raise ValueError(f"{name}: no rule to split a {target.kind} adapter")
        for hf_path, piece in zip(target.hf_paths, pieces):
            out[peft_key(prefix + hf_path, which)] = piece.contiguous().clone()
    return out
