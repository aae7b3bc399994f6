"""Versioned adapters on the real SGLang server: load, generate, retire, and never name a stale version."""

from __future__ import annotations

import pytest

from areal_core.errors import ArealError
from areal_core.interfaces import SamplingParams
from areal_sglang.server import SGLangRolloutServer

from sglang_support import client_config, hf_greedy, record_posts, write_adapter

pytestmark = [pytest.mark.server, pytest.mark.slow]

PROMPTS = [[1, 5, 6, 7, 8], [1, 9, 10, 11], [1, 12, 13]]
GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0)


def greedy_ids(groups) -> list[tuple[int, ...]]:
    return [group[0].output_ids for group in groups]


@pytest.fixture
def client(sglang_server, tiny_qwen2, tmp_path, request):
    """A client of its own on the session's server (window 0), connected by address."""
    config = client_config(tiny_qwen2, sglang_server.clients[0].base_url, request.node.name[:40],
                           tmp_path / "run")
    server = SGLangRolloutServer(config)
    server.start()
    yield server
    for name in list(server.versions.loaded().values()):
        server.unload_adapter(name)
    server.stop()


def test_versions_load_generate_and_retire_and_every_request_names_a_live_version(client, tiny_qwen2, tmp_path):
    sent = record_posts(client)
    lora = client.versions.lora_name
    base = hf_greedy(tiny_qwen2, PROMPTS, GREEDY.max_new_tokens)

    # v0 is peft's initial adapter (lora_B = 0): exactly the base model, so this also shows the
    # server and HF transformers agree on the greedy path.
    client.load_adapter(write_adapter(tmp_path / "v0", tiny_qwen2, version=0, zero_b=True), f"{lora}-v0")
    assert greedy_ids(client.generate(PROMPTS, lora_name=f"{lora}-v0", version=0, n=1, sampling=GREEDY)) == base

    client.load_adapter(write_adapter(tmp_path / "v1", tiny_qwen2, version=1, seed=1), f"{lora}-v1")
    v1 = client.generate(PROMPTS, lora_name=f"{lora}-v1", version=1, n=1, sampling=GREEDY)
    assert client.loaded_adapters() == [f"{lora}-v1"]  # window 0: v0 unloaded once v1 is live

    client.load_adapter(write_adapter(tmp_path / "v2", tiny_qwen2, version=2, seed=2), f"{lora}-v2")
    v2 = client.generate(PROMPTS, lora_name=f"{lora}-v2", version=2, n=1, sampling=GREEDY)
    assert client.loaded_adapters() == [f"{lora}-v2"]

    assert greedy_ids(v1) != base and greedy_ids(v2) != base and greedy_ids(v1) != greedy_ids(v2)
    assert {sample.version for group in v1 for sample in group} == {1}
    assert {sample.version for group in v2 for sample in group} == {2}

    # Retired versions are refused by the client before anything is sent (SGLang would
    # silently reload them), and so is a name that was never loaded.
    before = len(sent)
    for name, version in ((f"{lora}-v1", 1), (f"{lora}-v0", 0), (f"{lora}-v9", 9)):
        with pytest.raises(ArealError, match="not a live version"):
            client.generate(PROMPTS, lora_name=name, version=version, n=1, sampling=GREEDY)
        with pytest.raises(ArealError, match="not a live version"):
            client.prompt_logprobs([1, 5, 6], lora_name=name)
    with pytest.raises(ArealError, match="not a live version"):  # the right name, the wrong version
        client.generate(PROMPTS, lora_name=f"{lora}-v2", version=1, n=1, sampling=GREEDY)
    assert len(sent) == before

    generate_bodies = [body for path, body in sent if path == "/generate"]
    assert len(generate_bodies) == 3 * len(PROMPTS)
    named = [body["lora_path"] for body in generate_bodies]
    assert named == [f"{lora}-v{v}" for v in (0, 1, 2) for _ in PROMPTS]
    unloads = [body["lora_name"] for path, body in sent if path == "/unload_lora_adapter"]
    assert unloads == [f"{lora}-v0", f"{lora}-v1"]


def test_n_samples_with_logprobs_tagged_with_their_version(client, tiny_qwen2, tmp_path):
    lora = client.versions.lora_name
    client.load_adapter(write_adapter(tmp_path / "v5", tiny_qwen2, version=5, seed=5), f"{lora}-v5")
    sampling = SamplingParams(max_new_tokens=6, temperature=1.0)
    groups = client.generate(PROMPTS, lora_name=f"{lora}-v5", version=5, n=4, sampling=sampling)
    assert [len(group) for group in groups] == [4] * len(PROMPTS)
    for prompt, group in zip(PROMPTS, groups):
        for sample in group:
            assert sample.prompt_ids == tuple(prompt) and sample.version == 5
            assert 1 <= len(sample.output_ids) <= 6 and len(sample.logprobs) == len(sample.output_ids)
            assert all(lp <= 0.0 for lp in sample.logprobs)
            assert sample.finish_reason in ("stop", "length")
    assert len({sample.output_ids for group in groups for sample in group}) > 1  # it samples

    # Seeded calls are accepted and the samples of a prompt still differ from each other. (SGLang
    # applies seeds only with --enable-deterministic-inference, which this server does not use.)
    seeded = SamplingParams(max_new_tokens=6, temperature=1.0, seed=123)
    groups = client.generate(PROMPTS, lora_name=f"{lora}-v5", version=5, n=4, sampling=seeded)
    assert all(len({sample.output_ids for sample in group}) > 1 for group in groups)


def test_a_window_of_one_keeps_the_previous_version_until_the_next_load(sglang_server, tiny_qwen2, tmp_path):
    config = client_config(tiny_qwen2, sglang_server.clients[0].base_url, "window1", tmp_path / "run", window=1)
    client = SGLangRolloutServer(config)
    client.start()
    try:
        for version in range(3):
            adapter = write_adapter(tmp_path / f"v{version}", tiny_qwen2, version=version, seed=10 + version)
            client.load_adapter(adapter, f"window1-v{version}")
        assert client.loaded_adapters() == ["window1-v1", "window1-v2"]
        # the version inside the window still serves
        client.generate([[1, 5]], lora_name="window1-v1", version=1, n=1, sampling=GREEDY)
    finally:
        for name in client.loaded_adapters():
            client.unload_adapter(name)
        client.stop()


def test_a_connected_client_never_reloads_a_name_the_server_already_holds(sglang_server, tiny_qwen2, tmp_path):
    address = sglang_server.clients[0].base_url
    first = SGLangRolloutServer(client_config(tiny_qwen2, address, "resumed", tmp_path / "a"))
    first.start()
    first.load_adapter(write_adapter(tmp_path / "v3", tiny_qwen2, version=3, seed=3), "resumed-v3")
    second = SGLangRolloutServer(client_config(tiny_qwen2, address, "resumed", tmp_path / "b"))
    second.start()
    try:
        with pytest.raises(ArealError, match="loaded before"):
            second.load_adapter(write_adapter(tmp_path / "again", tiny_qwen2, version=3, seed=4), "resumed-v3")
    finally:
        first.unload_adapter("resumed-v3")
        first.stop()
        second.stop()


def test_a_prompt_of_max_model_len_tokens_is_served(client, tiny_qwen2, tmp_path):
    lora = client.versions.lora_name
    client.load_adapter(write_adapter(tmp_path / "v1", tiny_qwen2, version=1, seed=31), f"{lora}-v1")
    longest = [1] + [5 + i % 20 for i in range(client.config.rollout.max_model_len - 1)]
    assert len(client.prompt_logprobs(longest, lora_name=f"{lora}-v1")) == len(longest) - 1
