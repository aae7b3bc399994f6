"""``areal check`` rules for the SGLang server: what must hold before anything is launched.

Cheap checks only: nothing is loaded or started. The rules every backend shares (rank >= 1,
peft type, dense model, ...) are the core's (``areal_core.validation``); these are SGLang's.
A run with ``adapters:`` has each adapter's target modules checked under
``adapters.<name>.target_modules``, and the flags a launched server gets must hold them all (the
largest rank, the sum of their live versions; the core adds those up against
``rollout.max_loras``).
"""

from __future__ import annotations

import os

from areal_core.adapters import run_adapters
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
    if config.adapters:
        return _validate_adapters(config) + _common_errors(config)
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
    return errors + _common_errors(config)


def _validate_adapters(config: RunConfig) -> list[ConfigError]:
    """A run with ``adapters:``: each entry's modules, and the flags holding every entry."""
    from areal_core.validation import entry_label

    errors: list[ConfigError] = []
    adapters = run_adapters(config)
    for index, adapter in enumerate(adapters):
        key = f"{entry_label(config, index)}.target_modules"
        errors += target_module_errors(adapter.target_modules, key=key)
    live = sum(live_versions_needed(adapter.max_head_offpolicyness) for adapter in adapters)
    largest = max(range(len(adapters)), key=lambda index: adapters[index].lora_rank)
    args = list(config.rollout.extra_args)
    errors += _int_flag_errors(
        args, "--max-lora-rank", adapters[largest].lora_rank,
        f"{entry_label(config, largest)}.lora_rank is {adapters[largest].lora_rank}, the largest rank of "
        "the adapters, and one server holds them all")
    errors += _int_flag_errors(
        args, "--max-loaded-loras", max(live, config.rollout.max_loras),
        f"the adapters keep up to {live} versions live at once, all resident on the one server")
    return errors


def _common_errors(config: RunConfig) -> list[ConfigError]:
    """The checks that do not depend on the adapters: derived flags, API key, the server venv."""
    rollout = config.rollout
    args = list(rollout.extra_args)
    errors: list[ConfigError] = []
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
