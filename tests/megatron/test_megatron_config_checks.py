"""The megatron plugin's declaration and its refusals of bad input, before anything heavy runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from areal_core.config import ActorConfig, RunConfig
from areal_core.errors import AdapterError, ArealError
from areal_megatron import plugin
from areal_megatron.lora import resolve_targets
from areal_megatron.models import UnsupportedModel, load_spec, state_dict_adapter
from areal_megatron.validation import check_config


def run_config(path, **actor) -> RunConfig:
    return RunConfig(actor=ActorConfig(backend="megatron", path=str(path), **actor))


def variant(tmp_path, source, **changes):
    """A copy of a model directory whose config.json has ``changes`` (None deletes a key)."""
    target = tmp_path / "variant"
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (target / "config.json").write_text(json.dumps(config))
    return target


def problems(config) -> list[str]:
    return [str(e) for e in check_config(config)]


def test_declares_one_engine_without_importing_torch():
    code = ("import sys, areal_megatron.plugin as p; d = p.areal_declare_backends(); "
            "print(d[0].name, d[0].kind, d[0].lora.ready, 'torch' in sys.modules, 'megatron' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["megatron", "engine", "True", "False", "False"]


def test_hooks_answer_only_for_megatron(tiny_qwen2):
    config = run_config(tiny_qwen2)
    assert plugin.areal_build_engine(backend="fsdp2", config=config) is None
    assert plugin.areal_validate_config(backend="vllm", config=config) is None
    assert plugin.areal_inject_adapter(backend="fsdp2", engine=None, actor=config.actor,
                                       adapter_name=None) is None
    assert plugin.areal_shard_model(backend="fsdp2", engine=None, actor=config.actor) is None
    assert plugin.areal_export_adapter(backend="fsdp2", engine=None, directory="x", version=0,
                                       adapter_name=None) is None


def test_hooks_refuse_an_engine_they_did_not_build(tiny_qwen2):
    with pytest.raises(TypeError, match="not the engine it built"):
        plugin.areal_inject_adapter(backend="megatron", engine=object(), actor=ActorConfig(), adapter_name=None)


def test_a_good_configuration_has_no_problems(tiny_qwen2, tiny_llama):
    assert check_config(run_config(tiny_qwen2, tensor_parallel_size=2, world_size=2)) == []
    assert check_config(run_config(tiny_llama, target_modules=["q_proj", "linear_fc2"])) == []


def test_mixture_of_experts_is_refused(tiny_qwen2, tmp_path):
    moe = variant(tmp_path, tiny_qwen2, num_experts=8, model_type="qwen2_moe")
    assert any("mixture-of-experts" in p for p in problems(run_config(moe)))
    with pytest.raises(UnsupportedModel, match="mixture-of-experts"):
        load_spec(moe)


@pytest.mark.parametrize("changes,expected", [
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "rope scaling"),
    ({"use_sliding_window": True}, "use_sliding_window=true"),
    ({"hidden_act": "gelu"}, "SwiGLU"),
])
def test_models_the_engine_cannot_reproduce_are_refused(tiny_qwen2, tmp_path, changes, expected):
    found = problems(run_config(variant(tmp_path, tiny_qwen2, **changes)))
    assert len(found) == 1 and expected in found[0] and "actor.path" in found[0]


def test_llama_biases_are_refused(tiny_llama, tmp_path):
    assert "attention_bias=true" in problems(run_config(variant(tmp_path, tiny_llama, attention_bias=True)))[0]


def test_a_missing_model_directory_is_reported_as_the_core_reports_it(tmp_path):
    from areal_core.validation import check_model_dir

    config = run_config(tmp_path / "nowhere")
    assert check_config(config) == check_model_dir(config) != []


@pytest.mark.parametrize("tp,key,fragment", [
    (3, "actor.tensor_parallel_size", "num_attention_heads=4"),
    (4, "actor.tensor_parallel_size", "num_key_value_heads=2"),
])
def test_tensor_parallel_size_must_divide_heads_and_kv_heads(tiny_qwen2, tp, key, fragment):
    found = problems(run_config(tiny_qwen2, tensor_parallel_size=tp, world_size=12, lora_rank=12))
    assert any(p.startswith(key) and fragment in p for p in found), found


def test_lora_rank_must_split_over_tensor_parallel_ranks(tiny_qwen2):
    found = problems(run_config(tiny_qwen2, tensor_parallel_size=2, world_size=2, lora_rank=5))
    assert found == [f for f in found if f.startswith("actor.lora_rank")] and "multiple of 2" in found[0]


def test_unknown_target_modules_are_refused_with_the_names_that_exist(tiny_qwen2):
    found = problems(run_config(tiny_qwen2, target_modules=["q_proj", "lm_head"]))
    assert len(found) == 1 and "['lm_head']" in found[0] and "linear_qkv" in found[0] and "o_proj" in found[0]


def test_cpu_mode_on_a_cuda_device_is_contradictory(tiny_qwen2, monkeypatch):
    monkeypatch.setenv("AREAL_MEGATRON_CPU_MODE", "1")
    assert any("AREAL_MEGATRON_CPU_MODE" in p for p in problems(run_config(tiny_qwen2, device="cuda")))


def test_target_modules_map_to_fused_layers(tiny_qwen2):
    targets = state_dict_adapter(load_spec(tiny_qwen2)).linear_targets()
    everything = resolve_targets(["all-linear"], targets)
    assert [(p.target.name, p.parts) for p in everything] == [
        ("linear_qkv", ()), ("linear_proj", ()), ("linear_fc1", ()), ("linear_fc2", ())]
    assert resolve_targets([], targets) == everything
    whole = resolve_targets(["q_proj", "k_proj", "v_proj", "up_proj", "gate_proj"], targets)
    assert [(p.target.name, p.parts) for p in whole] == [("linear_qkv", ()), ("linear_fc1", ())]
    subset = resolve_targets(["v_proj", "q_proj", "up_proj", "linear_fc2"], targets)
    assert [(p.target.name, p.parts, p.hf_modules) for p in subset] == [
        ("linear_qkv", ("q", "v"), ("q_proj", "v_proj")),
        ("linear_fc1", ("up",), ("up_proj",)),
        ("linear_fc2", (), ("down_proj",)),
    ]
    with pytest.raises(AdapterError, match="embed_tokens"):
        resolve_targets(["embed_tokens"], targets)


def test_the_engine_refuses_before_touching_process_groups(tiny_qwen2, tmp_path, monkeypatch):
    import torch.distributed as dist

    monkeypatch.delenv("AREAL_MEGATRON_CPU_MODE", raising=False)
    if not __import__("torch").cuda.is_available():
        with pytest.raises(ArealError, match="AREAL_MEGATRON_CPU_MODE=1 or actor.device=cpu"):
            plugin.areal_build_engine(backend="megatron", config=run_config(tiny_qwen2))
    with pytest.raises(ArealError, match="num_attention_heads=4"):
        plugin.areal_build_engine(backend="megatron", config=run_config(tiny_qwen2, tensor_parallel_size=3))
    with pytest.raises(UnsupportedModel, match="mixture-of-experts"):
        plugin.areal_build_engine(backend="megatron",
                                  config=run_config(variant(tmp_path, tiny_qwen2, num_local_experts=4)))
    assert not dist.is_initialized()


@pytest.mark.parametrize("key", ["replicate_adapter", "replicate_base"])
def test_a_whole_adapter_or_base_is_what_data_parallel_replicas_hold_unless_tensor_parallel(tiny_qwen2, key):
    assert check_config(run_config(tiny_qwen2, **{key: True})) == []
    found = check_config(run_config(tiny_qwen2, tensor_parallel_size=2, **{key: True}))
    assert [e.key for e in found] == [f"actor.{key}"]
    assert "tensor_parallel_size 2" in str(found[0]) and f"{key}: false" in str(found[0])
