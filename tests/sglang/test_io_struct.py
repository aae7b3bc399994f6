"""The request bodies the client builds are accepted by SGLang's own request types (in the server venv)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from areal_core.interfaces import SamplingParams
from areal_sglang import payloads
from areal_sglang.launcher import find_server_python

pytestmark = pytest.mark.slow

CHECK_SCRIPT = Path(__file__).with_name("io_struct_check.py")


def run_check(bodies: dict, tmp_path) -> list[dict]:
    request_file = tmp_path / "bodies.json"
    request_file.write_text(json.dumps(bodies))
    result = subprocess.run([find_server_python(), str(CHECK_SCRIPT), str(request_file)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_sglang_accepts_every_body_the_client_builds_and_refuses_a_broken_one(tmp_path):
    generate = [
        payloads.generate_payload([1, 5, 6], lora_name="lora-v1", n=1, sampling=SamplingParams()),
        payloads.generate_payload([1, 5, 6, 7], lora_name="lora-v2", n=8,
                                  sampling=SamplingParams(max_new_tokens=32, temperature=0.7, top_p=0.9,
                                                          top_k=20, stop_token_ids=(2,))),
        payloads.generate_payload([1, 5, 6, 7], lora_name="lora-v2", n=4, prompt_index=3,
                                  sampling=SamplingParams(temperature=1.0, seed=5)),
        payloads.generate_payload([1, 9], lora_name="lora-v2", n=1, sampling=SamplingParams(seed=5)),
        payloads.generate_payload([1], lora_name="lora-v3", n=2, sampling=SamplingParams(temperature=0.0)),
        payloads.generate_payload([1, 4], lora_name="lora-v3", n=8,
                                  sampling=SamplingParams(max_new_tokens=128, ignore_eos=True)),
        payloads.prompt_logprobs_payload(list(range(1, 30)), lora_name="lora-v1"),
    ]
    # Controls: the check must be able to fail (a misspelt key, an unknown sampling field).
    misspelt = {**generate[0]}
    misspelt["lora_paths"] = misspelt.pop("lora_path")
    unknown_sampling = {**generate[0], "sampling_params": {"max_tokens": 4}}
    bodies = {
        "generate": generate + [misspelt, unknown_sampling],
        "load": [payloads.load_payload("lora-v1", "/adapters/lora-v1"), {"lora_name": "lora-v1"}],
        "unload": [payloads.unload_payload("lora-v1")],
    }
    verdicts = {(v["kind"], v["index"]): v for v in run_check(bodies, tmp_path)}
    assert len(verdicts) == 12
    for index in range(len(generate)):
        assert verdicts[("generate", index)]["ok"], verdicts[("generate", index)]["error"]
    assert verdicts[("load", 0)]["ok"], verdicts[("load", 0)]["error"]
    assert verdicts[("unload", 0)]["ok"], verdicts[("unload", 0)]["error"]
    misspelt_index, unknown_index = len(generate), len(generate) + 1
    assert not verdicts[("generate", misspelt_index)]["ok"]
    assert "lora_paths" in verdicts[("generate", misspelt_index)]["error"]
    assert not verdicts[("generate", unknown_index)]["ok"]
    assert "max_tokens" in verdicts[("generate", unknown_index)]["error"]
    assert not verdicts[("load", 1)]["ok"] and "lora_path" in verdicts[("load", 1)]["error"]
