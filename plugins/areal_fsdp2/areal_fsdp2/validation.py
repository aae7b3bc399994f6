"""The fsdp2 engine's configuration checks (hook ``areal_validate_config``): cheap, no model load.

Reads the model's ``config.json`` and file names only; torch is imported only for an
architecture outside ``model_inspection.KNOWN_LINEAR_MODULES`` (a meta-device build).
"""

from __future__ import annotations

from areal_core.config import DTYPES, ActorConfig
from areal_core.errors import ConfigError

from areal_fsdp2 import model_inspection
from areal_fsdp2.target_modules import TargetModuleError, resolve_target_modules

DEVICES = ("auto", "cpu", "cuda")


def _option_errors(actor: ActorConfig) -> list[ConfigError]:
    errors = []
    if actor.dtype not in DTYPES:
        errors.append(ConfigError("actor.dtype", actor.dtype, "unknown dtype", f"use one of {DTYPES}"))
    if actor.param_dtype not in ("",) + DTYPES:
        errors.append(ConfigError(
            "actor.param_dtype", actor.param_dtype, "unknown dtype",
            f"use one of {DTYPES}, or '' to compute in the dtype the model is loaded in",
        ))
    if actor.reduce_dtype not in DTYPES:
        errors.append(ConfigError(
            "actor.reduce_dtype", actor.reduce_dtype, "unknown dtype", f"use one of {DTYPES}"
        ))
    if actor.device not in DEVICES:
        errors.append(ConfigError("actor.device", actor.device, "unknown device", f"use one of {DEVICES}"))
    if actor.max_tokens_per_microbatch < 2:
        errors.append(ConfigError(
            "actor.max_tokens_per_microbatch", actor.max_tokens_per_microbatch,
            "a micro-batch must hold at least one sequence of two tokens", "set it to 2 or more",
        ))
    if actor.optimizer.lr <= 0:
        errors.append(ConfigError("actor.optimizer.lr", actor.optimizer.lr, "must be positive"))
    if actor.optimizer.grad_clip < 0:
        errors.append(ConfigError(
            "actor.optimizer.grad_clip", actor.optimizer.grad_clip,
            "must be >= 0", "use 0 to disable clipping",
        ))
    if actor.tensor_parallel_size != 1:
        errors.append(ConfigError(
            "actor.tensor_parallel_size", actor.tensor_parallel_size,
            "the fsdp2 engine shards data-parallel only", "set it to 1, or use the megatron engine",
        ))
    return errors


def _lora_errors(actor: ActorConfig) -> list[ConfigError]:
    errors = []
    if str(actor.peft_type).lower() != "lora":
        errors.append(ConfigError(
            "actor.peft_type", actor.peft_type,
            "the fsdp2 engine trains LoRA adapters only", "set actor.peft_type: lora",
        ))
    if not isinstance(actor.lora_rank, int) or actor.lora_rank < 1:
        errors.append(ConfigError("actor.lora_rank", actor.lora_rank, "must be an integer >= 1"))
    if not actor.lora_alpha > 0:
        errors.append(ConfigError("actor.lora_alpha", actor.lora_alpha, "must be positive"))
    return errors


def validate_actor(actor: ActorConfig) -> list[ConfigError]:
    """Every problem the fsdp2 engine sees in ``actor`` (empty when it can start).

    Checks the engine options, the LoRA settings (unless ``full_finetune``), the model
    directory (exists, config.json, safetensors weights, dense), and that every target module
    names a linear module of the model.
    """
    errors = _option_errors(actor)
    if not actor.full_finetune:
        errors += _lora_errors(actor)
    try:
        config = model_inspection.read_model_config(actor.path)
    except model_inspection.ModelDirError as exc:
        return errors + [ConfigError("actor.path", actor.path, exc.problem, exc.fix)]
    refusal = model_inspection.moe_refusal(config)
    if refusal:
        return errors + [ConfigError(
            "actor.path", actor.path, refusal, "choose a dense model (no experts)"
        )]
    try:
        linear_names = model_inspection.linear_module_names(
            actor.path, config, trust_remote_code=actor.trust_remote_code
        )
    except model_inspection.ModelDirError as exc:
        key = "actor.trust_remote_code" if "trust_remote_code" in exc.fix else "actor.path"
        value = actor.trust_remote_code if key == "actor.trust_remote_code" else actor.path
        return errors + [ConfigError(key, value, exc.problem, exc.fix)]
    if not actor.full_finetune:
        try:
            resolve_target_modules(actor.target_modules, linear_names)
        except TargetModuleError as exc:
            errors.append(ConfigError(
                "actor.target_modules", list(actor.target_modules), str(exc),
                f"choose among {sorted(linear_names)}",
            ))
    return errors
