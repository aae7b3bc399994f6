"""The PEFT adapter directory: atomic writes, checks on read, safetensors only."""

import json
import os
import re

import pytest
import torch

from areal_core import adapter_format
from areal_core.adapter_format import peft_key, verify_adapter_dir, write_peft_adapter
from areal_core.errors import AdapterError


def lora_tensors(rank=4, modules=("model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.q_proj")):
    torch.manual_seed(0)
    tensors = {}
    for module in modules:
        tensors[peft_key(module, "A")] = torch.randn(rank, 8)
        tensors[peft_key(module, "B")] = torch.randn(16, rank)
    return tensors


def test_write_then_verify(tmp_path):
    exported = write_peft_adapter(tmp_path / "v1", lora_tensors(), rank=4, alpha=8, version=1)
    assert exported.target_modules == ("q_proj", "v_proj") and exported.num_bytes > 0
    assert sorted(os.listdir(tmp_path)) == ["v1"]
    config = verify_adapter_dir(exported.path)
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["target_modules"] == ["q_proj", "v_proj"]
    assert config["peft_type"] == "LORA" and config["bias"] == "none"
    manifest = json.loads((tmp_path / "v1" / adapter_format.MANIFEST_FILE).read_text())
    assert manifest["version"] == 1 and set(manifest["files"]) == {"adapter_config.json", "adapter_model.safetensors"}


def test_loads_with_peft(tmp_path, tiny_qwen2):
    import peft
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_qwen2)
    tensors = {}
    for name, module in base.named_modules():
        if name.endswith(("q_proj", "down_proj")):
            tensors[peft_key(name, "A")] = torch.randn(2, module.in_features)
            tensors[peft_key(name, "B")] = torch.randn(module.out_features, 2)
    path = write_peft_adapter(tmp_path / "a", tensors, rank=2, alpha=3, version=0).path
    model = peft.PeftModel.from_pretrained(base, path)
    state = model.state_dict()
    for key, tensor in tensors.items():
        assert torch.equal(state[key.replace(".weight", ".default.weight")], tensor)


def test_crash_mid_write_leaves_nothing_behind(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    # Where a full disk shows on filesystems that allocate late: the weights file's fsync.
    monkeypatch.setattr("os.fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        write_peft_adapter(tmp_path / "v2", lora_tensors(), rank=4, alpha=8, version=2)
    assert os.listdir(tmp_path) == []


def test_versions_are_never_rewritten(tmp_path):
    write_peft_adapter(tmp_path / "v1", lora_tensors(), rank=4, alpha=8, version=1)
    with pytest.raises(AdapterError, match="already exists"):
        write_peft_adapter(tmp_path / "v1", lora_tensors(), rank=4, alpha=8, version=1)


@pytest.mark.parametrize("bad,match", [
    ({"x.weight": torch.zeros(2, 2)}, "not a PEFT LoRA key"),
    ({peft_key("m.q_proj", "A"): torch.zeros(3, 8), peft_key("m.q_proj", "B"): torch.zeros(8, 3)}, "rank 4"),
    ({peft_key("m.q_proj", "A"): torch.zeros(4, 8)}, "not both A and B"),
    ({}, "no LoRA tensors"),
])
def test_bad_tensors_are_refused(tmp_path, bad, match):
    with pytest.raises(AdapterError, match=match):
        write_peft_adapter(tmp_path / "v", bad, rank=4, alpha=8, version=0)
    assert not (tmp_path / "v").exists()


def test_pickled_weights_are_refused(tmp_path):
    path = write_peft_adapter(tmp_path / "v", lora_tensors(), rank=4, alpha=8, version=0).path
    (tmp_path / "v" / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(AdapterError, match="pickled weights"):
        verify_adapter_dir(path)


def test_truncated_or_changed_files_are_refused(tmp_path):
    path = write_peft_adapter(tmp_path / "v", lora_tensors(), rank=4, alpha=8, version=0).path
    weights = tmp_path / "v" / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-10])
    with pytest.raises(AdapterError, match="truncated"):
        verify_adapter_dir(path)
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(AdapterError, match="checksum"):
        verify_adapter_dir(path)
    # the same change, with the checksums left to a check that runs while a server reads
    verify_adapter_dir(path, checksums=False)
    with pytest.raises(AdapterError, match="checksum differs"):
        adapter_format.ChecksumCheck(path).result()
    adapter_format.ChecksumCheck(path).join()  # waits, raises nothing
    # a server's refusal of such files gets the reason appended
    assert re.fullmatch(r"refused; and .*checksum differs.*", adapter_format.ChecksumCheck(path).explain("refused"))
    weights.write_bytes(data)
    adapter_format.ChecksumCheck(path).result()
    assert adapter_format.ChecksumCheck(path).explain("refused") == "refused"


def test_config_rank_disagreeing_with_tensors_is_refused(tmp_path):
    path = write_peft_adapter(tmp_path / "v", lora_tensors(), rank=4, alpha=8, version=0).path
    (tmp_path / "v" / adapter_format.MANIFEST_FILE).unlink()
    config_path = tmp_path / "v" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["r"] = 8
    config_path.write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="r=8"):
        verify_adapter_dir(path)


def test_missing_directory(tmp_path):
    with pytest.raises(AdapterError, match="does not exist"):
        verify_adapter_dir(tmp_path / "nope")


def test_config_target_modules_disagreeing_with_tensors_are_refused(tmp_path):
    path = write_peft_adapter(tmp_path / "v", lora_tensors(), rank=4, alpha=8, version=0).path
    (tmp_path / "v" / adapter_format.MANIFEST_FILE).unlink()
    config_path = tmp_path / "v" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["target_modules"] = ["q_proj", "k_proj", "v_proj"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="disagree"):
        verify_adapter_dir(path)
