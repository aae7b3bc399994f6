"""``areal merge``: a LoRA adapter folded into its base model, written as a full model directory.

``plan_merge`` checks everything that can be checked without loading a weight (the dtype, that
the output path is free, the adapter directory as the interchange format defines it, the base
model directory, and that every LoRA tensor fits a linear weight of the base, from safetensors
headers), and raises ``MergeError`` naming what is wrong and how to fix it. ``merge`` then loads
the base, applies the adapter with peft, merges it (``merge_and_unload``) and writes::

    config.json                      the base's, with "dtype" the dtype the weights are written in
    model*.safetensors (+ index)     the merged weights, sharded at --max-shard-size
    generation_config.json           copied from the base
    tokenizer files                  copied from the base

into a staging directory beside the output, renamed into place once complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import attrs

from areal_core.adapter_format import verify_adapter_dir
from areal_core.config import DTYPES, ActorConfig, RunConfig
from areal_core.errors import ArealError
from areal_core.grpo.adapter_admission import base_linear_shapes, check_fits_base_model
from areal_core.hub import resolve_model
from areal_core.safetensors_writer import DTYPE_CODES
from areal_core.staged_directory import fsync_files, staged_directory
from areal_core.validation import check_model_dir, read_model_config

#: What travels from the base directory unchanged, besides the weights and config.json. A list,
#: not "everything else": other files there (the demo's recipe marker, say) describe the base.
COPIED_FILES = (
    "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
    "chat_template.jinja", "chat_template.json",
)
DEFAULT_MAX_SHARD_SIZE = "5GB"


class MergeError(ArealError):
    """A merge refused (before any weight is loaded) or given up midway; nothing was written."""


@attrs.frozen
class MergePlan:
    """A merge that passed every check: absolute paths and the dtype the weights are written in."""

    adapter: Path
    base: Path
    out: Path
    dtype: str
    max_shard_size: str = DEFAULT_MAX_SHARD_SIZE


def _base_dtype(base: Path) -> str | None:
    """The dtype the base's config.json declares, else that of its first safetensors tensor."""
    config = read_model_config(str(base)) or {}
    declared = config.get("dtype") or config.get("torch_dtype")
    if declared:
        return str(declared).removeprefix("torch.")
    from safetensors import safe_open

    names = {code: name for name, code in DTYPE_CODES.items()}
    for path in sorted(base.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                return names.get(handle.get_slice(key).get_dtype())
    return None


def _check_shard_size(size: str) -> None:
    from transformers.utils.hub import convert_file_size_to_int

    try:
        valid = convert_file_size_to_int(size) > 0
    except (ValueError, TypeError):
        valid = False
    if not valid:
        raise MergeError(f"--max-shard-size {size!r} is not a size; write a whole number and a unit, "
                         f"e.g. 2GB or 500MB")


def plan_merge(adapter: str | os.PathLike, base: str, out: str | os.PathLike, *,
               dtype: str | None = None, max_shard_size: str | None = None) -> MergePlan:
    """Every check of a merge, reading JSON files and safetensors headers only.

    :param adapter: a PEFT LoRA directory (``adapter_config.json`` + ``adapter_model.safetensors``).
    :param base: the base model: a local Hugging Face directory, or a Hub id (``org/name``,
        ``org/name@revision``) resolved through the Hugging Face cache, downloaded when missing
        unless ``HF_HUB_OFFLINE=1`` (``areal_core.hub``).
    :param out: where the merged model goes; must not exist.
    :param dtype: float32, bfloat16 or float16; None: the base's dtype.
    :param max_shard_size: the largest safetensors file, as ``save_pretrained`` takes it ("2GB");
        None: ``DEFAULT_MAX_SHARD_SIZE``.
    :raises MergeError: naming the problem and its fix.
    """
    if dtype is not None and dtype not in DTYPES:
        raise MergeError(f"--dtype {dtype!r} is not a dtype areal merge writes; use one of {', '.join(DTYPES)}")
    out_path = Path(out).absolute()
    if max_shard_size is not None:
        _check_shard_size(max_shard_size)
    if os.path.lexists(out_path):
        raise MergeError(f"--out {out_path} already exists; a merge never overwrites: choose a new path "
                         f"or remove it first")
    adapter_path = Path(adapter).absolute()
    try:
        verify_adapter_dir(adapter_path)
    except ArealError as exc:  # its messages name the directory and the fix
        raise MergeError(str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - bad JSON, no permission, or a SafetensorError (a bare Exception)
        raise MergeError(f"adapter {adapter_path} is unreadable ({type(exc).__name__}: {exc}); "
                         f"export it again or point at another adapter directory") from exc
    try:
        base_path = Path(resolve_model(base, download=True).path).absolute()
    except ArealError as exc:  # HubResolutionError: neither a directory nor an id the cache or Hub has
        raise MergeError(f"--base {base}: {exc}") from exc
    problems = check_model_dir(RunConfig(actor=ActorConfig(path=str(base_path))))
    if problems:
        details = "; ".join(f"{p.problem}; fix: {p.fix}" if p.key == "actor.path"
                            else f"{p.problem}, which areal merge does not run" for p in problems)
        raise MergeError(f"--base {base_path}: {details}")
    try:
        shapes = base_linear_shapes(base_path)
        written_dtype = dtype or _base_dtype(base_path)
    except Exception as exc:  # noqa: BLE001 - a corrupt header raises SafetensorError, a bare Exception
        raise MergeError(f"--base {base_path}: its safetensors files are unreadable "
                         f"({type(exc).__name__}: {exc})") from exc
    try:
        check_fits_base_model(adapter_path, shapes)
    except ArealError as exc:
        raise MergeError(f"the adapter does not fit --base {base_path}: {exc}; merge it into the model "
                         f"it was trained on") from exc
    if written_dtype not in DTYPES:
        raise MergeError(f"--base {base_path} is stored as {written_dtype or 'an unknown dtype'}; give "
                         f"--dtype (one of {', '.join(DTYPES)}) for the merged weights")
    return MergePlan(adapter_path, base_path, out_path, written_dtype, max_shard_size or DEFAULT_MAX_SHARD_SIZE)


def merged_model(plan: MergePlan):
    """The base with the adapter merged into its weights, in ``plan.dtype`` (a transformers model)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # W + scale * B @ A is formed in float32 and rounded to the target dtype once; merging in
    # bfloat16 would round the product B @ A, then the sum, each to 8 bits of mantissa.
    model = AutoModelForCausalLM.from_pretrained(str(plan.base), dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(plan.adapter))
    try:
        merged = model.merge_and_unload(safe_merge=True)  # safe_merge: checks for NaN before it commits
    except ValueError as exc:
        raise MergeError(f"merging {plan.adapter} gave NaN weights ({exc}); the adapter is broken") from exc
    return merged.to(getattr(torch, plan.dtype))


def merge(plan: MergePlan) -> Path:
    """Write the merged model of ``plan`` to ``plan.out``, atomically; return ``plan.out``."""
    model = merged_model(plan)
    if os.path.lexists(plan.out):  # appeared while the weights loaded
        raise MergeError(f"--out {plan.out} appeared during the merge; nothing was written")
    with staged_directory(plan.out) as staging:
        model.save_pretrained(str(staging), safe_serialization=True, max_shard_size=plan.max_shard_size)
        for name in COPIED_FILES:
            if (plan.base / name).is_file():
                shutil.copyfile(plan.base / name, staging / name)
        written = json.loads((staging / "config.json").read_text()).get("dtype")
        if written != plan.dtype:
            raise MergeError(f"the merged config.json says dtype {written!r}, not {plan.dtype!r}")
        fsync_files(staging)
    return plan.out
