"""Model paths that may be Hugging Face Hub ids, resolved through the user's local cache.

``actor.path``, ``dataset.options.tokenizer_path`` and ``reward.options.tokenizer_path`` take a
local directory or a Hub id ``org/name`` (optionally ``org/name@revision``). An existing local
directory always wins over a Hub id of the same spelling. An id is resolved with
``huggingface_hub.snapshot_download``: from the cache only for ``areal check`` (which never
downloads weights) and whenever ``HF_HUB_OFFLINE=1``; online, ``areal train`` downloads what
the cache lacks. What the ranks, the servers and ``config.yaml`` get is the snapshot directory
(``.../models--org--name/snapshots/<commit>``), which names the commit it holds. An ``adapters:``
entry with a dataset or reward of its own has those keys too (``adapters.<name>.dataset.options.
tokenizer_path``); an entry that inherits the run's gets the run's resolution with it.
"""

from __future__ import annotations

import re
from pathlib import Path

import attrs

from areal_core.errors import ArealError

#: The config keys that name a model directory, in the order they are resolved.
MODEL_PATH_KEYS = ("actor.path", "dataset.options.tokenizer_path", "reward.options.tokenizer_path")
#: Those of them an ``adapters:`` entry may set for itself.
ADAPTER_MODEL_PATH_KEYS = ("dataset.options.tokenizer_path", "reward.options.tokenizer_path")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*(@[A-Za-z0-9_.\-/]+)?$")
_SNAPSHOT = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<commit>[0-9a-f]{40})/?$")


class HubResolutionError(ArealError, ValueError):
    """A model path that is neither a local directory nor a Hub id the cache (or Hub) has."""

    def __init__(self, problem: str, fix: str):
        super().__init__(f"{problem}; {fix}")
        self.problem, self.fix = problem, fix


@attrs.frozen
class ResolvedModel:
    spec: str  # what the configuration says
    path: str  # the local directory
    repo_id: str | None = None  # set when ``spec`` was a Hub id
    revision: str | None = None
    commit: str | None = None


def looks_like_hub_id(spec: str) -> bool:
    return bool(_HUB_ID.match(spec)) and not spec.startswith((".", "/", "~"))


def split_hub_id(spec: str) -> tuple[str, str | None]:
    repo_id, _, revision = spec.partition("@")
    return repo_id, revision or None


def snapshot_source(path: str) -> tuple[str, str] | None:
    """(repo id, commit) of a Hugging Face cache snapshot directory; None for any other path."""
    match = _SNAPSHOT.search(str(path))
    return (f"{match['org']}/{match['name']}", match["commit"]) if match else None


def cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def resolve_model(spec: str, *, download: bool) -> ResolvedModel:
    """The local directory of ``spec``: itself if it is a directory, else the cached snapshot of
    the Hub id, downloaded first when ``download`` and online. Raises ``HubResolutionError``."""
    if Path(spec).expanduser().is_dir():
        return ResolvedModel(spec=spec, path=spec)
    if not looks_like_hub_id(spec):
        raise HubResolutionError(
            f"{spec!r} is not a local directory, and not a Hub id (org/name or org/name@revision)",
            "give a directory holding config.json and *.safetensors, or a Hub id")
    from huggingface_hub import is_offline_mode, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    repo_id, revision = split_hub_id(spec)
    offline = is_offline_mode()
    cache_only = offline or not download
    try:
        path = snapshot_download(repo_id, revision=revision, local_files_only=cache_only)
    except LocalEntryNotFoundError:
        wanted = f"{repo_id} at revision {revision}" if revision else repo_id
        if offline:
            fix = (f"download it on a machine that is online (`hf download {repo_id}"
                   f"{' --revision ' + revision if revision else ''}`) into this cache, or unset HF_HUB_OFFLINE")
        else:
            fix = (f"`areal train` downloads it; to check first, fetch it with `hf download {repo_id}"
                   f"{' --revision ' + revision if revision else ''}`")
        raise HubResolutionError(
            f"{spec!r} is not a local directory, and the Hub model {wanted} is not in the Hugging Face cache "
            f"{cache_dir()} (HF_HOME/HF_HUB_CACHE choose it){' and HF_HUB_OFFLINE=1 forbids downloading' if offline else ''}",
            f"{fix}; or, if you meant a local directory, check the path") from None
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise HubResolutionError(
            f"{spec!r} is not a local directory, and the Hub has no model {repo_id!r} you may read "
            f"({type(exc).__name__})", "check the id, or log in (`hf auth login`) for a private or gated model") from None
    except RevisionNotFoundError:
        raise HubResolutionError(f"the Hub model {repo_id!r} has no revision {revision!r}",
                                 "give a branch, tag or commit it has") from None
    except HfHubHTTPError as exc:
        raise HubResolutionError(f"cannot download {repo_id!r} from the Hub: {exc}",
                                 "check the connection, or set HF_HUB_OFFLINE=1 to use the cache only") from None
    source = snapshot_source(path)
    return ResolvedModel(spec=spec, path=str(path), repo_id=repo_id, revision=revision,
                         commit=source[1] if source else Path(path).name)


def _lookup(config, key: str):
    section, *rest = key.split(".")
    if section == "adapters":  # adapters.<name>.<key>, where a name may hold dots
        named = [e for e in config.adapters if key.startswith(f"adapters.{e.name}.")]
        node = max(named, key=lambda e: len(e.name), default=None)
        rest = key[len(f"adapters.{node.name}."):].split(".") if node is not None else []
    else:
        node = getattr(config, section)
    for part in rest:
        node = node.get(part) if isinstance(node, dict) else getattr(node, part, None)
    return node


def model_path_keys(config, *, inherited: bool = True) -> list[str]:
    """``MODEL_PATH_KEYS``, then each ``adapters:`` entry's (``adapters.<name>.<key>``); with
    ``inherited=False`` only those of an entry whose value differs from the run's."""
    keys = list(MODEL_PATH_KEYS)
    for entry in getattr(config, "adapters", ()) or ():
        for key in ADAPTER_MODEL_PATH_KEYS:
            own = f"adapters.{entry.name}.{key}"
            if inherited or _lookup(config, own) != _lookup(config, key):
                keys.append(own)
    return keys


def resolve_model_paths(config, *, download: bool) -> tuple[dict[str, ResolvedModel], list]:
    """Each model-path key of ``config`` that holds a Hub id -> its resolution, and a
    ``ConfigError`` for each that cannot be resolved. Local directories are left out."""
    from areal_core.errors import ConfigError

    resolved, errors, by_spec = {}, [], {}
    for key in model_path_keys(config):
        spec = _lookup(config, key)
        if not isinstance(spec, str) or not spec or Path(spec).expanduser().is_dir():
            continue
        if not looks_like_hub_id(spec):
            continue  # the model-directory checks say what is wrong with it
        if spec in by_spec:  # an adapter entry's copy of the run's own
            if by_spec[spec] is not None:
                resolved[key] = by_spec[spec]
            continue
        try:
            resolved[key] = by_spec[spec] = resolve_model(spec, download=download)
        except HubResolutionError as exc:
            by_spec[spec] = None
            errors.append(ConfigError(key, spec, exc.problem, exc.fix))
    return resolved, errors


def path_overrides(resolved: dict[str, ResolvedModel]) -> list[str]:
    """``key=<local path>`` overrides that point the run at the resolved snapshots."""
    return [f"{key}={model.path}" for key, model in resolved.items()]


def provenance_comment(config) -> str:
    """YAML comment lines naming the Hub model and commit of each model path in a cache snapshot."""
    lines = []
    for key in model_path_keys(config, inherited=False):
        source = snapshot_source(_lookup(config, key) or "")
        if source:
            lines.append(f"# {key}: Hugging Face Hub model {source[0]}, commit {source[1]}\n")
    return "".join(lines)
