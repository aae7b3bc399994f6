"""Reading a range of rows of one tensor from a local safetensors checkpoint, and nothing more.

Each rank of a sharded engine needs only its own rows of each weight. Reading them with plain
positioned reads (no memory map) keeps the rest of the file out of the process: a memory-mapped
checkpoint counts in the resident set of every rank for as long as it is mapped.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch

from areal_core.safetensors_writer import DTYPE_CODES

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_DTYPES = {code: getattr(torch, name) for name, code in DTYPE_CODES.items()}


class CheckpointTensors:
    """The tensors of a Hugging Face model directory (one file or an indexed set of shards)."""

    def __init__(self, directory: str | os.PathLike):
        directory = Path(directory)
        if (directory / INDEX_FILE).is_file():
            weight_map = json.loads((directory / INDEX_FILE).read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = [SINGLE_FILE]
        self._entries: dict[str, tuple[Path, int, dict]] = {}
        for name in files:
            path = directory / name
            with open(path, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(length))
            header.pop("__metadata__", None)
            for key, entry in header.items():
                self._entries[key] = (path, 8 + length, entry)

    def keys(self) -> set[str]:
        return set(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key][2]["shape"])

    def read_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of dimension 0 of tensor ``key``, in the file's dtype."""
        path, data_start, entry = self._entries[key]
        shape = entry["shape"]
        dtype = _DTYPES[entry["dtype"]]
        rows = torch.empty((stop - start, *shape[1:]), dtype=dtype)
        if rows.numel() == 0:
            return rows
        row_bytes = math.prod(shape[1:]) * rows.element_size()
        offset = data_start + entry["data_offsets"][0] + start * row_bytes
        view = memoryview(rows.view(torch.uint8).numpy()).cast("B")
        with open(path, "rb", buffering=0) as handle:
            handle.seek(offset)
            done = 0
            while done < len(view):
                count = handle.readinto(view[done:])
                if not count:
                    raise OSError(f"{path}: unexpected end of file reading {key}")
                done += count
        return rows
