"""The fsdp2 engine's configuration checks (``areal_validate_config``): quick, no torch.

Model directories here hold a hand-written config.json and a placeholder weights file: the
checks read only config.json and file names.
"""

from __future__ import annotations

import json

import pytest

from areal_core.config import ActorConfig, OptimizerConfig, RunConfig
from areal_core.registry import Registry

QWEN2_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 32, "tie_word_embeddings": True,
}
LINEAR_NAMES = "['down_proj', 'gate_proj', 'k_proj', 'lm_head', 'o_proj', 'q_proj', 'up_proj', 'v_proj']"


def model_dir(tmp_path, config=QWEN2_CONFIG, weights="model.safetensors"):
    tmp_path.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    if weights:
        (tmp_path / weights).write_bytes(b"placeholder")
    return tmp_path


@pytest.fixture(scope="module")
def registry():
    return Registry()


def check(registry, **actor_options):
    config = RunConfig(actor=ActorConfig(backend="fsdp2", **actor_options))
    return registry.call("areal_validate_config", "fsdp2", config=config)


def only_error(errors, key):
    assert [e.key for e in errors] == [key], [str(e) for e in errors]
    return str(errors[0])


def test_a_good_configuration_passes(registry, tmp_path):
    assert check(registry, path=str(model_dir(tmp_path)), target_modules=["q_proj", "v_proj"]) == []
    assert check(registry, path=str(model_dir(tmp_path)), target_modules=[]) == []
    assert check(registry, path=str(model_dir(tmp_path)), target_modules=["lm_head"]) == []


def test_other_backends_are_not_answered(registry, tmp_path):
    config = RunConfig(actor=ActorConfig(path=str(model_dir(tmp_path))))
    from areal_fsdp2 import plugin

    assert plugin.areal_validate_config(backend="megatron", config=config) is None
    assert plugin.areal_build_engine(backend="megatron", config=config) is None
    assert plugin.areal_inject_adapter(backend="megatron", engine=None, actor=config.actor,
                                       adapter_name=None) is None
    assert plugin.areal_shard_model(backend="megatron", engine=None, actor=config.actor) is None
    assert plugin.areal_export_adapter(backend="megatron", engine=None, directory="x", version=1,
                                       adapter_name=None) is None


def test_missing_model_directory(registry, tmp_path):
    message = only_error(check(registry, path=str(tmp_path / "nowhere")), "actor.path")
    assert "does not exist" in message and "config.json" in message
    assert "set actor.path" in only_error(check(registry, path=""), "actor.path")


def test_directory_without_config_json(registry, tmp_path):
    message = only_error(check(registry, path=str(model_dir(tmp_path, config=None))), "actor.path")
    assert "has no config.json" in message


def test_directory_without_safetensors_names_the_pickled_files(registry, tmp_path):
    path = model_dir(tmp_path, weights="pytorch_model.bin")
    message = only_error(check(registry, path=str(path)), "actor.path")
    assert "no *.safetensors" in message and "pytorch_model.bin" in message
    assert "safe_serialization=True" in message


@pytest.mark.parametrize("experts", [
    {"architectures": ["MixtralForCausalLM"], "num_local_experts": 8, "num_experts_per_tok": 2},
    {"architectures": ["Qwen2MoeForCausalLM"], "num_experts": 4},
    {"architectures": ["DeepseekV3ForCausalLM"], "n_routed_experts": 16},
    {"architectures": ["SomethingForConditionalGeneration"], "text_config": {"num_local_experts": 4}},
    {"architectures": ["OlmoeMoeForCausalLM"]},
])
def test_mixture_of_experts_is_refused(registry, tmp_path, experts):
    path = model_dir(tmp_path, config={**QWEN2_CONFIG, **experts})
    message = only_error(check(registry, path=str(path)), "actor.path")
    assert "mixture-of-experts" in message and "dense models only" in message


def test_dense_config_with_zero_experts_is_accepted(registry, tmp_path):
    assert check(registry, path=str(model_dir(tmp_path, config={**QWEN2_CONFIG, "num_experts": 0}))) == []


def test_target_modules_matching_nothing_list_the_linear_modules(registry, tmp_path):
    errors = check(registry, path=str(model_dir(tmp_path)), target_modules=["q_proj", "attn_qkv"])
    message = only_error(errors, "actor.target_modules")
    assert "['attn_qkv']" in message and LINEAR_NAMES in message


def test_a_non_linear_module_is_not_a_target(registry, tmp_path):
    message = only_error(check(registry, path=str(model_dir(tmp_path)), target_modules=["embed_tokens"]),
                         "actor.target_modules")
    assert "embed_tokens" in message and LINEAR_NAMES in message


def test_all_linear_mixed_with_names_is_refused(registry, tmp_path):
    message = only_error(check(registry, path=str(model_dir(tmp_path)), target_modules=["all-linear", "q_proj"]),
                         "actor.target_modules")
    assert "mixes 'all-linear'" in message


def test_full_finetuning_skips_the_target_module_check(registry, tmp_path):
    assert check(registry, path=str(model_dir(tmp_path)), full_finetune=True, target_modules=["nope"]) == []


def test_engine_limits_are_checked(registry, tmp_path):
    errors = check(
        registry, path=str(model_dir(tmp_path)), max_tokens_per_microbatch=1, tensor_parallel_size=2,
        optimizer=OptimizerConfig(lr=0.0, grad_clip=-1.0),
    )
    assert sorted(e.key for e in errors) == sorted([
        "actor.max_tokens_per_microbatch", "actor.tensor_parallel_size", "actor.optimizer.lr",
        "actor.optimizer.grad_clip",
    ])
    assert all(e.problem for e in errors)


def test_a_whole_base_needs_a_frozen_base_in_its_compute_dtype(registry, tmp_path):
    path = str(model_dir(tmp_path))
    assert check(registry, path=path, replicate_base=True, replicate_adapter=True) == []
    message = only_error(check(registry, path=path, replicate_base=True, full_finetune=True), "actor.replicate_base")
    assert "no frozen base" in message and "replicate_base: false" in message
    message = only_error(check(registry, path=path, replicate_base=True, param_dtype="bfloat16"),
                         "actor.replicate_base")
    assert "not cast" in message and "actor.dtype: bfloat16" in message
