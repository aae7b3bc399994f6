"""The records of an offline W&B run file (``run-<id>.wandb``), decoded with wandb's own schema.

wandb 0.31 dropped its Python reader of these files (``wandb.sdk.internal.datastore``); the
reader now lives in its Go core, which offers no API. The file is wandb's documented transaction
log, LevelDB's log format: a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then 32 KiB blocks
of chunks, each ``crc32 (4) | length (2, little-endian) | type (1: full, 2: first, 3: middle,
4: last)`` and its bytes. Each whole record is a ``wandb_internal_pb2.Record`` protobuf.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK = 32768
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[: len(HEADER)] == HEADER, f"{path} is not a W&B transaction log"
    offset, pending = len(HEADER), b""
    while offset + CHUNK_HEADER <= len(data):
        room = BLOCK - offset % BLOCK
        if room < CHUNK_HEADER:  # a block's tail too short for a chunk header is padding
            offset += room
            continue
        _, length, kind = struct.unpack("<IHB", data[offset: offset + CHUNK_HEADER])
        if kind == 0 and length == 0:  # zero padding
            offset += room
            continue
        chunk = data[offset + CHUNK_HEADER: offset + CHUNK_HEADER + length]
        offset += CHUNK_HEADER + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def history(path: Path) -> list[dict]:
    """Each ``run.log`` call's items, keyed by name, with ``_step``."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def config(path: Path) -> dict:
    """The run's configuration as recorded (the last value of each key)."""
    out = {}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        updates = record.run.config.update if kind == "run" else record.config.update if kind == "config" else []
        for item in updates:
            out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out
