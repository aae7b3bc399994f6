"""Configuration: the DESIGN.md tree and defaults, YAML + overrides, and a clear error per bad value."""

import textwrap

import attrs
import pytest

from areal_core.config import RunConfig
from areal_core.config_loader import load_config
from areal_core.registry import default_registry
from areal_core.validation import check_model_dir, check_values, validate


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_lora_defaults_are_those_of_the_design():
    actor = RunConfig().actor
    assert (actor.use_lora, actor.lora_rank, actor.lora_alpha, actor.target_modules, actor.peft_type) == (
        True, 16, 32, ["all-linear"], "lora")


def test_empty_target_modules_mean_all_linear(tmp_path):
    config, errors = load_config(write(tmp_path, "actor:\n  target_modules: []\n"))
    assert not errors and config.actor.resolved_target_modules == ["all-linear"]


def test_yaml_interpolation_and_overrides(tmp_path):
    path = write(tmp_path, """
        actor:
          lora_rank: 8
          lora_alpha: ${actor.lora_rank}
        output_dir: runs/${gconfig.lora_name}
        gconfig:
          lora_name: mine
    """)
    config, errors = load_config(path, ["actor.lora_rank=4", "actor.target_modules=[q_proj,v_proj]"])
    assert not errors
    assert config.actor.lora_rank == 4 and config.actor.lora_alpha == 4.0
    assert config.actor.target_modules == ["q_proj", "v_proj"]
    assert config.output_dir == "runs/mine"


def test_config_is_frozen():
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        RunConfig().actor.lora_rank = 3


def test_unknown_key_suggests_the_closest(tmp_path):
    _, errors = load_config(write(tmp_path, "actor:\n  lora_rnak: 8\n"))
    assert [(e.key, e.problem) for e in errors] == [("actor.lora_rnak", "unknown key")]
    assert "actor.lora_rank" in errors[0].fix


def test_wrong_type_names_key_value_and_type(tmp_path):
    _, errors = load_config(write(tmp_path, "actor:\n  lora_rank: sixteen\n  use_lora: 'yes'\n"))
    found = {e.key: e for e in errors}
    assert found["actor.lora_rank"].value == "sixteen" and "int" in found["actor.lora_rank"].problem
    assert "bool" in found["actor.use_lora"].problem


def test_bad_interpolation_is_reported_with_its_key(tmp_path):
    _, errors = load_config(write(tmp_path, "actor:\n  lora_alpha: ${nowhere.key}\n"))
    assert [e.key for e in errors] == ["actor.lora_alpha"] and "interpolation" in errors[0].problem


def test_malformed_override_and_missing_file(tmp_path):
    _, errors = load_config(tmp_path / "absent.yaml", ["actor.lora_rank"])
    assert {e.key for e in errors} == {"CONFIG", "actor.lora_rank"}


BAD_VALUES = [
    ("actor.lora_rank=0", "actor.lora_rank", ">= 1"),
    ("actor.lora_alpha=0", "actor.lora_alpha", "> 0"),
    ("actor.peft_type=ia3", "actor.peft_type", "only LoRA"),
    ("actor.use_lora=false", "actor.use_lora", "trains LoRA adapters"),
    ("actor.target_modules=[q_.*]", "actor.target_modules[0]", "regexes"),
    ("actor.target_modules=[model.layers.0.q_proj]", "actor.target_modules[0]", "dotted paths"),
    ("actor.target_modules=[all-linear,q_proj]", "actor.target_modules", "cannot be combined"),
    ("actor.dtype=float64", "actor.dtype", "unknown dtype"),
    ("actor.world_size=0", "actor.world_size", ">= 1"),
    ("actor.device=tpu", "actor.device", "unknown device"),
    ("actor.tensor_parallel_size=3", "actor.tensor_parallel_size", "divide"),
    ("actor.optimizer.lr=0", "actor.optimizer.lr", "> 0"),
    ("actor.optimizer.grad_clip=-1", "actor.optimizer.grad_clip", ">= 0"),
    ("actor.optimizer.betas=[0.9,1.5]", "actor.optimizer.betas", "[0, 1)"),
    ("actor.max_tokens_per_microbatch=0", "actor.max_tokens_per_microbatch", ">= 1"),
    ("rollout.max_head_offpolicyness=-1", "rollout.max_head_offpolicyness", ">= 0"),
    ("rollout.servers=[not-an-address]", "rollout.servers[0]", "not a server address"),
    ("rollout.startup_timeout=0", "rollout.startup_timeout", "> 0"),
    ("gconfig.n_samples=1", "gconfig.n_samples", "at least 2"),
    ("gconfig.max_new_tokens=0", "gconfig.max_new_tokens", ">= 1"),
    ("gconfig.temperature=0", "gconfig.temperature", "temperature > 0"),
    ("gconfig.top_p=1.5", "gconfig.top_p", "(0, 1]"),
    ("gconfig.lora_name=a/b", "gconfig.lora_name", "letters"),
    ("train.steps=0", "train.steps", ">= 1"),
    ("train.batch_size=0", "train.batch_size", ">= 1"),
    ("train.agreement=sometimes", "train.agreement", "one of stop, warn, off"),
    ("actor.eps_clip=0", "actor.eps_clip", "> 0"),
    ("actor.eps_clip_higher=0.1", "actor.eps_clip_higher", ">= actor.eps_clip"),
    ("actor.c_clip=1.0", "actor.c_clip", "> 1"),
    ("actor.kl_ctl=-0.1", "actor.kl_ctl", ">= 0"),
    ("actor.loss_agg_mode=sum", "actor.loss_agg_mode", "one of token-mean"),
    ("actor.ppo_n_minibatches=0", "actor.ppo_n_minibatches", ">= 1"),
    ("actor.ppo_n_minibatches=1000", "actor.ppo_n_minibatches", "more minibatches than samples"),
    ("actor.behav_imp_weight_cap=5", "actor.behav_imp_weight_cap", "decoupled loss, which is off"),
    ("actor.reward_scaling=0", "actor.reward_scaling", "> 0"),
    ("actor.reward_norm.mean_level=prompt", "actor.reward_norm.mean_level", "group, batch or null"),
    ("actor.reward_norm.group_size=3", "actor.reward_norm.group_size", "gconfig.n_samples"),
    ("actor.overlong_reward_penalty=true", "actor.overlong_tokens", "1..gconfig.max_new_tokens"),
    ("actor.dynamic_sampling_max_rounds=0", "actor.dynamic_sampling_max_rounds", ">= 1"),
    ("actor.optimizer.lr_scheduler_type=step", "actor.optimizer.lr_scheduler_type", "one of constant"),
    ("actor.optimizer.warmup_steps_proportion=1", "actor.optimizer.warmup_steps_proportion", "[0, 1)"),
    ("actor.optimizer.min_lr_ratio=2", "actor.optimizer.min_lr_ratio", "[0, 1]"),
    ("train.checkpoint_every_seconds=-1", "train.checkpoint_every_seconds", ">= 0"),
    ("train.keep_checkpoints=-1", "train.keep_checkpoints", ">= 0"),
]


@pytest.mark.parametrize("old,new", [("train.ppo_clip", "actor.eps_clip"), ("train.kl_coef", "actor.kl_ctl"),
                                     ("actor.optimizer.gradient_clipping", "actor.optimizer.grad_clip")])
def test_moved_and_reference_keys_name_the_key_to_write(old, new):
    _, errors = load_config(None, [f"{old}=0.3"])
    assert len(errors) == 1 and errors[0].key == old and new in errors[0].fix


ENTRY_REFERENCE_KEYS = [
    ("optimizer.gradient_clipping", "write adapters.sub.optimizer.grad_clip"),
    ("optimizer.beta1", "write adapters.sub.optimizer.betas (a pair"),
    ("group_size", "write adapters.sub.gconfig.n_samples"),
    ("mb_spec", "write actor.max_tokens_per_microbatch (a setting of the run, shared by every adapter"),
]


@pytest.mark.parametrize("key,fix", ENTRY_REFERENCE_KEYS, ids=[k for k, _ in ENTRY_REFERENCE_KEYS])
def test_reference_names_inside_an_adapter_entry_name_the_entry_key(tmp_path, key, fix):
    head, _, tail = key.rpartition(".")
    entry = f"    {head}:\n      {tail}: 0.5\n" if head else f"    {key}: 0.5\n"
    path = tmp_path / "run.yaml"
    path.write_text("adapters:\n  - name: main\n  - name: sub\n" + entry)
    _, errors = load_config(path)
    assert [e.key for e in errors] == [f"adapters.sub.{key}"], errors
    assert errors[0].fix.startswith(fix), errors[0].fix


@pytest.mark.parametrize("override,key,words", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_each_bad_value_has_its_clear_error(override, key, words):
    config, load_errors = load_config(None, [override])
    assert not load_errors
    errors = [e for e in check_values(config) if e.key == key]
    assert len(errors) == 1, check_values(config)
    assert words in errors[0].problem and errors[0].fix


def test_model_directory_checks(tmp_path):
    def errors_for(path, *extra):
        config, _ = load_config(None, [f"actor.path={path}", *extra])
        return check_model_dir(config)

    assert "does not exist" in errors_for(tmp_path / "absent")[0].problem
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"num_local_experts": 8, "auto_map": {"x": "y"}}')
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"")
    problems = " | ".join(e.problem for e in errors_for(tmp_path / "m"))
    assert "no *.safetensors (found pickled pytorch_model.bin)" in problems
    assert "mixture-of-experts" in problems and "num_local_experts=8" in problems
    assert "needs its own code" in problems
    assert not any("own code" in e.problem for e in errors_for(tmp_path / "m", "actor.trust_remote_code=true"))


def test_backend_checks_name_the_installed_backends(tiny_qwen2):
    config, _ = load_config(None, [f"actor.path={tiny_qwen2}", "actor.backend=archon", "rollout.backend=vllm"])
    errors = validate(config, default_registry())
    found = [e for e in errors if e.key == "actor.backend"]
    assert found and "fsdp2" in found[0].fix and "megatron" in found[0].fix
    config, _ = load_config(None, [f"actor.path={tiny_qwen2}", "actor.backend=vllm"])
    assert any("is a server, not an engine" in e.problem for e in validate(config, default_registry()))


def test_dataset_and_reward_names_must_resolve():
    from areal_core.validation import check_tasks

    config, _ = load_config(None, ["dataset.name=nope", "reward.name=no_such_module:fn"])
    found = {e.key: e for e in check_tasks(config)}
    assert "unknown dataset 'nope'" in found["dataset.name"].problem and "arithmetic" in found["dataset.name"].problem
    assert "cannot import module 'no_such_module'" in found["reward.name"].problem
    config, _ = load_config(None, [])
    assert check_tasks(config) == []


def test_an_old_config_setting_agreement_tolerance_is_told_what_replaced_it(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("train:\n  agreement_tolerance: 1.0e-4\n")
    _, errors = load_config(path)
    assert [e.key for e in errors] == ["train.agreement_tolerance"]
    assert "derives its threshold from the dtype" in errors[0].problem
    assert "train.agreement=stop|warn|off" in errors[0].fix


@pytest.mark.parametrize("written,meant", [("off", "off"), ("warn", "warn"), ("stop", "stop")])
def test_agreement_policy_reads_as_written_in_yaml(tmp_path, written, meant):
    path = tmp_path / "c.yaml"
    path.write_text(f"train:\n  agreement: {written}\n")  # YAML reads a bare off as false
    config, errors = load_config(path)
    assert not errors and config.train.agreement == meant
