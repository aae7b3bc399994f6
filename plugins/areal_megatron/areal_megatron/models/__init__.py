"""The architectures the megatron engine builds, keyed by HF ``model_type``.

Adding one: a module with ``MODEL_TYPE``, ``spec_from_hf_config(config) -> DecoderSpec`` and
``state_dict_adapter(spec) -> StateDictAdapter``, listed in ``ARCHITECTURES``.
"""

from __future__ import annotations

from pathlib import Path

from areal_megatron.models import llama, qwen2
from areal_megatron.models.decoder_spec import DecoderSpec, UnsupportedModel, moe_reason, read_hf_config
from areal_megatron.models.state_dict_adapter import StateDictAdapter

ARCHITECTURES = {module.MODEL_TYPE: module for module in (llama, qwen2)}


def spec_from_config(config: dict) -> DecoderSpec:
    """The DecoderSpec of a parsed config.json; UnsupportedModel says why when it cannot be built."""
    reason = moe_reason(config)
    if reason:
        raise UnsupportedModel(reason)
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UnsupportedModel(
            f"model_type {model_type!r} is not supported by the megatron engine "
            f"(supported: {', '.join(sorted(ARCHITECTURES))}); use actor.backend=fsdp2 for other models"
        )
    return ARCHITECTURES[model_type].spec_from_hf_config(config)


def load_spec(model_dir: str | Path) -> DecoderSpec:
    """The DecoderSpec of a local HF model directory."""
    return spec_from_config(read_hf_config(model_dir))


def state_dict_adapter(spec: DecoderSpec) -> StateDictAdapter:
    return ARCHITECTURES[spec.architecture].state_dict_adapter(spec)


__all__ = ["ARCHITECTURES", "DecoderSpec", "StateDictAdapter", "UnsupportedModel", "load_spec",
           "spec_from_config", "state_dict_adapter"]
