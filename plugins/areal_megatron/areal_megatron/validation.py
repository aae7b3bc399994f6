"""The megatron engine's configuration checks (``areal_validate_config``), before anything heavy."""

from __future__ import annotations

from areal_core.config import RunConfig
from areal_core.errors import AdapterError, ConfigError


def layout_problems(spec, actor) -> list[tuple[str, object, str, str]]:
    """(key, value, problem, fix) for a TP size or LoRA rank that cannot split this model."""
    tp = actor.tensor_parallel_size
    problems = []
    for what, size in (("num_attention_heads", spec.num_heads), ("num_key_value_heads", spec.num_kv_heads),
                       ("intermediate_size", spec.ffn_hidden_size)):
        if tp >= 1 and size % tp:
            problems.append(("actor.tensor_parallel_size", tp,
                             f"tensor parallelism splits {what}={size} into equal parts, and {tp} does not divide it",
                             f"choose a tensor_parallel_size dividing {what}={size}"))
    if tp >= 1 and actor.lora_rank % tp:
        problems.append(("actor.lora_rank", actor.lora_rank,
                         f"LoRA's A on linear_qkv/linear_fc1 is split along the rank over "
                         f"tensor_parallel_size={tp} ranks",
                         f"use a lora_rank that is a multiple of {tp}"))
    return problems


def check_config(config: RunConfig) -> list[ConfigError]:
    """Every reason the megatron engine cannot run ``config`` (empty when it can)."""
    from areal_core.validation import check_model_dir

    from areal_megatron import cpu_mode
    from areal_megatron.lora import resolve_targets
    from areal_megatron.models import UnsupportedModel, read_hf_config, spec_from_config, state_dict_adapter

    actor = config.actor
    errors: list[ConfigError] = []
    if actor.device == "cuda" and cpu_mode.env_requested():
        errors.append(ConfigError("actor.device", actor.device,
                                  f"{cpu_mode.ENV_VAR} asks for the CPU workaround but actor.device is cuda",
                                  f"unset {cpu_mode.ENV_VAR} to train on the GPU"))
    # Data-parallel replicas always hold the base and the adapter whole (their gradients are
    # all-reduced once a step): what these fsdp2 keys ask for, unless tensor parallelism splits them.
    for key in ("replicate_adapter", "replicate_base"):
        if getattr(actor, key) and actor.tensor_parallel_size > 1:
            part = "adapter" if key == "replicate_adapter" else "base"
            errors.append(ConfigError(
                f"actor.{key}", True,
                f"the megatron engine splits the {part} over actor.tensor_parallel_size "
                f"{actor.tensor_parallel_size} ranks, so no rank holds it whole",
                f"set actor.{key}: false, or actor.tensor_parallel_size: 1 (its data-parallel ranks "
                f"always hold the {part} whole)"))
    # The core's own model-directory findings (identical objects, so `areal check` lists them once).
    model_errors = check_model_dir(config)
    if model_errors:
        return errors + model_errors
    try:
        spec = spec_from_config(read_hf_config(actor.path))
    except UnsupportedModel as exc:
        return errors + [ConfigError("actor.path", actor.path, str(exc),
                                     "use a dense Llama or Qwen2 model, or another engine (actor.backend=fsdp2)")]
    errors += [ConfigError(*p) for p in layout_problems(spec, actor)]
    targets = state_dict_adapter(spec).linear_targets()
    try:
        resolve_targets(actor.resolved_target_modules, targets)
    except AdapterError as exc:
        errors.append(ConfigError("actor.target_modules", actor.target_modules, str(exc),
                                  "use [all-linear] or names such as q_proj, v_proj"))
    return errors + adapter_problems(config, spec, targets)


def adapter_problems(config: RunConfig, spec, targets) -> list[ConfigError]:
    """Each ``adapters:`` entry's rank and target modules, under ``adapters.<name>.<key>``."""
    from areal_core.adapters import adapter_run_config
    from areal_core.validation import entry_label

    from areal_megatron.lora import resolve_targets

    errors: list[ConfigError] = []
    tp = config.actor.tensor_parallel_size
    for index, adapter in enumerate(config.adapters):
        label = entry_label(config, index)
        if tp >= 1 and adapter.lora_rank % tp:
            errors.append(ConfigError(f"{label}.lora_rank", adapter.lora_rank,
                                      f"LoRA's A on linear_qkv/linear_fc1 is split along the rank over "
                                      f"tensor_parallel_size={tp} ranks",
                                      f"use a lora_rank that is a multiple of {tp}"))
        actor = adapter_run_config(config, adapter).actor
        try:
            resolve_targets(actor.resolved_target_modules, targets)
        except AdapterError as exc:
            errors.append(ConfigError(f"{label}.target_modules", adapter.target_modules, str(exc),
                                      "use [all-linear] or names such as q_proj, v_proj"))
    return errors
