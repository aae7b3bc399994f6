"""Which modules get a LoRA adapter: ``actor.target_modules`` checked against the model.

Shared by the configuration checks (linear names read from config.json) and by the injection
(linear names of the loaded model), so both accept and refuse the same lists.
"""

from __future__ import annotations

from areal_core.config import ALL_LINEAR

#: Never adapted by ``all-linear`` (peft leaves the output layer alone); may be named explicitly.
OUTPUT_LAYER = "lm_head"


class TargetModuleError(ValueError):
    """``actor.target_modules`` names something the model cannot carry LoRA on."""


def resolve_target_modules(requested: list[str], linear_names: list[str]) -> str | list[str]:
    """What to hand peft: ``"all-linear"``, or the sorted explicit short module names.

    ``requested`` is ``actor.target_modules`` (``[]`` means all-linear); ``linear_names`` the
    short names of the model's ``nn.Linear`` modules. Raises ``TargetModuleError`` naming the
    names that match no linear module and listing the ones that exist.
    """
    names = [str(name) for name in requested] or [ALL_LINEAR]
    adaptable = sorted(set(linear_names) - {OUTPUT_LAYER})
    if ALL_LINEAR in names:
        if len(set(names)) > 1:
            others = sorted(set(names) - {ALL_LINEAR})
            raise TargetModuleError(
                f"target_modules mixes '{ALL_LINEAR}' with explicit names {others}; "
                f"use either ['{ALL_LINEAR}'] or a list of module names"
            )
        if not adaptable:
            raise TargetModuleError(
                f"'{ALL_LINEAR}' matches nothing: the model has no linear layers besides "
                f"{OUTPUT_LAYER} (linear modules: {sorted(linear_names)})"
            )
        return ALL_LINEAR
    unknown = sorted({name for name in names if name not in linear_names})
    if unknown:
        raise TargetModuleError(
            f"target modules {unknown} match no linear module of the model; its linear modules "
            f"are {sorted(linear_names)} (or use ['{ALL_LINEAR}'])"
        )
    return sorted(set(names))
