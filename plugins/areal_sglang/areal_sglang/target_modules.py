"""Translate the configured LoRA target modules into SGLang's ``--lora-target-modules``.

peft writes ``all-linear`` where SGLang writes ``all``; explicit short module names pass through
when SGLang 0.5.23 can carry LoRA on them; regular expressions (peft accepts a string regex)
have no SGLang equivalent and are refused. Several adapters on one server need the union of their
modules (``union_target_modules``): SGLang refuses an adapter whose modules are not among the
server's.
"""

from __future__ import annotations

import re

from areal_core.config import ALL_LINEAR
from areal_core.errors import ConfigError

SGLANG_ALL = "all"

#: ``SUPPORTED_LORA_TARGET_MODULES`` of SGLang 0.5.23 (``sglang.srt.utils.common``): the choices
#: its ``--lora-target-modules`` flag accepts besides ``all``. Copied so that the client imports
#: without SGLang installed.
SUPPORTED_MODULES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "q_a_proj",
    "kv_a_proj_with_mqa",
    "q_b_proj",
    "kv_b_proj",
    "wq_b",
    "wk",
    "weights_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "qkv_proj",
    "gate_up_proj",
    "embed_tokens",
    "lm_head",
    "qkvr",
    "wo_ud",
)

_REGEX_CHARACTERS = re.compile(r"[\\^$*+?()\[\]{}|]")


def target_module_errors(modules: list[str], key: str = "actor.target_modules") -> list[ConfigError]:
    """Every reason SGLang cannot serve adapters on ``modules`` (empty when it can).

    :param modules: the configured target modules (``[]`` means ``[all-linear]``).
    :param key: the configuration key named in the errors.
    """
    modules = list(modules) or [ALL_LINEAR]
    errors: list[ConfigError] = []
    if ALL_LINEAR in modules or SGLANG_ALL in modules:
        if len(modules) > 1:
            errors.append(
                ConfigError(
                    key,
                    modules,
                    f"{ALL_LINEAR!r} already names every linear module and cannot be combined "
                    "with other names",
                    f"write [{ALL_LINEAR}] alone, or list the module names without it",
                )
            )
        return errors
    for name in modules:
        if _REGEX_CHARACTERS.search(name):
            errors.append(
                ConfigError(
                    key,
                    name,
                    "SGLang takes target modules as plain module names, not regular expressions",
                    f"list the short module names (for example q_proj, v_proj) or use {ALL_LINEAR}",
                )
            )
        elif name not in SUPPORTED_MODULES:
            errors.append(
                ConfigError(
                    key,
                    name,
                    "SGLang 0.5.23 cannot carry LoRA on this module "
                    f"(it serves: {', '.join(SUPPORTED_MODULES)})",
                    f"use short module names from that list, or {ALL_LINEAR}",
                )
            )
    return errors


def sglang_target_modules(modules: list[str]) -> list[str]:
    """The values of ``--lora-target-modules`` for the configured ``modules``.

    :raises ValueError: when ``target_module_errors`` finds a problem (its messages joined).
    """
    errors = target_module_errors(modules)
    if errors:
        raise ValueError("; ".join(str(error) for error in errors))
    modules = list(modules) or [ALL_LINEAR]
    if modules == [ALL_LINEAR] or modules == [SGLANG_ALL]:
        return [SGLANG_ALL]
    return sorted(set(modules))


def union_target_modules(module_lists: list[list[str]]) -> list[str]:
    """The target modules a server holding adapters on each of ``module_lists`` needs.

    SGLang sizes its LoRA buffers once, at start, for ``--lora-target-modules``, and loads an
    adapter only when its modules (normalised: q/k/v into ``qkv_proj``, gate/up into
    ``gate_up_proj``) are among them; so the server gets every adapter's modules, and
    ``all-linear`` as soon as one adapter asks for it (``[]`` means ``[all-linear]``). A module
    an adapter lacks is zero in that adapter's slot.
    """
    lists = [list(modules) or [ALL_LINEAR] for modules in module_lists]
    if any(ALL_LINEAR in modules or SGLANG_ALL in modules for modules in lists):
        return [ALL_LINEAR]
    return sorted({name for modules in lists for name in modules})
