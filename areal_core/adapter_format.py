"""The adapter interchange format: a PEFT LoRA directory, written atomically, read with checks.

Layout (what ``peft.PeftModel.from_pretrained``, vLLM and SGLang all read)::

    adapter_config.json         peft_type LORA, r, lora_alpha, target_modules (short names, sorted)
    adapter_model.safetensors   base_model.model.<module path>.lora_A.weight / .lora_B.weight
    areal_manifest.json         sizes and sha256 of the two files above, and the adapter version

The directory appears under its final name only when complete: files go to a temporary sibling
directory, are flushed to disk, and the directory is renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from areal_core.errors import AdapterError
from areal_core.interfaces import ExportedAdapter
from areal_core.staged_directory import staged_directory

if TYPE_CHECKING:  # pragma: no cover
    import torch

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MANIFEST_FILE = "areal_manifest.json"
KEY_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def peft_key(module_path: str, which: str) -> str:
    """The file key of a module's lora_A or lora_B weight (``which`` is "A" or "B")."""
    return f"{KEY_PREFIX}{module_path}.lora_{which}.weight"


def parse_peft_key(key: str) -> tuple[str, str]:
    """``(module_path, "A"|"B")`` of a file key; AdapterError when the key is not PEFT LoRA."""
    match = _KEY.match(key)
    if not match:
        raise AdapterError(
            f"tensor key {key!r} is not a PEFT LoRA key "
            f"('{KEY_PREFIX}<module path>.lora_A.weight' or '.lora_B.weight')"
        )
    return match["module"], match["ab"]


def adapter_config(rank: int, alpha: float, target_modules, base_model_path: str = "") -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": int(rank),
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(set(target_modules)),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "use_dora": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "base_model_name_or_path": base_model_path,
        "inference_mode": True,
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "xb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def check_tensors(tensors: Mapping[str, "torch.Tensor"], rank: int) -> list[str]:
    """Validate LoRA tensors; return the sorted short target-module names they cover."""
    modules: dict[str, set[str]] = {}
    for key, tensor in tensors.items():
        module, which = parse_peft_key(key)
        modules.setdefault(module, set()).add(which)
        r = tensor.shape[0] if which == "A" else tensor.shape[1]
        if tensor.dim() != 2 or r != rank:
            raise AdapterError(
                f"{key}: shape {tuple(tensor.shape)} does not match rank {rank} "
                f"(lora_A is [rank, in_features], lora_B is [out_features, rank])"
            )
    for module, parts in modules.items():
        if parts != {"A", "B"}:
            raise AdapterError(f"module {module} has lora_{''.join(parts)} but not both A and B")
    if not modules:
        raise AdapterError("the adapter holds no LoRA tensors")
    return sorted({m.rsplit(".", 1)[-1] for m in modules})


def write_peft_adapter(
    directory: str | os.PathLike,
    tensors: Mapping[str, "torch.Tensor"],
    *,
    rank: int,
    alpha: float,
    version: int,
    base_model_path: str = "",
) -> ExportedAdapter:
    """Write ``tensors`` (PEFT file keys -> tensors) as a PEFT LoRA directory, atomically.

    Refuses to overwrite an existing directory: a version is written once.
    """
    from areal_core.safetensors_writer import write_safetensors

    start = time.perf_counter()
    final = Path(directory).absolute()
    if final.exists():
        raise AdapterError(f"adapter directory {final} already exists; versions are never rewritten")
    target_modules = check_tensors(tensors, rank)
    with staged_directory(final) as staging:
        on_cpu = {k: v.detach().to("cpu") for k, v in tensors.items()}
        weights_bytes, weights_sha256 = write_safetensors(staging / WEIGHTS_FILE, on_cpu, {"format": "pt"})
        config = adapter_config(rank, alpha, target_modules, base_model_path)
        config_text = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
        manifest = {
            "version": version,
            "files": {
                CONFIG_FILE: {"bytes": len(config_text), "sha256": hashlib.sha256(config_text).hexdigest()},
                WEIGHTS_FILE: {"bytes": weights_bytes, "sha256": weights_sha256},
            },
        }
        _write_durably(staging / CONFIG_FILE, config_text)
        manifest_text = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
        _write_durably(staging / MANIFEST_FILE, manifest_text)
    return ExportedAdapter(
        path=str(final),
        version=version,
        rank=int(rank),
        alpha=alpha,
        target_modules=tuple(target_modules),
        num_bytes=(final / WEIGHTS_FILE).stat().st_size,
        seconds=time.perf_counter() - start,
    )


def verify_adapter_dir(directory: str | os.PathLike, *, checksums: bool = True) -> dict:
    """Check an adapter directory before it is handed to a server; return its adapter config.

    Refuses pickled weights, missing files, a manifest whose sizes or checksums disagree with
    the files, and a config whose rank disagrees with the tensors. With ``checksums=False`` the
    SHA-256 of the files is left to a ``ChecksumCheck`` that runs while a server reads them.
    """
    path = Path(directory)
    if not path.is_dir():
        raise AdapterError(f"adapter directory {path} does not exist")
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLED_SUFFIXES)
    if pickled:
        raise AdapterError(
            f"adapter directory {path} holds pickled weights ({', '.join(pickled)}); "
            f"only safetensors are accepted: save with safe_serialization=True"
        )
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise AdapterError(f"adapter directory {path} has no {name}")
    for actual, expected in _manifest_entries(path):
        if not actual.is_file() or actual.stat().st_size != expected["bytes"]:
            raise AdapterError(f"{actual}: size differs from its manifest (truncated or changed)")
    if checksums:
        _check_checksums(path)
    config = json.loads((path / CONFIG_FILE).read_text())
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise AdapterError(f"{path / CONFIG_FILE}: peft_type {config.get('peft_type')!r} is not LORA")
    from safetensors import safe_open

    modules = set()
    with safe_open(str(path / WEIGHTS_FILE), framework="pt") as handle:
        for key in handle.keys():
            module, which = parse_peft_key(key)
            modules.add(module.rsplit(".", 1)[-1])
            shape = handle.get_slice(key).get_shape()
            r = shape[0] if which == "A" else shape[1]
            if r != config.get("r"):
                raise AdapterError(
                    f"{path}: tensor {key} has rank {r} but adapter_config.json says r={config.get('r')}"
                )
    declared = config.get("target_modules")
    if isinstance(declared, list) and set(declared) != modules:
        raise AdapterError(
            f"{path}: adapter_config.json target_modules {sorted(declared)} disagree with the "
            f"tensors, which adapt {sorted(modules)}"
        )
    return config


def _manifest_entries(path: Path) -> list[tuple[Path, dict]]:
    """``(file, its manifest entry)`` for each file the manifest lists (none without a manifest)."""
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        return []
    manifest = json.loads(manifest_path.read_text())
    return [(path / name, expected) for name, expected in manifest.get("files", {}).items()]


def _check_checksums(path: Path) -> None:
    for actual, expected in _manifest_entries(path):
        if _sha256(actual) != expected["sha256"]:
            raise AdapterError(f"{actual}: checksum differs from its manifest (changed after export)")


class ChecksumCheck:
    """The manifest's SHA-256 check of an adapter directory, in a thread of its own.

    A server plugin starts it after ``verify_adapter_dir(path, checksums=False)`` and sends the
    load meanwhile: hashing (about 25 ms for a 35 MB adapter) then overlaps the server's own
    reading of the files instead of coming before it. The plugin calls ``result()`` before it
    reports the version live, and unloads the version on a mismatch, so no request ever uses
    an adapter whose files changed after export. (The GRPO loop's admission check hashes the
    files before any load as well.)
    """

    def __init__(self, directory: str | os.PathLike):
        self._path = Path(directory)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="adapter-checksums", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            _check_checksums(self._path)
        except BaseException as exc:  # noqa: BLE001 - raised by result() in the caller's thread
            self._error = exc

    def result(self) -> None:
        """Wait for the check; raise its AdapterError (or what else stopped it)."""
        self._thread.join()
        if self._error is not None:
            raise self._error

    def join(self) -> None:
        """Wait for the check without raising (on a path that already failed)."""
        self._thread.join()

    def explain(self, message: str) -> str:
        """``message`` (a server's refusal), with the mismatch appended if the check found one:
        a server may refuse files that changed after export before the hash tells why."""
        self.join()
        return f"{message}; and {self._error}" if isinstance(self._error, AdapterError) else message
