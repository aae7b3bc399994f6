"""YAML + ``key=value`` overrides -> a ``RunConfig``, reporting every problem at once.

OmegaConf reads the YAML, applies the command-line overrides and resolves ``${...}``
interpolation; the resolved tree is then converted into the attrs classes of
``areal_core.config``, collecting a ``ConfigError`` for each unknown key (with the closest valid
key suggested) and each value of the wrong type. A field with a bad value keeps its default so
that the remaining checks can still run and report their own errors.

``adapters:`` entries are converted the same way, each keyed ``adapters.<name>.<key>``; the keys an
entry leaves out are filled from the run's own (converted) settings first
(``config.ADAPTER_DEFAULTS_FROM``; ``optimizer`` and ``gconfig`` key by key), so a loaded
``AdapterConfig`` is complete. A command-line override names an entry by its name,
``adapters.<name>.<key>=value`` (or by its index, ``adapters.<i>.<key>=value``).
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any

import attrs

from areal_core.config import ADAPTER_DEFAULTS_FROM, ADAPTER_MERGED_KEYS, AdapterConfig, RunConfig
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


_ENTRY_KEY = re.compile(r"^(adapters(?:\.[^.\[\]]+|\[\d+\]))\.(.+)$")


def _as_run_key(path: str) -> tuple[str, dict[str, str]]:
    """The run-level key an ``adapters:`` entry's key stands for, and how to name run keys back in
    that entry: ``adapters.sub.optimizer.beta1`` -> ``actor.optimizer.beta1`` and
    ``{"actor.optimizer": "adapters.sub.optimizer", ...}``. Any other path maps to itself.

    An entry key the entry has no field for is tried as an ``actor.*`` key, since an entry's own
    top-level keys are the adapter's ``actor.*`` settings."""
    match = _ENTRY_KEY.match(path)
    if not match:
        return path, {}
    entry, rest = match.groups()
    head, _, tail = rest.partition(".")
    in_entry = {run: f"{entry}.{key}" for key, run in ADAPTER_DEFAULTS_FROM.items()}
    if head in ADAPTER_DEFAULTS_FROM:
        return ADAPTER_DEFAULTS_FROM[head] + (f".{tail}" if tail else ""), in_entry
    return f"actor.{rest}", in_entry


def _name_in_entry(text: str, in_entry: dict[str, str]) -> str:
    """``text`` with each run key that an entry key overrides renamed to that entry key; a run key
    no entry key overrides is marked as shared by every adapter."""
    if not in_entry:
        return text
    keys = sorted(in_entry, key=len, reverse=True)
    pattern = re.compile(r"(?<![\w.])(" + "|".join(re.escape(k) for k in keys) + r")(?![\w])")
    renamed = pattern.sub(lambda m: in_entry[m.group(1)], text)
    if renamed == text and re.match(r"write [a-z_]+\.", text):
        return text + " (a setting of the run, shared by every adapter: not a key of an entry)"
    return renamed


def _attrs_item_type(tp: Any) -> type | None:
    """``X`` of ``list[X]`` where ``X`` is an attrs class; None otherwise."""
    if typing.get_origin(tp) is list:
        args = typing.get_args(tp)
        if len(args) == 1 and attrs.has(args[0]):
            return args[0]
    return None


def entry_prefix(prefix: str, items: list, index: int) -> str:
    """How the keys of list entry ``index`` are named: ``<prefix>.<name>`` for an entry with a
    name no other entry has (``adapters.sub``), ``<prefix>[<index>]`` otherwise."""
    item = items[index]
    name = item.get("name") if isinstance(item, dict) else None
    names = [i.get("name") for i in items if isinstance(i, dict)]
    if isinstance(name, str) and name and names.count(name) == 1 and not any(c in name for c in " \t\n[]="):
        return f"{prefix}.{name}"
    return f"{prefix}[{index}]"


def build_list(cls: type, items: list, prefix: str, errors: list[ConfigError]) -> list:
    """Build each entry of a list of attrs class ``cls`` (keys named as ``entry_prefix`` says)."""
    return [build(cls, item, entry_prefix(prefix, items, i), errors) for i, item in enumerate(items)]


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
        run_key, in_entry = _as_run_key(path)
        if key not in fields and run_key in RETIRED_KEYS:
            problem, fix = RETIRED_KEYS[run_key]
            errors.append(ConfigError(path, value, problem, _name_in_entry(fix, in_entry)))
            continue
        if key not in fields:
            if run_key in REFERENCE_NAMES:
                errors.append(ConfigError(path, value, "the reference system's name; not a key here",
                                          _name_in_entry(f"write {REFERENCE_NAMES[run_key]}", in_entry)))
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
        item_type = _attrs_item_type(inner)
        if item_type is not None:
            if value is None or isinstance(value, list):
                kwargs[key] = build_list(item_type, value or [], path, errors)
            else:
                errors.append(ConfigError(path, value, f"expected a list of {item_type.__name__} entries",
                                          f"write {path} as a YAML list (- name: ... lines)"))
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
    merged_into: set[tuple[int, str]] = set()  # (entry index, key) an override reached into
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
            if _ADAPTER_OVERRIDE.match(override.split("=", 1)[0]):
                _apply_adapter_override(tree, override, errors, merged_into)
            else:
                tree = OmegaConf.merge(tree, OmegaConf.from_dotlist([override]))
        except (OmegaConfBaseException, ValueError) as exc:
            errors.append(ConfigError(override.split("=", 1)[0], override.split("=", 1)[1],
                                      f"cannot apply override: {exc}", "check the key and value"))
    data = _resolve(tree, errors)
    raw_adapters = data.pop("adapters", None) if isinstance(data, dict) else None
    config = build(RunConfig, data, "", errors)
    if raw_adapters is not None:
        if not isinstance(raw_adapters, list):
            errors.append(ConfigError("adapters", raw_adapters, "expected a list of adapter entries",
                                      "write adapters: as a YAML list, one '- name: ...' entry per adapter"))
        else:
            filled = [fill_adapter_entry(entry, config, entry_prefix("adapters", raw_adapters, i), errors,
                                         {key for index, key in merged_into if index == i})
                      for i, entry in enumerate(raw_adapters)]
            config = attrs.evolve(config, adapters=build_list(AdapterConfig, filled, "adapters", errors))
    return config, errors


def _run_setting(config: RunConfig, path: str) -> Any:
    """The converted value at dotted ``path`` of ``config``, as plain data (mappings as dicts)."""
    value: Any = config
    for part in path.split("."):
        value = getattr(value, part)
    if attrs.has(type(value)):
        return config_to_dict(value)
    return list(value) if isinstance(value, (list, tuple)) else value


def fill_adapter_entry(entry: Any, config: RunConfig, prefix: str, errors: list[ConfigError],
                       merged_into: set[str] = frozenset()) -> Any:
    """``entry`` (one raw ``adapters:`` item) with every key it leaves out taken from the run's own
    settings (``ADAPTER_DEFAULTS_FROM``): ``optimizer`` and ``gconfig`` key by key over
    ``actor.optimizer`` and ``gconfig``, the others whole. A key in ``merged_into`` (one the entry
    did not set, which an override such as ``adapters.sub.dataset.options.operation=sub`` reached
    into) is the run's setting with the override's keys merged in. ``gconfig.lora_name`` is the
    entry's name; an entry naming another is refused. An entry that is not a mapping is returned
    as is (``build`` reports it)."""
    if not isinstance(entry, dict):
        return entry
    filled = dict(entry)
    name = entry.get("name")
    gconfig = entry.get("gconfig")
    if isinstance(gconfig, dict) and "lora_name" in gconfig:
        if gconfig["lora_name"] != name:  # equal: a run directory's own config.yaml read back
            errors.append(ConfigError(
                f"{prefix}.gconfig.lora_name", gconfig["lora_name"],
                "an adapter's lora name is its name: its versions are served as <name>-v<N>",
                f"delete {prefix}.gconfig.lora_name (and give the adapter the name you want in 'name:')"))
        filled["gconfig"] = {k: v for k, v in gconfig.items() if k != "lora_name"}
    for key, source in ADAPTER_DEFAULTS_FROM.items():
        inherited = _run_setting(config, source)
        if key not in filled:
            filled[key] = inherited
        elif key in merged_into and isinstance(filled[key], dict) and isinstance(inherited, dict):
            filled[key] = _merged(inherited, filled[key])
        elif key in ADAPTER_MERGED_KEYS and isinstance(filled[key], dict):
            filled[key] = {**inherited, **filled[key]}
    if isinstance(filled.get("gconfig"), dict) and isinstance(name, str):
        filled["gconfig"] = {**filled["gconfig"], "lora_name": name}
    return filled


def _merged(base: dict, update: dict) -> dict:
    """``base`` with ``update`` merged in, mappings key by key at every depth."""
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _merged(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


#: ``adapters.<name or index>[.<key>...]`` and ``adapters[<index>][.<key>...]``.
_ADAPTER_OVERRIDE = re.compile(r"^adapters(\.|\[)")


def _adapter_names(tree) -> list:
    from omegaconf import OmegaConf

    adapters = OmegaConf.to_container(tree, resolve=False).get("adapters") if "adapters" in tree else None
    if not isinstance(adapters, list):
        return []
    return [entry.get("name") if isinstance(entry, dict) else None for entry in adapters]


def _apply_adapter_override(tree, override: str, errors: list[ConfigError],
                            merged_into: set[tuple[int, str]]) -> None:
    """Apply ``adapters.<name>.<key>=value`` (or ``adapters.<i>...``, ``adapters[<i>]...``) to the
    entry of that name (index) in ``tree``; an unknown name or index is reported. An override
    below a key the entry does not set (``adapters.sub.dataset.options.x=1``) is added to
    ``merged_into``, so that the entry's key is the run's setting with it, not that key alone."""
    from omegaconf import OmegaConf

    key, raw_value = override.split("=", 1)
    names = _adapter_names(tree)
    listed = ", ".join(str(n) for n in names) if names else "none (the config has no adapters: list)"
    rest = key[len("adapters"):]
    index: int | None = None
    bracket = re.match(r"^\[(\d+)\](.*)$", rest)
    if bracket:
        index, rest = int(bracket.group(1)), bracket.group(2)
    else:
        rest = rest[1:]  # after "adapters."
        # the longest name the key starts with (a name may hold dots)
        for i, name in sorted(enumerate(names), key=lambda item: -len(str(item[1]))):
            if isinstance(name, str) and name and (rest == name or rest.startswith(name + ".")):
                index, rest = i, rest[len(name):]
                break
        else:
            head = rest.split(".", 1)[0]
            if head.isdigit():
                index, rest = int(head), rest[len(head):]
            else:
                errors.append(ConfigError(key, raw_value, f"no adapter named {head!r}",
                                          f"name one of the adapters listed: {listed}"))
                return
    if index >= len(names):
        errors.append(ConfigError(key, raw_value, f"no adapter at index {index} (the list has {len(names)})",
                                  f"use an index below {len(names)} or a name: {listed}"))
        return
    if rest and not rest.startswith("."):
        errors.append(ConfigError(key, raw_value, "malformed adapter override",
                                  "write adapters.<name>.<key>=value, e.g. adapters.sub.lora_rank=32"))
        return
    value = OmegaConf.to_container(OmegaConf.from_dotlist([f"value={raw_value}"]), resolve=False)["value"]
    parts = rest[1:].split(".") if rest else []
    entry = tree.adapters[index]
    if len(parts) > 1 and parts[0] in ADAPTER_DEFAULTS_FROM and (not hasattr(entry, "get") or parts[0] not in entry):
        merged_into.add((index, parts[0]))
    OmegaConf.update(tree, f"adapters[{index}]{rest}", value, merge=True)


def load_config_or_raise(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    config, errors = load_config(path, overrides)
    if errors:
        raise ConfigInvalid(errors)
    return config


def config_to_dict(config: Any) -> dict:
    """The resolved configuration as plain data (for the run directory and logs)."""
    return attrs.asdict(config, recurse=True,
                        value_serializer=lambda _, __, v: list(v) if isinstance(v, tuple) else v)
