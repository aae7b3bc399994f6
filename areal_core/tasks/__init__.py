"""Datasets and rewards, chosen by name in the configuration (``dataset.name``, ``reward.name``).

A name is either a built-in (``BUILTIN_DATASETS``, ``BUILTIN_REWARDS``) or an import path
``package.module:function``.

- A dataset name resolves to a factory; ``get_dataset(name, options)`` calls ``factory(**options)``.
  The dataset it returns offers ``train_batch(position, size) -> list[dict]`` (records
  ``position .. position + size - 1`` of a reproducible train stream: the loop checkpoints
  ``position`` to resume), ``eval_records(limit=0) -> list[dict]`` (the held-out split), and may
  offer ``train_records(start)`` (the stream as an iterator). Every record holds ``prompt_ids``
  (token ids, the bos included) and whatever the reward needs (the built-in one: ``answer``).
- A reward name resolves to a function ``reward(prompt_record, completion_ids, **options) ->
  float``; ``get_reward(name, options)`` binds the options and returns a two-argument callable.
  A reward may be an object with two optional methods: ``check_options(**options)``, which
  ``get_reward`` calls first (to refuse bad options before any model is loaded), and
  ``drain_metrics() -> dict[str, float]``, counts of its own since its previous call (e.g. the
  math reward's ``reward_grader_timeouts``), which the loop adds to each step's record
  (``reward_metrics``).

Both check the options against the function's signature before building anything, and raise
``TaskResolutionError`` naming what is wrong and how to fix it. Nothing here imports torch.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any, Callable, Mapping

from areal_core.errors import ArealError

BUILTIN_DATASETS = {"arithmetic": "areal_core.tasks.arithmetic:make_dataset"}
BUILTIN_REWARDS = {"arithmetic": "areal_core.tasks.arithmetic:reward"}
BUILTIN_DATASETS["gsm8k"] = "areal_core.tasks.gsm8k:make_dataset"
BUILTIN_REWARDS["gsm8k"] = "areal_core.tasks.gsm8k:reward"
BUILTIN_DATASETS["math"] = "areal_core.tasks.math:make_dataset"
BUILTIN_REWARDS["math"] = "areal_core.tasks.math:reward"

RewardFn = Callable[[dict, "list[int]"], float]


class TaskResolutionError(ArealError, ValueError):
    """A dataset or reward name that is not a built-in, not importable, or given bad options."""


def _import_object(import_path: str, kind: str) -> Any:
    module_name, _, attribute_path = import_path.partition(":")
    if not module_name or not attribute_path:
        raise TaskResolutionError(
            f"{kind} import path {import_path!r} is malformed; write it as 'package.module:function'"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # an import error inside the user's module is theirs to read
        raise TaskResolutionError(
            f"cannot import module {module_name!r} of {kind} {import_path!r}: "
            f"{type(exc).__name__}: {exc}; check that the module is installed or on PYTHONPATH"
        ) from exc
    target: Any = module
    for attribute in attribute_path.split("."):
        try:
            target = getattr(target, attribute)
        except AttributeError:
            raise TaskResolutionError(
                f"module {module_name!r} has no attribute {attribute_path!r} "
                f"(from {kind} {import_path!r}); check the name after the ':'"
            ) from None
    if not callable(target):
        raise TaskResolutionError(
            f"{kind} {import_path!r} is a {type(target).__name__}, not a function; "
            f"point it at a callable"
        )
    return target


def import_function(import_path: str, kind: str) -> Callable:
    """The callable at ``package.module:function``; ``kind`` names it in errors
    (``TaskResolutionError``)."""
    return _import_object(import_path, kind)


def _resolve(name: str, builtins: Mapping[str, str], kind: str) -> Callable:
    if not isinstance(name, str) or not name.strip():
        raise TaskResolutionError(
            f"{kind} name is empty (got {name!r}); use a built-in "
            f"({', '.join(sorted(builtins))}) or an import path 'package.module:function'"
        )
    if name in builtins:
        return _import_object(builtins[name], kind)
    if ":" not in name:
        raise TaskResolutionError(
            f"unknown {kind} {name!r}; built-in {kind}s: {', '.join(sorted(builtins))}; "
            f"or give an import path 'package.module:function'"
        )
    return _import_object(name, kind)


def _check_options(function: Callable, leading_args: tuple, options: Mapping, what: str) -> None:
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # some builtins have no signature: let the call decide
        return
    try:
        signature.bind(*leading_args, **options)
    except TypeError as exc:
        accepted = [
            p.name
            for p in list(signature.parameters.values())[len(leading_args):]
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
        raise TaskResolutionError(
            f"{what} does not take options {dict(options)!r}: {exc}; "
            f"its options are: {', '.join(accepted) or 'none'}"
        ) from None


def _options(options: Mapping | None, kind: str) -> dict:
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise TaskResolutionError(f"{kind} options must be a mapping of names to values (got {options!r})")
    return dict(options)


def resolve_dataset_factory(name: str) -> Callable:
    """The dataset factory a built-in name or import path refers to (imported, not called)."""
    return _resolve(name, BUILTIN_DATASETS, "dataset")


def resolve_reward(name: str) -> Callable:
    """The reward function a built-in name or import path refers to (options not bound)."""
    return _resolve(name, BUILTIN_REWARDS, "reward")


def get_dataset(name: str, options: Mapping | None = None):
    """Build the dataset ``name`` (built-in or ``package.module:function``) with ``options``."""
    options = _options(options, "dataset")
    factory = resolve_dataset_factory(name)
    _check_options(factory, (), options, f"dataset {name!r}")
    return factory(**options)


def get_reward(name: str, options: Mapping | None = None) -> RewardFn:
    """The reward ``name`` (built-in or ``package.module:function``) with ``options`` bound:
    a callable ``(prompt_record, completion_ids) -> float``."""
    options = _options(options, "reward")
    function = resolve_reward(name)
    _check_options(function, (None, None), options, f"reward {name!r}")
    check = getattr(function, "check_options", None)
    if check is not None:
        check(**options)
    return functools.partial(function, **options) if options else function


def reward_metrics(reward_fn: RewardFn) -> dict:
    """What ``reward_fn`` (as ``get_reward`` returns it) counted since it was last asked: its
    ``drain_metrics()``, or nothing for a reward without one."""
    drain = getattr(getattr(reward_fn, "func", reward_fn), "drain_metrics", None)
    return dict(drain()) if drain is not None else {}


__all__ = [
    "BUILTIN_DATASETS",
    "BUILTIN_REWARDS",
    "TaskResolutionError",
    "get_dataset",
    "get_reward",
    "import_function",
    "reward_metrics",
    "resolve_dataset_factory",
    "resolve_reward",
]
