"""What an exported adapter must pass before rank 0 hands it to a rollout server.

``verify_adapter_dir`` (the interchange format's own check) refuses pickled weights, missing
files, files that differ from their manifest, and a config whose rank or target modules disagree
with the tensors. An export of this run must also carry its manifest, say what the engine
exported (version, rank, alpha, target modules), and fit the base model: every lora_A is
``[rank, in_features]`` and every lora_B ``[out_features, rank]`` of a module the base model has.
The base model's shapes come from the headers of its safetensors files; no weight is read.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from areal_core.adapter_format import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE, parse_peft_key, verify_adapter_dir
from areal_core.errors import AdapterError
from areal_core.interfaces import ExportedAdapter


def base_linear_shapes(model_dir: str | Path) -> dict[str, tuple[int, int]]:
    """``module path -> (out_features, in_features)`` of every 2-D ``*.weight`` in ``model_dir``.

    Reads only the safetensors headers. Returns {} when the directory holds no safetensors.
    """
    from safetensors import safe_open

    shapes: dict[str, tuple[int, int]] = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                if not key.endswith(".weight"):
                    continue
                shape = handle.get_slice(key).get_shape()
                if len(shape) == 2:
                    shapes[key[: -len(".weight")]] = (int(shape[0]), int(shape[1]))
    return shapes


def check_fits_base_model(directory: str | Path, base_shapes: dict[str, tuple[int, int]]) -> None:
    """Refuse tensors that name a module the base model lacks or have the wrong shape for it."""
    from safetensors import safe_open

    with safe_open(str(Path(directory) / WEIGHTS_FILE), framework="pt") as handle:
        for key in handle.keys():
            module, which = parse_peft_key(key)
            if module not in base_shapes:
                raise AdapterError(
                    f"{directory}: tensor {key} adapts {module}, which the base model has no "
                    f"linear weight for; the adapter was trained on another model"
                )
            out_features, in_features = base_shapes[module]
            shape = tuple(handle.get_slice(key).get_shape())
            expected_features = in_features if which == "A" else out_features
            features = shape[1] if which == "A" else shape[0]
            if len(shape) != 2 or features != expected_features:
                layout = "[rank, in_features]" if which == "A" else "[out_features, rank]"
                raise AdapterError(
                    f"{directory}: tensor {key} has shape {shape} but {module} of the base model "
                    f"is {out_features}x{in_features} (out x in), so lora_{which} must be {layout} "
                    f"with {'in' if which == 'A' else 'out'}_features={expected_features}; the "
                    f"adapter does not belong to this base model"
                )


def admit_exported_adapter(adapter: ExportedAdapter,
                           base_shapes: dict[str, tuple[int, int]] | None = None) -> dict:
    """Every check above for an adapter this run exported; returns its adapter config.

    :param adapter: what the engine's export returned (its record of version, rank, alpha,
        target modules and where it wrote them).
    :param base_shapes: ``base_linear_shapes`` of the base model; None skips the shape check.
    :raises AdapterError: naming the file and what is wrong; nothing is sent to a server.
    """
    path = Path(adapter.path)
    config = verify_adapter_dir(path)
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise AdapterError(f"{path} has no {MANIFEST_FILE}: every export of a run writes one, so the "
                           f"directory was changed after export")
    manifest = json.loads(manifest_path.read_text())
    if set(manifest.get("files", {})) != {CONFIG_FILE, WEIGHTS_FILE}:
        raise AdapterError(f"{manifest_path} does not cover {CONFIG_FILE} and {WEIGHTS_FILE}; it was "
                           f"changed after export")
    if manifest.get("version") != adapter.version:
        raise AdapterError(f"{manifest_path} says version {manifest.get('version')}, but this is the "
                           f"export of version {adapter.version}")
    disagreements = []
    if config.get("r") != adapter.rank:
        disagreements.append(f"r={config.get('r')} (exported rank {adapter.rank})")
    alpha = config.get("lora_alpha")
    if not isinstance(alpha, (int, float)) or not math.isclose(alpha, adapter.alpha, rel_tol=1e-6):
        disagreements.append(f"lora_alpha={alpha!r} (exported alpha {adapter.alpha})")
    if sorted(config.get("target_modules") or []) != sorted(adapter.target_modules):
        disagreements.append(f"target_modules={config.get('target_modules')} "
                             f"(exported {list(adapter.target_modules)})")
    if disagreements:
        raise AdapterError(f"{path / CONFIG_FILE} disagrees with what the engine exported: "
                           f"{'; '.join(disagreements)}")
    if base_shapes:
        check_fits_base_model(path, base_shapes)
    return config
