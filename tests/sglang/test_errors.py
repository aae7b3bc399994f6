"""Failures of the SGLang backend: each a clear error, and the version already live keeps serving."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from areal_core.config import ActorConfig, RolloutConfig, RunConfig
from areal_core.errors import AdapterLoadError, ServerUnreachableError
from areal_core.interfaces import ExportedAdapter, SamplingParams
from areal_sglang.launcher import free_port
from areal_sglang.server import SGLangRolloutServer

from sglang_support import client_config, write_adapter

GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0)
PROMPTS = [[1, 5, 6, 7], [1, 8, 9]]


def test_a_server_that_does_not_answer_is_unreachable_after_bounded_retries(tmp_path):
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    config = RunConfig(rollout=RolloutConfig(backend="sglang", servers=[address]), output_dir=str(tmp_path))
    client = SGLangRolloutServer(config, connect_attempts=2)
    with pytest.raises(ServerUnreachableError, match=f"http://{address}.*2 tries"):
        client.start()


def test_a_launched_server_that_exits_is_reported_with_its_log(tiny_qwen2, tmp_path, monkeypatch):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'no sglang here' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("AREAL_SGLANG_PYTHON", str(fake))
    config = RunConfig(actor=ActorConfig(path=str(tiny_qwen2), device="cpu"),
                       rollout=RolloutConfig(backend="sglang", startup_timeout=60), output_dir=str(tmp_path / "run"))
    client = SGLangRolloutServer(config)
    with pytest.raises(ServerUnreachableError, match=r"exited with code 3(.|\n)*no sglang here"):
        client.start()
    client.stop()


@pytest.fixture
def serving(sglang_server, tiny_qwen2, tmp_path):
    """A client on the session's server with version 1 live, and v1's greedy outputs."""
    config = client_config(tiny_qwen2, sglang_server.clients[0].base_url, "faults", tmp_path / "run")
    client = SGLangRolloutServer(config)
    client.start()
    client.load_adapter(write_adapter(tmp_path / "v1", tiny_qwen2, version=1, seed=21), "faults-v1")
    outputs = client.generate(PROMPTS, lora_name="faults-v1", version=1, n=1, sampling=GREEDY)
    yield client, outputs
    for name in client.loaded_adapters():
        if name.startswith("faults-"):
            client.unload_adapter(name)
    client.stop()


def assert_v1_still_serves(client, outputs):
    assert client.loaded_adapters() == ["faults-v1"]
    again = client.generate(PROMPTS, lora_name="faults-v1", version=1, n=1, sampling=GREEDY)
    assert [g[0].output_ids for g in again] == [g[0].output_ids for g in outputs]


@pytest.mark.server
@pytest.mark.slow
def test_load_failures_keep_the_live_version_serving(serving, tiny_qwen2, tmp_path):
    client, outputs = serving

    # The adapter directory is missing: refused before anything is sent.
    missing = ExportedAdapter(path=str(tmp_path / "nowhere"), version=2, rank=8, alpha=16, target_modules=())
    with pytest.raises(AdapterLoadError, match="does not exist"):
        client.load_adapter(missing, "faults-v2")
    assert_v1_still_serves(client, outputs)

    # Rank 16 is above the server's --max-lora-rank 8: SGLang refuses, with its own message.
    too_large = write_adapter(tmp_path / "v3", tiny_qwen2, version=3, rank=16, seed=23)
    with pytest.raises(AdapterLoadError, match=r"refused adapter faults-v3(.|\n)*rank 16(.|\n)*max-lora-rank"):
        client.load_adapter(too_large, "faults-v3")
    assert_v1_still_serves(client, outputs)

    # A well-formed directory SGLang cannot serve (a DoRA adapter): SGLang's refusal is passed on.
    dora = tmp_path / "v4"
    shutil.copytree(write_adapter(tmp_path / "v4-lora", tiny_qwen2, version=4, seed=24).path, dora)
    (dora / "areal_manifest.json").unlink()
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    refused = ExportedAdapter(path=str(dora), version=4, rank=8, alpha=16, target_modules=())
    with pytest.raises(AdapterLoadError, match=r"refused adapter faults-v4(.|\n)*DoRA"):
        client.load_adapter(refused, "faults-v4")
    assert_v1_still_serves(client, outputs)

    # Changed after export, same size: SGLang reads it while it is hashed, and the mismatch
    # unloads it before the load returns.
    changed = write_adapter(tmp_path / "v5", tiny_qwen2, version=5, seed=25)
    weights = Path(changed.path) / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(AdapterLoadError, match="checksum differs from its manifest.*unloaded before any request"):
        client.load_adapter(changed, "faults-v5")
    assert "faults-v5" not in client.loaded_adapters()
    assert_v1_still_serves(client, outputs)

    # A failed name is never reused; the next version loads and serves.
    client.load_adapter(write_adapter(tmp_path / "v6", tiny_qwen2, version=6, seed=26), "faults-v6")
    assert client.loaded_adapters() == ["faults-v6"]
    assert client.generate(PROMPTS, lora_name="faults-v6", version=6, n=1, sampling=GREEDY)[0][0].version == 6


@pytest.mark.server
def test_a_name_that_is_not_the_versions_name_is_refused(serving, tiny_qwen2, tmp_path):
    client, outputs = serving
    adapter = write_adapter(tmp_path / "v6", tiny_qwen2, version=6, seed=26)
    with pytest.raises(AdapterLoadError, match="must be loaded as 'faults-v6'"):
        client.load_adapter(adapter, "faults-v7")
    assert_v1_still_serves(client, outputs)
