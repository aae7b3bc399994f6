"""Loading the base model from a local Hugging Face directory (no hub access)."""

from __future__ import annotations

import torch

from areal_core.config import ActorConfig
from areal_core.errors import ConfigError, ConfigInvalid

from areal_fsdp2 import model_inspection

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str, key: str = "actor.dtype") -> torch.dtype:
    """The torch dtype called ``name``; ConfigInvalid naming ``key`` when unknown."""
    try:
        return TORCH_DTYPES[name]
    except KeyError:
        raise ConfigInvalid(
            [ConfigError(key, name, "unknown dtype", f"use one of {sorted(TORCH_DTYPES)}")]
        ) from None


def check_model_dir(actor: ActorConfig) -> dict:
    """The model's config.json; ConfigInvalid for a missing, non-safetensors or MoE directory."""
    try:
        config = model_inspection.read_model_config(actor.path)
    except model_inspection.ModelDirError as exc:
        raise ConfigInvalid([ConfigError("actor.path", actor.path, exc.problem, exc.fix)]) from None
    refusal = model_inspection.moe_refusal(config)
    if refusal:
        raise ConfigInvalid(
            [ConfigError("actor.path", actor.path, refusal, "choose a dense model (no experts)")]
        )
    return config


def load_causal_lm(actor: ActorConfig):
    """``(model, checkpoint)``: the Hugging Face causal LM in ``actor.path`` in ``actor.dtype``.

    When the checkpoint can be read row by row (``sharded_loading``), the model's parameters
    are on the meta device and ``checkpoint`` is what fills each rank's shards after sharding.
    Otherwise ``checkpoint`` is None and the whole model is loaded on the CPU of every rank.
    Only safetensors weights are read, and only from the local directory.
    """
    check_model_dir(actor)
    dtype = torch_dtype(actor.dtype)
    from areal_fsdp2.sharded_loading import build_meta_model

    meta = build_meta_model(actor, dtype)
    if meta is not None:
        return meta
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        actor.path,
        dtype=dtype,
        local_files_only=True,
        use_safetensors=True,
        trust_remote_code=actor.trust_remote_code,
    )
    model.config.use_cache = False
    return model, None
