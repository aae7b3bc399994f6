"""Llama (``model_type: llama``): its config checks and its HF <-> megatron-core name table.

No biases in attention or MLP; embeddings tied or not (``lm_head.weight`` then maps to
``output_layer.weight``).
"""

from __future__ import annotations

from areal_megatron.models.decoder_spec import DecoderSpec, UnsupportedModel, common_spec
from areal_megatron.models.state_dict_adapter import COPY, GATE_UP, QKV, Mapping, StateDictAdapter

MODEL_TYPE = "llama"

#: Per decoder layer: megatron-core name (under decoder.layers.N) <- HF names (under model.layers.N).
LAYER_ROWS = (
    Mapping("input_layernorm.weight", ("input_layernorm.weight",), COPY),
    Mapping("self_attention.linear_qkv.weight",
            ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), QKV),
    Mapping("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), COPY),
    Mapping("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), COPY),
    Mapping("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), GATE_UP),
    Mapping("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), COPY),
)


def spec_from_hf_config(config: dict) -> DecoderSpec:
    """Read a Llama config.json; refuses attention/MLP biases (not mapped here)."""
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise UnsupportedModel(
                f"config.json has {key}=true; the megatron engine supports Llama without biases"
            )
    return common_spec(config, architecture=MODEL_TYPE, qkv_bias=False)


def state_dict_adapter(spec: DecoderSpec) -> StateDictAdapter:
    return StateDictAdapter(spec, LAYER_ROWS)
