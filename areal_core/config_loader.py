"""YAML + ``key=value`` overrides -> a ``RunConfig``, reporting every problem at once.

OmegaConf reads the YAML, applies the command-line overrides and resolves ``${...}``
interpolation; the resolved tree is then converted into the attrs classes of
``areal_core.config``, collecting a ``ConfigError`` for each unknown key (with the closest valid
key suggested) and each value of the wrong type. A field with a bad value keeps its default so
that the remaining checks can still run and report their own errors.
"""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Any

import attrs

from areal_core.config import RunConfig
from areal_core.errors import ConfigError, ConfigInvalid


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is None:
        return getattr(tp, "__name__", str(tp))
    args = ", ".join(_type_name(a) for a in typing.get_args(tp) if a is not Ellipsis)
    return f"{origin.__name__}[{args}]"


def _optional(tp: Any) -> tuple[bool, Any]:
    """(None allowed, the type without None) of ``X | None``; ``(False, tp)`` otherwise."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(args) < len(typing.get_args(tp)):
            return True, args[0]
    return False, tp


def _convert_scalar(value: Any, tp: Any) -> tuple[bool, Any]:
    """(ok, converted) for the scalar and container types the config tree uses."""
    nullable, tp = _optional(tp)
    if nullable and value is None:
        return True, None
    origin = typing.get_origin(tp)
    if tp is bool:
        return (isinstance(value, bool), value)
    if tp is int:
        return (isinstance(value, int) and not isinstance(value, bool), value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if tp is str:
        return (isinstance(value, str), value)
    if origin is list:
        (item_type,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            return False, value
        items = []
        for item in value:
            ok, converted = _convert_scalar(item, item_type) if item_type is not Any else (True, item)
            if not ok:
                return False, value
            items.append(converted)
        return True, items
    if origin is tuple:
        item_types = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(item_types):
            return False, value
        items = []
        for item, item_type in zip(value, item_types):
            ok, converted = _convert_scalar(item, item_type)
            if not ok:
                return False, value
            items.append(converted)
        return True, tuple(items)
    if tp is dict or origin is dict:
        return (isinstance(value, dict), value)
    return True, value


#: Keys that went away, with what replaces them: an old config gets this instead of "unknown key".
RETIRED_KEYS = {
    "train.agreement_tolerance": (
        "is gone: the agreement check no longer compares a max difference with a tolerance; it "
        "derives its threshold from the dtype and judges the served weights against the base model "
        "and the previous version (docs/agreement.md)",
        "delete the key; use train.agreement=stop|warn|off to choose what an alarm does"),
    "train.ppo_clip": (
        "moved: the PPO settings live under actor, with the reference system's names",
        "write actor.eps_clip (the same clip range; actor.eps_clip_higher sets an asymmetric upper bound)"),
    "train.kl_coef": (
        "moved: the PPO settings live under actor, with the reference system's names",
        "write actor.kl_ctl (the same coefficient of the k3 KL to the base policy)"),
}

#: The reference system's names of settings this project spells otherwise.
REFERENCE_NAMES = {
    "actor.optimizer.gradient_clipping": "actor.optimizer.grad_clip",
    "actor.optimizer.beta1": "actor.optimizer.betas (a pair: [beta1, beta2])",
    "actor.optimizer.beta2": "actor.optimizer.betas (a pair: [beta1, beta2])",
    "actor.optimizer.type": "nothing: the optimizer is always AdamW; delete the key",
    "actor.mb_spec": "actor.max_tokens_per_microbatch",
    "actor.group_size": "gconfig.n_samples",
}


def build(cls: type, data: Any, prefix: str, errors: list[ConfigError]) -> Any:
    """Build attrs class ``cls`` from ``data``, appending problems to ``errors``."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        errors.append(ConfigError(prefix or "<root>", data, f"expected a mapping of {cls.__name__} keys",
                                  "write it as a YAML mapping (key: value lines)"))
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in attrs.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if path in RETIRED_KEYS:
            problem, fix = RETIRED_KEYS[path]
            errors.append(ConfigError(path, value, problem, fix))
            continue
        if key not in fields:
            if path in REFERENCE_NAMES:
                errors.append(ConfigError(path, value, "the reference system's name; not a key here",
                                          f"write {REFERENCE_NAMES[path]}"))
                continue
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            fix = f"did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else (
                f"valid keys here: {', '.join(sorted(fields))}")
            errors.append(ConfigError(path, value, "unknown key", fix))
            continue
        tp = hints[key]
        if value is False and "yaml_false" in fields[key].metadata:  # `key: off` in YAML
            value = fields[key].metadata["yaml_false"]
        nullable, inner = _optional(tp)
        if attrs.has(inner):
            kwargs[key] = None if (nullable and value is None) else build(inner, value, path, errors)
            continue
        ok, converted = _convert_scalar(value, tp)
        if not ok:
            errors.append(ConfigError(path, value, f"expected {_type_name(tp)}",
                                      f"set {path} to a value of type {_type_name(tp)}"))
            continue
        kwargs[key] = converted
    return cls(**kwargs)


def _resolve(tree, errors: list[ConfigError]) -> dict:
    """Resolve ``${...}`` interpolations; a key that fails to resolve is reported and dropped."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_container(tree, resolve=True)
    except OmegaConfBaseException:
        pass
    data = OmegaConf.to_container(tree, resolve=False)

    def walk(node, path):
        if isinstance(node, dict):
            for key in list(node):
                if walk(node[key], f"{path}.{key}" if path else str(key)) is _DROP:
                    del node[key]
        elif isinstance(node, str) and "${" in node:
            try:
                return OmegaConf.select(tree, path, throw_on_missing=True)
            except OmegaConfBaseException as exc:
                problem = str(exc).splitlines()[0]
                errors.append(ConfigError(path, node, f"cannot resolve interpolation: {problem}",
                                          "make every ${...} name an existing key"))
                return _DROP
        return None

    walk(data, "")
    return OmegaConf.to_container(OmegaConf.create(data), resolve=True)


_DROP = object()


def load_config(path: str | Path | None, overrides: list[str] = ()) -> tuple[RunConfig, list[ConfigError]]:
    """Read, override, interpolate and convert; return the config and every problem found."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    errors: list[ConfigError] = []
    tree = OmegaConf.create({})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            errors.append(ConfigError("CONFIG", str(path), "configuration file not found",
                                      "give the path of a YAML file, e.g. examples/arithmetic_grpo_lora.yaml"))
        else:
            try:
                loaded = OmegaConf.load(path)
                tree = loaded if loaded is not None else tree
            except (OmegaConfBaseException, ValueError, OSError) as exc:
                errors.append(ConfigError("CONFIG", str(path), f"cannot parse YAML: {exc}",
                                          "fix the YAML syntax"))
    for override in overrides:
        if "=" not in override:
            errors.append(ConfigError(override, override, "an override must be key=value",
                                      "write e.g. actor.lora_rank=8"))
            continue
        try:
            tree = OmegaConf.merge(tree, OmegaConf.from_dotlist([override]))
        except (OmegaConfBaseException, ValueError) as exc:
            errors.append(ConfigError(override.split("=", 1)[0], override.split("=", 1)[1],
                                      f"cannot apply override: {exc}", "check the key and value"))
    data = _resolve(tree, errors)
    config = build(RunConfig, data, "", errors)
    return config, errors


def load_config_or_raise(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    config, errors = load_config(path, overrides)
    if errors:
        raise ConfigInvalid(errors)
    return config


def config_to_dict(config: Any) -> dict:
    """The resolved configuration as plain data (for the run directory and logs)."""
    return attrs.asdict(config, recurse=True,
                        value_serializer=lambda _, __, v: list(v) if isinstance(v, tuple) else v)
