"""``areal check`` rules for the SGLang server: what must hold before anything is launched.

Cheap checks only: nothing is loaded or started. The rules every backend shares (rank >= 1,
peft type, dense model, ...) are the core's (``areal_core.validation``); these are SGLang's.
"""

from __future__ import annotations

import os

from areal_core.config import RunConfig
from areal_core.errors import ArealError, ConfigError
from areal_core.versions import live_versions_needed

from areal_sglang.launcher import find_server_python
from areal_sglang.target_modules import target_module_errors

#: Flags the plugin derives from the configuration; setting them in extra_args would contradict it.
_DERIVED_FLAGS = {
    "--lora-target-modules": "actor.target_modules",
    "--enable-lora": "actor.use_lora",
    "--model-path": "actor.path",
    "--port": "rollout.servers (empty: a free port is chosen)",
}


def _flag_value(args: list[str], flag: str) -> str | None:
    for index, arg in enumerate(args):
        if arg == flag and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _int_flag_errors(args: list[str], flag: str, minimum: int, why: str) -> list[ConfigError]:
    value = _flag_value(args, flag)
    if value is None:
        return []
    try:
        number = int(value)
    except ValueError:
        return [ConfigError("rollout.extra_args", f"{flag} {value}", "not an integer", f"write {flag} N")]
    if number < minimum:
        return [
            ConfigError(
                "rollout.extra_args",
                f"{flag} {value}",
                f"must be at least {minimum} ({why})",
                f"remove {flag} from rollout.extra_args (areal sets it) or raise it to {minimum}",
            )
        ]
    return []


def validate(config: RunConfig) -> list[ConfigError]:
    """Every problem an SGLang rollout server would have with ``config`` (empty when none)."""
    actor, rollout = config.actor, config.rollout
    errors: list[ConfigError] = []
    errors += target_module_errors(actor.target_modules)

    live = live_versions_needed(rollout.max_head_offpolicyness)
    if rollout.max_loras and rollout.max_loras < live:
        errors.append(
            ConfigError(
                "rollout.max_loras",
                rollout.max_loras,
                f"with rollout.max_head_offpolicyness={rollout.max_head_offpolicyness} up to "
                f"{live} adapter versions are live at once (current, older ones in the window, "
                f"the one being loaded)",
                f"set rollout.max_loras to 0 (derived) or at least {live}",
            )
        )
    args = list(rollout.extra_args)
    errors += _int_flag_errors(args, "--max-lora-rank", actor.lora_rank,
                               f"actor.lora_rank is {actor.lora_rank}")
    errors += _int_flag_errors(args, "--max-loaded-loras", max(live, rollout.max_loras),
                               "every live adapter version must stay resident")
    for flag, key in _DERIVED_FLAGS.items():
        if _flag_value(args, flag) is not None or flag in args:
            errors.append(
                ConfigError("rollout.extra_args", flag, f"areal derives this flag from {key}",
                            f"remove {flag} from rollout.extra_args and set {key}")
            )
    if rollout.api_key_env and not os.environ.get(rollout.api_key_env):
        errors.append(
            ConfigError("rollout.api_key_env", rollout.api_key_env,
                        "names an environment variable that is not set",
                        f"export {rollout.api_key_env}=<the server's API key>, or clear rollout.api_key_env")
        )
    if rollout.api_key_env and not rollout.servers:
        errors.append(
            ConfigError("rollout.api_key_env", rollout.api_key_env,
                        "a launched SGLang server takes its key on the command line (--api-key) and "
                        "writes its arguments into its log in the run directory",
                        "clear rollout.api_key_env for a launched server (it listens on loopback), or "
                        "start the server yourself and give its address in rollout.servers")
        )
    if not rollout.servers:
        try:
            find_server_python()
        except ArealError as exc:
            errors.append(ConfigError("rollout.servers", [], str(exc),
                                      "build the SGLang venv or give server addresses"))
    return errors
