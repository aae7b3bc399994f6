"""The fsdp2 engine's configuration checks (hook ``areal_validate_config``): cheap, no model load.

Reads the model's ``config.json`` and file names only; torch is imported only for an
architecture outside ``model_inspection.KNOWN_LINEAR_MODULES`` (a meta-device build).
"""

from __future__ import annotations

from areal_core.config import ActorConfig
from areal_core.errors import ConfigError

from areal_fsdp2 import model_inspection
from areal_fsdp2.target_modules import TargetModuleError, resolve_target_modules


def _engine_option_errors(actor: ActorConfig) -> list[ConfigError]:
    """Limits of this engine (dtypes, device, rank and peft type are the core's checks)."""
    errors = []
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
    if actor.replicate_base and actor.full_finetune:
        errors.append(ConfigError(
            "actor.replicate_base", True, "actor.full_finetune trains the base, so there is no frozen base to keep whole",
            "set actor.replicate_base: false",
        ))
    if actor.replicate_base and actor.param_dtype:
        errors.append(ConfigError(
            "actor.replicate_base", True,
            f"a base kept whole is not cast by FSDP2 mixed precision (actor.param_dtype {actor.param_dtype!r})",
            f"load the base in that dtype instead (actor.dtype: {actor.param_dtype}, actor.param_dtype: \"\"), "
            f"or set actor.replicate_base: false",
        ))
    if actor.tensor_parallel_size != 1:
        errors.append(ConfigError(
            "actor.tensor_parallel_size", actor.tensor_parallel_size,
            "the fsdp2 engine shards data-parallel only", "set it to 1, or use the megatron engine",
        ))
    return errors


def validate_actor(actor: ActorConfig) -> list[ConfigError]:
    """Every problem the fsdp2 engine sees in ``actor`` (empty when it can start).

    Checks the engine's limits, the model directory (exists, config.json, safetensors weights,
    dense, remote code trusted when it needs it), and that every target module names a linear
    module of the model (unless ``full_finetune``). Single values the core checks for every
    engine (dtypes, device, rank, alpha, peft type) are not repeated here.
    """
    errors = _engine_option_errors(actor)
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
