"""The two CPU workarounds, in the SGLang server venv: what they do, and that only the server gets them."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from areal_sglang import cpu_server
from areal_sglang.launcher import find_server_python

pytestmark = pytest.mark.slow

PROBE = r"""
import json, sys
import torch
facts = {"cuda": torch.cuda.is_available(), "sitecustomize": "sitecustomize" in sys.modules
         and getattr(sys.modules["sitecustomize"], "__file__", "").startswith(sys.argv[1])}
try:
    pinned = torch.tensor([1.0, 2.0], pin_memory=True)
    facts["pin"] = {"ok": True, "values": pinned.tolist(), "device": str(pinned.device),
                    "method_same_object": pinned.pin_memory() is pinned}
except Exception as exc:
    facts["pin"] = {"ok": False, "error": type(exc).__name__}
try:
    import sgl_kernel
    facts["kernel_file"] = sgl_kernel.__file__
    try:
        sgl_kernel.assign_req_to_token_pool_cpu()
    except NotImplementedError as exc:
        facts["kernel_call"] = str(exc)
    try:
        from sgl_kernel import merge_state_v2
        facts["other_name"] = "imported"
    except ImportError:
        facts["other_name"] = "ImportError"
    from sglang.srt.utils.common import cpu_has_amx_support
    facts["amx_backend"] = cpu_has_amx_support()
except ImportError as exc:
    facts["kernel_file"] = None
print(json.dumps(facts))
"""


def probe(with_workarounds: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if with_workarounds:
        env["PYTHONPATH"] = cpu_server.PATH
    result = subprocess.run([find_server_python(), "-c", PROBE, cpu_server.PATH], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_on_the_server_path_pinning_is_a_no_op_and_sgl_kernel_is_a_loud_stand_in():
    facts = probe(with_workarounds=True)
    assert facts["sitecustomize"]
    if not facts["cuda"]:  # with a GPU, sitecustomize leaves pinning alone
        assert facts["pin"] == {"ok": True, "values": [1.0, 2.0], "device": "cpu", "method_same_object": True}
    assert facts["kernel_file"].startswith(cpu_server.PATH)
    assert "stand-in" in facts["kernel_call"]
    assert facts["other_name"] == "ImportError"  # only the names SGLang imports at module level
    assert facts["amx_backend"] is False  # SGLang still takes its native torch paths


def test_without_the_server_path_nothing_is_patched():
    facts = probe(with_workarounds=False)
    assert not facts["sitecustomize"] and facts["kernel_file"] is None
    if not facts["cuda"]:
        assert facts["pin"] == {"ok": False, "error": "RuntimeError"}  # why the workaround exists
