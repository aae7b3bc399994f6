"""Qwen2 (``model_type: qwen2``): its config checks and its HF <-> megatron-core name table.

As Llama, plus biases on q, k and v, which Megatron fuses into ``linear_qkv.bias`` with the same
per-group interleaving as the weight. o_proj and the MLP have no bias.
"""

from __future__ import annotations

from areal_megatron.models.decoder_spec import DecoderSpec, UnsupportedModel, common_spec
from areal_megatron.models.llama import LAYER_ROWS as LLAMA_LAYER_ROWS
from areal_megatron.models.state_dict_adapter import QKV, Mapping, StateDictAdapter

MODEL_TYPE = "qwen2"

LAYER_ROWS = LLAMA_LAYER_ROWS + (
    Mapping("self_attention.linear_qkv.bias",
            ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), QKV),
)


def spec_from_hf_config(config: dict) -> DecoderSpec:
    """Read a Qwen2 config.json; refuses sliding-window attention (full causal here)."""
    if config.get("use_sliding_window"):
        raise UnsupportedModel(
            "config.json has use_sliding_window=true; the megatron engine applies full causal "
            "attention only"
        )
    return common_spec(config, architecture=MODEL_TYPE, qkv_bias=True)


def state_dict_adapter(spec: DecoderSpec) -> StateDictAdapter:
    return StateDictAdapter(spec, LAYER_ROWS)
