"""`areal train` on bad math data stops before any model is loaded or server started, with the
dataset's message: what is wrong and which option fixes it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .gsm8k_files import write_jsonl
from .math_files import dapo_rows

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_a_missing_column_stops_the_run_before_the_model_loads(servable_tiny_qwen2, tmp_path):
    path = write_jsonl(tmp_path / "dapo.jsonl", dapo_rows(8))  # prompt/answer, not problem/solution
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "areal_core.cli", "train", str(REPO / "examples" / "arithmetic_grpo_lora.yaml"),
           f"actor.path={servable_tiny_qwen2}", f"output_dir={out}", "actor.world_size=2",
           "dataset.name=math", f"dataset.options.path={path}", "dataset.options.held_out=2",
           f"dataset.options.tokenizer_path={servable_tiny_qwen2}", "reward.name=math"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 1
    # the rank that fails first says why (torchrun may stop the other first; its traceback follows)
    said = [line for line in result.stderr.splitlines() if line.startswith("areal train: rank ")
            and "has no 'problem' field (its fields: prompt, solution, answer)" in line]
    assert said and "dataset.options.problem_column" in said[0], result.stderr[-3000:]
    # nothing was loaded or launched: the run directory holds at most its config and empty folders
    # (rank 0 may be stopped before it writes them, when rank 1 fails first)
    files = [str(p.relative_to(out)) for p in out.rglob("*") if not p.is_dir()] if out.exists() else []
    assert files in ([], ["config.yaml"]), files
