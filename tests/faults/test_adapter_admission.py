"""What an exported adapter must pass before rank 0 hands it to a server (quick, no server).

The format's own refusals (pickled ``.bin``, truncated or changed files, rank or target modules
disagreeing with the tensors) are tested in tests/core/test_adapter_format.py; these are the
checks added on top for exports of a run, against a real tiny model's shapes.
"""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from areal_core.adapter_format import CONFIG_FILE, MANIFEST_FILE, peft_key, verify_adapter_dir, write_peft_adapter
from areal_core.errors import AdapterError
from areal_core.grpo.adapter_admission import admit_exported_adapter, base_linear_shapes

MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj")


def adapter_for(model_dir, path, rank=4, alpha=8.0, version=3, shapes=None):
    shapes = shapes or base_linear_shapes(model_dir)
    tensors = {}
    for module in MODULES:
        out_features, in_features = shapes[module]
        tensors[peft_key(module, "A")] = torch.randn(rank, in_features)
        tensors[peft_key(module, "B")] = torch.randn(out_features, rank)
    return write_peft_adapter(path, tensors, rank=rank, alpha=alpha, version=version)


def rewrite_config_and_manifest(adapter, **changes):
    """Change adapter_config.json and make the manifest match it again (a careful forger)."""
    directory = Path(adapter.path)
    config = json.loads((directory / CONFIG_FILE).read_text())
    (directory / CONFIG_FILE).write_text(json.dumps({**config, **changes}))
    data = (directory / CONFIG_FILE).read_bytes()
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    manifest["files"][CONFIG_FILE] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))


def test_base_shapes_come_from_the_safetensors_headers(tiny_qwen2):
    shapes = base_linear_shapes(tiny_qwen2)
    assert shapes["model.layers.0.self_attn.q_proj"] == (64, 64)
    assert shapes["model.layers.0.self_attn.k_proj"] == (32, 64)  # 2 KV heads of 16
    assert shapes["model.layers.1.mlp.down_proj"] == (64, 128)


def test_an_export_that_fits_the_base_model_is_admitted(tiny_qwen2, tmp_path):
    adapter = adapter_for(tiny_qwen2, tmp_path / "v3")
    config = admit_exported_adapter(adapter, base_linear_shapes(tiny_qwen2))
    assert config["r"] == 4 and config["target_modules"] == ["down_proj", "q_proj"]


def test_tensors_of_the_wrong_shape_for_the_base_model_are_refused(tiny_qwen2, tmp_path):
    wrong = dict(base_linear_shapes(tiny_qwen2))
    wrong["model.layers.1.mlp.down_proj"] = (64, 96)  # a down_proj from a model with a wider MLP
    adapter = adapter_for(tiny_qwen2, tmp_path / "v3", shapes=wrong)
    verify_adapter_dir(adapter.path)  # consistent in itself: only the base model tells
    with pytest.raises(AdapterError, match=r"down_proj.*lora_A.*shape \(4, 96\).*in_features=128"):
        admit_exported_adapter(adapter, base_linear_shapes(tiny_qwen2))


def test_a_module_the_base_model_lacks_is_refused(tiny_qwen2, tmp_path):
    shapes = {**base_linear_shapes(tiny_qwen2), "model.layers.0.self_attn.q_proj": (64, 64)}
    tensors = {peft_key("model.layers.7.self_attn.q_proj", "A"): torch.randn(4, 64),
               peft_key("model.layers.7.self_attn.q_proj", "B"): torch.randn(64, 4)}
    adapter = write_peft_adapter(tmp_path / "v3", tensors, rank=4, alpha=8, version=3)
    with pytest.raises(AdapterError, match="layers.7.self_attn.q_proj, which the base model has no"):
        admit_exported_adapter(adapter, shapes)


def test_an_alpha_that_disagrees_with_the_export_is_refused(tiny_qwen2, tmp_path):
    adapter = adapter_for(tiny_qwen2, tmp_path / "v3", alpha=8.0)
    rewrite_config_and_manifest(adapter, lora_alpha=64)
    with pytest.raises(AdapterError, match=r"lora_alpha=64 \(exported alpha 8.0\)"):
        admit_exported_adapter(adapter, base_linear_shapes(tiny_qwen2))


def test_a_removed_manifest_or_one_of_another_version_is_refused(tiny_qwen2, tmp_path):
    adapter = adapter_for(tiny_qwen2, tmp_path / "v3")
    manifest = tmp_path / "v3" / MANIFEST_FILE
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "version": 2}))
    with pytest.raises(AdapterError, match="says version 2, but this is the export of version 3"):
        admit_exported_adapter(adapter)
    manifest.unlink()
    with pytest.raises(AdapterError, match="no areal_manifest.json"):
        admit_exported_adapter(adapter)


@pytest.mark.parametrize("name", ["adapter_model.bin", "adapter_model.pt", "training_args.pth"])
def test_any_pickled_file_next_to_the_safetensors_is_refused(tiny_qwen2, tmp_path, name):
    adapter = adapter_for(tiny_qwen2, tmp_path / "v3")
    (tmp_path / "v3" / name).write_bytes(b"\x80\x04pickle")
    with pytest.raises(AdapterError, match=rf"pickled weights \({name}\).*safetensors"):
        admit_exported_adapter(adapter)
