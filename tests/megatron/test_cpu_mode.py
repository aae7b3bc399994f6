"""The CPU-mode workaround: opt-in, confined to megatron-core's modules, refused on a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from areal_megatron import cpu_mode

PROBE = """
import json, torch
from areal_megatron import cpu_mode
import megatron.core.tensor_parallel.layers as layers
import megatron.core.tensor_parallel.random as mrandom
before = layers.torch is torch
changed = cpu_mode.apply()
again = cpu_mode.apply()
try:
    torch.cuda.current_device()
    real_cuda_untouched = False
except Exception:
    real_cuda_untouched = True
state = torch.get_rng_state()
tracker = mrandom.get_cuda_rng_tracker()
tracker.add("probe-rng", 1234)
with tracker.fork("probe-rng"):
    inside = torch.rand(3).tolist()
print(json.dumps({
    "before": before, "changed": changed, "again": again,
    "megatron_device": str(layers.torch.cuda.current_device()),
    "megatron_sees_real_torch_otherwise": layers.torch.Tensor is torch.Tensor,
    "real_cuda_untouched": real_cuda_untouched,
    "rng_restored_after_fork": bool(torch.equal(state, torch.get_rng_state())),
    "forked_stream_is_seeded": inside == torch.rand(3, generator=torch.Generator().manual_seed(1234)).tolist(),
}))
"""


def test_opt_in_by_environment_or_device(monkeypatch):
    monkeypatch.delenv(cpu_mode.ENV_VAR, raising=False)
    assert not cpu_mode.requested("auto")
    assert cpu_mode.requested("cpu")
    monkeypatch.setenv(cpu_mode.ENV_VAR, "1")
    assert cpu_mode.requested("auto")


@pytest.mark.slow
def test_redirects_only_megatron_cores_cuda_calls():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
    import torch

    if torch.cuda.is_available():
        assert out.returncode != 0 and "a GPU is present" in out.stderr
        return
    assert out.returncode == 0, out.stderr[-3000:]
    facts = json.loads(out.stdout.strip().splitlines()[-1])
    assert facts["before"] is True and facts["changed"] > 10 and facts["again"] == 0
    assert facts["megatron_device"] == "cpu"
    assert facts["megatron_sees_real_torch_otherwise"] and facts["real_cuda_untouched"]
    assert facts["rng_restored_after_fork"] and facts["forked_stream_is_seeded"]
