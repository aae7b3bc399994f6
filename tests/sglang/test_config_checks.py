"""``areal check`` rules of the SGLang backend, its declaration and the routing of its hooks (no server)."""

from __future__ import annotations

import pytest

from areal_core.config import ActorConfig, RolloutConfig, RunConfig
from areal_core.declarations import PEFT_DIRECTORY
from areal_core.registry import Registry
from areal_sglang import plugin
from areal_sglang.config_checks import validate
from areal_sglang.target_modules import sglang_target_modules, target_module_errors


def config(tiny_path="", *, target_modules=("all-linear",), lora_rank=8, servers=("127.0.0.1:1",),
           **rollout) -> RunConfig:
    return RunConfig(
        actor=ActorConfig(path=tiny_path, lora_rank=lora_rank, target_modules=list(target_modules)),
        rollout=RolloutConfig(backend="sglang", servers=list(servers), **rollout),
    )


def keys(errors) -> list[str]:
    return [error.key for error in errors]


@pytest.mark.parametrize("modules, flag", [
    (["all-linear"], ["all"]),
    ([], ["all"]),
    (["v_proj", "q_proj", "q_proj"], ["q_proj", "v_proj"]),
    (["gate_proj", "up_proj", "down_proj"], ["down_proj", "gate_proj", "up_proj"]),
])
def test_target_modules_become_sglangs_flag(modules, flag):
    assert sglang_target_modules(modules) == flag


@pytest.mark.parametrize("module, words", [
    (".*proj", "regular expressions"),
    ("q_proj|v_proj", "regular expressions"),
    ("model.layers.0.self_attn.q_proj", "cannot carry LoRA"),
    ("conv1d", "cannot carry LoRA"),
])
def test_target_modules_sglang_cannot_take_are_refused_with_a_fix(module, words):
    errors = target_module_errors([module])
    assert len(errors) == 1 and words in errors[0].problem and errors[0].fix
    with pytest.raises(ValueError, match=words):
        sglang_target_modules([module])


def test_all_linear_mixed_with_names_is_refused():
    assert keys(target_module_errors(["all-linear", "q_proj"])) == ["actor.target_modules"]


def test_a_sound_configuration_passes():
    assert validate(config()) == []


def test_extra_args_cannot_lower_the_rank_or_the_resident_adapters_below_what_the_run_needs():
    errors = validate(config(lora_rank=16, max_head_offpolicyness=2,
                             extra_args=["--max-lora-rank", "8", "--max-loaded-loras=3"]))
    problems = " / ".join(error.problem for error in errors)
    assert keys(errors) == ["rollout.extra_args", "rollout.extra_args"]
    assert "at least 16" in problems and "at least 4" in problems


def test_extra_args_cannot_set_flags_areal_derives():
    errors = validate(config(extra_args=["--lora-target-modules", "q_proj", "--port", "9"]))
    assert [error.value for error in errors] == ["--lora-target-modules", "--port"]


def test_max_loras_must_hold_every_live_version():
    errors = validate(config(max_loras=2, max_head_offpolicyness=1))
    assert keys(errors) == ["rollout.max_loras"] and "at least 3" in errors[0].fix


def test_an_api_key_variable_that_is_not_set_is_reported(monkeypatch):
    monkeypatch.delenv("AREAL_TEST_SGLANG_KEY", raising=False)
    assert keys(validate(config(api_key_env="AREAL_TEST_SGLANG_KEY"))) == ["rollout.api_key_env"]
    monkeypatch.setenv("AREAL_TEST_SGLANG_KEY", "secret")
    assert validate(config(api_key_env="AREAL_TEST_SGLANG_KEY")) == []


def test_launching_without_a_python_that_has_sglang_is_reported(monkeypatch, tmp_path):
    monkeypatch.setenv("AREAL_SGLANG_PYTHON", str(tmp_path / "no-python"))
    errors = validate(config(servers=()))
    assert keys(errors) == ["rollout.servers"] and "AREAL_SGLANG_PYTHON" in errors[0].problem


def test_declaration_is_cheap_data_for_the_matrix():
    (declaration,) = plugin.areal_declare_backends()
    assert declaration.name == "sglang" and declaration.kind == "server"
    assert declaration.lora.transports == (PEFT_DIRECTORY,) and declaration.lora.moe is False
    assert declaration.lora.peft_types == ("lora",)


def test_hooks_answer_only_for_sglang():
    other = config()
    assert plugin.areal_build_rollout_server(backend="vllm", config=other) is None
    assert plugin.areal_validate_config(backend="fsdp2", config=other) is None
    assert plugin.areal_load_rollout_adapter(backend="vllm", server=None, adapter=None, lora_name="x") is None
    assert plugin.areal_validate_config(backend="sglang", config=other) == []


def test_the_installed_registry_routes_sglang_to_this_plugin():
    registry = Registry()
    assert registry.declaration("sglang").plugin == "sglang"
    server = registry.build_rollout_server("sglang", config())
    assert type(server).__module__ == "areal_sglang.server" and server.name == "sglang"


def test_an_api_key_is_refused_for_a_launched_server_whose_log_would_hold_it(monkeypatch):
    from areal_core.config import RolloutConfig, RunConfig
    from areal_sglang.config_checks import validate

    monkeypatch.setenv("AREAL_TEST_SGLANG_KEY", "secret")
    launched = RunConfig(rollout=RolloutConfig(backend="sglang", api_key_env="AREAL_TEST_SGLANG_KEY"))
    errors = [e for e in validate(launched) if e.key == "rollout.api_key_env"]
    assert len(errors) == 1 and "--api-key" in errors[0].problem
    remote = RunConfig(rollout=RolloutConfig(backend="sglang", api_key_env="AREAL_TEST_SGLANG_KEY",
                                             servers=["127.0.0.1:30000"]))
    assert not [e for e in validate(remote) if e.key == "rollout.api_key_env"]
