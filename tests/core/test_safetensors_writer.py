"""The streaming safetensors writer: files the reference reader loads bit for bit, and their hash."""

import hashlib
import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from areal_core.safetensors_writer import write_safetensors


def test_round_trip_through_the_reference_reader(tmp_path):
    tensors = {
        "b.f32": torch.randn(5, 3),
        "a.bf16": torch.randn(4, 7).to(torch.bfloat16),
        "c.f16": torch.randn(3).to(torch.float16),
        "d.i64": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "e.transposed": torch.randn(3, 4).t(),  # not contiguous
        "f.empty": torch.zeros(0, 4),
        "g.bool": torch.tensor([True, False, True]),
    }
    path = tmp_path / "x.safetensors"
    size, digest = write_safetensors(path, tensors, {"format": "pt"})
    data = path.read_bytes()
    assert size == len(data)
    assert digest == hashlib.sha256(data).hexdigest()
    loaded = load_file(str(path))
    assert sorted(loaded) == sorted(tensors)
    for key, tensor in tensors.items():
        assert loaded[key].dtype == tensor.dtype and loaded[key].shape == tensor.shape
        assert torch.equal(loaded[key], tensor), key
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    header_length = struct.unpack("<Q", data[:8])[0]
    assert header_length % 8 == 0
    assert list(json.loads(data[8:8 + header_length])) == ["__metadata__", *sorted(tensors)]


def test_an_existing_file_is_never_overwritten(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        write_safetensors(path, {"a": torch.zeros(2)})
    assert path.read_bytes() == b"keep"


def test_an_unsupported_dtype_is_named(tmp_path):
    with pytest.raises(ValueError, match="complex64"):
        write_safetensors(tmp_path / "x.safetensors", {"a": torch.zeros(2, dtype=torch.complex64)})
    assert not (tmp_path / "x.safetensors").exists()
