"""The shape of a dense decoder-only model, read from a Hugging Face ``config.json``.

Both supported architectures (Llama, Qwen2) are pre-norm RMSNorm decoders with rotary position
embeddings, grouped-query attention and a SwiGLU MLP; they differ only in a few flags, which a
``DecoderSpec`` carries. Reading refuses what the Megatron model built here cannot reproduce
exactly (mixture-of-experts, rope scaling, sliding windows, unusual biases), naming the key.
"""

from __future__ import annotations

import json
from pathlib import Path

import attrs

from areal_core.errors import AdapterError

#: config.json keys whose value > 0 marks a mixture-of-experts model.
MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts",
            "num_experts_per_tok")


class UnsupportedModel(AdapterError):
    """The model directory holds a model this engine cannot build; the message says why."""


@attrs.frozen
class DecoderSpec:
    """Everything needed to build the Megatron model and convert weights, per architecture."""

    architecture: str  # "llama" | "qwen2"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads


def read_hf_config(model_dir: str | Path) -> dict:
    """The parsed ``config.json`` of a local HF model directory (UnsupportedModel if absent)."""
    path = Path(model_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise UnsupportedModel(
            f"cannot read {path}: {exc.strerror}; set actor.path to a local Hugging Face model "
            f"directory (config.json + *.safetensors)"
        ) from None
    except ValueError as exc:
        raise UnsupportedModel(f"{path} is not valid JSON: {exc}") from None


def moe_reason(config: dict) -> str:
    """Why the model is a mixture of experts ("" for a dense model)."""
    for key in MOE_KEYS:
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return (f"config.json has {key}={value}: mixture-of-experts models are not supported "
                    f"by the megatron engine yet (dense Llama and Qwen2 only)")
    if "moe" in str(config.get("model_type", "")).lower():
        return (f"model_type {config['model_type']!r} is a mixture-of-experts model; the megatron "
                f"engine supports dense Llama and Qwen2 only")
    return ""


def rope_theta(config: dict) -> float:
    """The rotary base; refuses rope scaling, which the Megatron model here does not apply."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise UnsupportedModel(
            f"config.json asks for rope scaling ({kind!r}); the megatron engine applies plain "
            f"rotary embeddings only, so its logits would differ from the HF model's"
        )
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def common_spec(config: dict, *, architecture: str, qkv_bias: bool) -> DecoderSpec:
    """A DecoderSpec from the keys Llama and Qwen2 share (after the MoE and rope checks)."""
    reason = moe_reason(config)
    if reason:
        raise UnsupportedModel(reason)
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModel(f"config.json has hidden_act={act!r}; only SwiGLU (silu) is supported")
    try:
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        spec = DecoderSpec(
            architecture=architecture,
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden,
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            ffn_hidden_size=int(config["intermediate_size"]),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta(config),
            max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
        )
    except KeyError as exc:
        raise UnsupportedModel(f"config.json lacks {exc.args[0]!r}, which a {architecture} model needs") from None
    if spec.num_heads % spec.num_kv_heads:
        raise UnsupportedModel(
            f"num_attention_heads={spec.num_heads} is not a multiple of "
            f"num_key_value_heads={spec.num_kv_heads}"
        )
    return spec
