"""``ignore_eos`` on the real SGLang server: every completion runs to ``max_new_tokens``.

The tiny random model samples nearly uniformly over 32 tokens at temperature 1, so eos (id 2)
comes about once in 32 tokens: of 12 samples of 48 tokens without the flag, some stop at an eos
(SGLang's sampling is unseeded on this server, so that control is a near-certainty, not a
replay: were sampling uniform, P(none stops) = (31/32)^(48 x 12), about 1e-8); with the flag
every one has exactly 48.
"""

from __future__ import annotations

import pytest

from areal_core.interfaces import SamplingParams
from areal_core.testing.tiny_models import EOS_ID
from areal_sglang.server import SGLangRolloutServer

from sglang_support import client_config, write_adapter

pytestmark = [pytest.mark.server, pytest.mark.slow]

PROMPTS = [[1, 5, 6, 7, 8], [1, 9, 10, 11], [1, 12, 13]]
MAX_NEW_TOKENS = 48


def test_with_ignore_eos_every_completion_has_max_new_tokens(sglang_server, tiny_qwen2, tmp_path):
    config = client_config(tiny_qwen2, sglang_server.clients[0].base_url, "noeos", tmp_path / "run")
    client = SGLangRolloutServer(config)
    client.start()
    try:
        client.load_adapter(write_adapter(tmp_path / "v1", tiny_qwen2, version=1, seed=1), "noeos-v1")

        def rollouts(ignore_eos: bool):
            sampling = SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=1.0, ignore_eos=ignore_eos)
            groups = client.generate(PROMPTS, lora_name="noeos-v1", version=1, n=4, sampling=sampling)
            return [s for group in groups for s in group]

        stopping, running = rollouts(False), rollouts(True)
        client.unload_adapter("noeos-v1")
    finally:
        client.stop()
    stopped = [s for s in stopping if s.finish_reason == "stop"]
    assert stopped, [len(s.output_ids) for s in stopping]  # the control: eos is likely here
    # a stop is on the first eos, which may be the last token allowed (12 x (31/32)^47 / 32, about
    # 8% of runs, have one sample whose 48th token is its first eos: SGLang says "stop" then)
    assert all(s.output_ids[-1] == EOS_ID and EOS_ID not in s.output_ids[:-1]
               and len(s.output_ids) <= MAX_NEW_TOKENS for s in stopped), [s.output_ids for s in stopped]
    assert [len(s.output_ids) for s in running] == [MAX_NEW_TOKENS] * len(running)
    assert [len(s.logprobs) for s in running] == [MAX_NEW_TOKENS] * len(running)
    assert {s.finish_reason for s in running} == {"length"}
    assert any(EOS_ID in s.output_ids for s in running)  # eos was sampled, and did not stop it
