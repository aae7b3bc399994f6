"""``areal check`` on a run with ``adapters:``: names, each entry's own values, what the chosen
engine and server take per adapter, the versions live at once, and backends that train one
adapter only. Fake backends (no models, no servers)."""

import types

import pytest

from areal_core import hookimpl
from areal_core.config_loader import load_config
from areal_core.declarations import BackendDeclaration, LoraStatus, LoraSupport
from areal_core.registry import Registry
from areal_core.validation import check_adapters, check_backends, check_multi_adapter, validate

TWO = ["adapters=[{name: add, lora_rank: 8}, {name: sub, lora_rank: 16}]"]


def fake_registry(*, engine_multi=True, server_multi=True, max_rank=None, allowed_ranks=None,
                  unservable=("lm_head",), extra_engine=None):
    module = types.ModuleType("fake_adapter_backends")
    declarations = [
        BackendDeclaration(name="eng", kind="engine", lora=LoraSupport(
            status=LoraStatus.READY, multi_adapter=engine_multi)),
        BackendDeclaration(name="srv", kind="server", lora=LoraSupport(
            status=LoraStatus.READY, multi_adapter=server_multi, max_rank=max_rank,
            allowed_ranks=allowed_ranks, unservable_modules=tuple(unservable))),
    ]
    if extra_engine:
        declarations.append(BackendDeclaration(name=extra_engine, kind="engine", lora=LoraSupport(
            status=LoraStatus.READY, multi_adapter=True)))

    @hookimpl
    def areal_declare_backends():
        return declarations

    module.areal_declare_backends = areal_declare_backends
    return Registry(entry_points=[], extra_plugins=[("fake", module)])


@pytest.fixture
def model_dir(tmp_path):
    """What check_model_dir looks at: config.json and a *.safetensors file (no weights needed)."""
    path = tmp_path / "base-model"
    path.mkdir()
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"")
    return path


def config_of(model_dir, *overrides):
    config, errors = load_config(None, [f"actor.path={model_dir}", "actor.backend=eng",
                                        "rollout.backend=srv", *overrides])
    assert not errors, errors
    return config


def keys(errors):
    return [e.key for e in errors]


def test_a_good_two_adapter_run_passes(model_dir):
    config = config_of(model_dir, *TWO, "gconfig.lora_name=ignored-when-adapters-given")
    assert validate(config, fake_registry()) == []


def test_a_bad_top_level_lora_name_is_ignored_with_adapters(model_dir):
    assert validate(config_of(model_dir, *TWO, "gconfig.lora_name=a/b"), fake_registry()) == []
    # without adapters: the top-level name is the adapter's and is still checked
    assert "gconfig.lora_name" in keys(validate(config_of(model_dir, "gconfig.lora_name=a/b"), fake_registry()))


@pytest.mark.parametrize("names,index,words", [
    (["add", "add"], 1, "adapters[0] has the same name"),
    (["add", "''"], 1, "needs a name"),
    (["add", "'a/b'"], 1, "'/' or whitespace"),
    (["add", "'a b'"], 1, "'/' or whitespace"),
    (["add", "a-"], 1, "letters, digits"),
    (["add", "a--b"], 1, "letters, digits"),
    (["add", "sub-v2"], 1, "ends like a version name"),
    (["add", "base-model"], 1, "the base model is served under this name"),
])
def test_bad_names_are_refused(model_dir, names, index, words):
    entries = ", ".join(f"{{name: {n}}}" for n in names)
    errors = check_adapters(config_of(model_dir, f"adapters=[{entries}]"))
    found = [e for e in errors if e.key == f"adapters[{index}].name"]
    assert len(found) == 1, errors
    assert words in found[0].problem and found[0].fix


def test_a_version_like_name_is_told_a_name_without_the_ending(model_dir):
    (error,) = check_adapters(config_of(model_dir, "adapters=[{name: sub-v2}]"))
    assert "sub_v2" in error.fix


def test_the_base_models_name_as_given_is_refused(model_dir, monkeypatch):
    monkeypatch.chdir(model_dir.parent)
    config = config_of(model_dir, "actor.path=base-model", "adapters=[{name: base-model}]")
    assert keys(check_adapters(config)) == ["adapters[0].name"]


BAD_ENTRY_VALUES = [
    ("lora_rank: 0", "adapters.add.lora_rank", ">= 1"),
    ("lora_alpha: 0", "adapters.add.lora_alpha", "> 0"),
    ("peft_type: ia3", "adapters.add.peft_type", "only LoRA"),
    ("target_modules: ['q_.*']", "adapters.add.target_modules[0]", "regexes"),
    ("target_modules: [all-linear, q_proj]", "adapters.add.target_modules", "cannot be combined"),
    ("optimizer: {lr: 0}", "adapters.add.optimizer.lr", "> 0"),
    ("optimizer: {betas: [0.9, 1.5]}", "adapters.add.optimizer.betas", "[0, 1)"),
    ("optimizer: {lr_scheduler_type: step}", "adapters.add.optimizer.lr_scheduler_type", "one of constant"),
    ("batch_size: 0", "adapters.add.batch_size", ">= 1"),
    ("max_head_offpolicyness: -1", "adapters.add.max_head_offpolicyness", ">= 0"),
    ("gconfig: {n_samples: 1}", "adapters.add.gconfig.n_samples", "at least 2"),
    ("gconfig: {temperature: 0}", "adapters.add.gconfig.temperature", "temperature > 0"),
    ("gconfig: {max_new_tokens: 4000}", "adapters.add.gconfig.max_new_tokens", "rollout.max_model_len"),
    ("dataset: {name: nope}", "adapters.add.dataset.name", "unknown dataset"),
    ("reward: {name: no_such_module:fn}", "adapters.add.reward.name", "cannot import module"),
]


@pytest.mark.parametrize("setting,key,words", BAD_ENTRY_VALUES, ids=[b[1] for b in BAD_ENTRY_VALUES])
def test_each_entrys_own_values_are_checked_as_the_top_levels_are(model_dir, setting, key, words):
    config = config_of(model_dir, f"adapters=[{{name: add, {setting}}}, {{name: sub}}]")
    errors = validate(config, fake_registry())
    found = [e for e in errors if e.key == key]
    assert len(found) == 1, errors
    assert words in found[0].problem and found[0].fix
    assert not [e for e in errors if e.key.startswith("adapters.sub")], errors


def test_a_top_level_error_is_not_repeated_per_adapter(model_dir):
    errors = validate(config_of(model_dir, *TWO, "actor.eps_clip=0"), fake_registry())
    assert keys(errors) == ["actor.eps_clip"]


def test_an_error_from_one_adapters_settings_names_it(model_dir):
    config = config_of(model_dir, "actor.ppo_n_minibatches=20",
                       "adapters=[{name: add}, {name: sub, batch_size: 1, gconfig: {n_samples: 2}}]")
    errors = validate(config, fake_registry())
    assert keys(errors) == ["actor.ppo_n_minibatches"]
    assert "adapters.sub's settings" in errors[0].problem and "more minibatches than samples" in errors[0].problem


def test_a_rank_above_what_the_server_takes_is_refused_per_adapter(model_dir):
    config = config_of(model_dir, "adapters=[{name: add, lora_rank: 8}, {name: sub, lora_rank: 64}]")
    errors = check_backends(config, fake_registry(max_rank=32))
    assert keys(errors) == ["adapters.sub.lora_rank"]
    assert "srv handles ranks up to 32" in errors[0].problem and "<= 32" in errors[0].fix
    errors = check_backends(config, fake_registry(allowed_ranks=(8, 16, 32)))
    assert keys(errors) == ["adapters.sub.lora_rank"] and "up to 32" in errors[0].problem
    assert check_backends(config, fake_registry(max_rank=64)) == []


def test_unservable_target_modules_are_refused_per_adapter(model_dir):
    config = config_of(model_dir, "adapters=[{name: add}, {name: sub, target_modules: [q_proj, lm_head]}]")
    errors = check_backends(config, fake_registry())
    assert keys(errors) == ["adapters.sub.target_modules"] and "lm_head" in errors[0].problem


def test_the_top_level_rank_and_modules_are_checked_without_adapters(model_dir):
    config = config_of(model_dir, "actor.lora_rank=64", "actor.target_modules=[lm_head]")
    assert keys(check_backends(config, fake_registry(max_rank=32))) == ["actor.lora_rank", "actor.target_modules"]


def test_the_versions_of_all_adapters_must_fit_max_loras(model_dir):
    adapters = "adapters=[{name: add}, {name: sub, max_head_offpolicyness: 1}]"  # 2 + 3 live
    errors = check_adapters(config_of(model_dir, adapters, "rollout.max_loras=4"))
    assert keys(errors) == ["rollout.max_loras"]
    assert "5 versions" in errors[0].problem and "2 (adapters.add) + 3 (adapters.sub)" in errors[0].problem
    assert "raise rollout.max_loras to 5" in errors[0].fix and "0 to derive it" in errors[0].fix
    assert check_adapters(config_of(model_dir, adapters, "rollout.max_loras=5")) == []
    assert check_adapters(config_of(model_dir, adapters, "rollout.max_loras=0")) == []


def test_several_adapters_need_both_backends_to_declare_multi_adapter(model_dir):
    config = config_of(model_dir, *TWO)
    registry = fake_registry(engine_multi=False)
    errors = check_multi_adapter(config, registry)
    assert keys(errors) == ["actor.backend"]
    assert "eng does not train several adapters at once" in errors[0].problem
    # the support matrix says why in the same words
    assert errors[0].problem.startswith(registry.matrix.cell("eng", "srv").multi_adapter_reason)
    assert "add, sub" in errors[0].problem and "one adapter" in errors[0].fix
    errors = check_multi_adapter(config, fake_registry(server_multi=False))
    assert keys(errors) == ["rollout.backend"] and "srv does not serve several adapters" in errors[0].problem
    both = check_multi_adapter(config, fake_registry(engine_multi=False, server_multi=False))
    assert keys(both) == ["actor.backend", "rollout.backend"]
    assert keys(validate(config, fake_registry(engine_multi=False))) == ["actor.backend"]


def test_the_refusal_names_an_engine_that_would_do(model_dir):
    errors = check_multi_adapter(config_of(model_dir, *TWO), fake_registry(engine_multi=False, extra_engine="eng2"))
    assert "use actor.backend=eng2" in errors[0].fix


def test_a_list_of_one_runs_on_any_pair(model_dir):
    config = config_of(model_dir, "adapters=[{name: add, lora_rank: 8}]")
    assert validate(config, fake_registry(engine_multi=False, server_multi=False)) == []


def test_a_config_without_adapters_is_checked_as_before(model_dir):
    config = config_of(model_dir)
    assert check_adapters(config) == []
    assert validate(config, fake_registry(engine_multi=False, server_multi=False)) == []
