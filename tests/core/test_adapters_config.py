"""Loading ``adapters:``: each entry an ``AdapterConfig``, its omitted keys from the run's own
settings (optimizer and gconfig key by key), errors keyed ``adapters.<name>.<key>``, and
command-line overrides that name an entry."""

import textwrap

import pytest
import yaml

from areal_core.adapters import adapter_run_config
from areal_core.config import AdapterConfig, DatasetConfig, RunConfig
from areal_core.config_loader import config_to_dict, load_config

RUN = """
actor:
  lora_rank: 4
  lora_alpha: 12
  target_modules: [q_proj]
  optimizer: {lr: 1.0e-4, weight_decay: 0.1, lr_scheduler_type: cosine}
train: {batch_size: 6}
rollout: {max_head_offpolicyness: 2}
gconfig: {n_samples: 6, max_new_tokens: 12, temperature: 0.7, lora_name: top}
dataset: {name: arithmetic, options: {seed: 5}}
reward: {name: arithmetic, options: {}}
adapters:
  - name: add
    lora_rank: 8
  - name: sub
    lora_rank: 16
    lora_alpha: 32
    target_modules: [q_proj, v_proj, down_proj]
    optimizer: {lr: 2.0e-3}
    batch_size: 8
    max_head_offpolicyness: 1
    gconfig: {n_samples: 4}
    dataset: {name: arithmetic}
    reward: {name: gsm8k}
"""


def write(tmp_path, text=RUN):
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def load(tmp_path, overrides=(), text=RUN):
    config, errors = load_config(write(tmp_path, text), list(overrides))
    return config, errors


def test_entries_are_adapter_configs_in_the_order_listed(tmp_path):
    config, errors = load(tmp_path)
    assert not errors
    assert [type(a) for a in config.adapters] == [AdapterConfig, AdapterConfig]
    assert [a.name for a in config.adapters] == ["add", "sub"] and config.multi_adapter


def test_omitted_keys_come_from_the_run_settings(tmp_path):
    config, _ = load(tmp_path)
    add = config.adapters[0]
    assert add.lora_rank == 8  # given
    assert (add.lora_alpha, add.target_modules, add.peft_type) == (12.0, ["q_proj"], "lora")
    assert add.optimizer == config.actor.optimizer
    assert (add.batch_size, add.max_head_offpolicyness) == (6, 2)
    assert add.dataset == config.dataset and add.reward == config.reward
    assert add.gconfig.n_samples == 6 and add.gconfig.temperature == 0.7


def test_optimizer_and_gconfig_merge_key_by_key_dataset_and_reward_replace_whole(tmp_path):
    config, _ = load(tmp_path)
    sub = config.adapters[1]
    assert sub.optimizer.lr == 2e-3  # given
    assert sub.optimizer.weight_decay == 0.1 and sub.optimizer.lr_scheduler_type == "cosine"  # kept
    assert sub.gconfig.n_samples == 4 and sub.gconfig.max_new_tokens == 12 and sub.gconfig.temperature == 0.7
    assert sub.dataset == DatasetConfig(name="arithmetic", options={})  # not the run's {seed: 5}
    assert sub.reward.name == "gsm8k"
    assert (sub.lora_rank, sub.lora_alpha, sub.target_modules) == (16, 32.0, ["q_proj", "v_proj", "down_proj"])
    assert (sub.batch_size, sub.max_head_offpolicyness) == (8, 1)


def test_an_entrys_lora_name_is_its_name(tmp_path):
    config, _ = load(tmp_path)
    assert [a.gconfig.lora_name for a in config.adapters] == ["add", "sub"]
    assert config.gconfig.lora_name == "top"  # kept, unused
    view = adapter_run_config(config, config.adapters[1])
    assert view.gconfig.lora_name == "sub" and view.actor.lora_rank == 16 and view.train.batch_size == 8


def test_the_written_config_shows_each_entrys_full_settings_and_reads_back(tmp_path):
    config, _ = load(tmp_path)
    data = config_to_dict(config)
    sub = data["adapters"][1]
    assert set(sub) == {"name", "lora_rank", "lora_alpha", "target_modules", "peft_type", "optimizer",
                        "batch_size", "max_head_offpolicyness", "gconfig", "dataset", "reward"}
    assert sub["optimizer"]["weight_decay"] == 0.1 and sub["gconfig"]["max_new_tokens"] == 12
    again = tmp_path / "again"
    again.mkdir()
    reread, errors = load_config(write(again, yaml.safe_dump(data, sort_keys=False)))
    assert not errors and reread == config


def test_the_run_settings_are_taken_after_overrides_and_interpolation(tmp_path):
    text = RUN.replace("lora_rank: 8\n", "lora_rank: 8\n    lora_alpha: ${actor.lora_rank}\n")
    config, errors = load(tmp_path, ["actor.optimizer.lr=5e-4", "train.batch_size=3", "actor.lora_rank=2"], text)
    assert not errors
    add = config.adapters[0]
    assert add.optimizer.lr == 5e-4 and add.batch_size == 3 and add.lora_alpha == 2.0
    assert config.adapters[1].optimizer.lr == 2e-3 and config.adapters[1].batch_size == 8


def test_override_an_entry_by_name(tmp_path):
    config, errors = load(tmp_path, ["adapters.sub.lora_rank=32", "adapters.sub.optimizer.lr=1e-3",
                                     "adapters.add.gconfig.n_samples=3", "adapters.add.dataset.options={seed: 9}",
                                     "adapters.sub.target_modules=[o_proj]"])
    assert not errors
    add, sub = config.adapters
    assert sub.target_modules == ["o_proj"]  # a list is replaced, not merged
    assert sub.lora_rank == 32 and sub.optimizer.lr == 1e-3 and sub.optimizer.weight_decay == 0.1
    assert add.lora_rank == 8 and add.gconfig.n_samples == 3 and add.gconfig.max_new_tokens == 12
    assert add.dataset.options == {"seed": 9}


def test_an_override_below_an_inherited_key_changes_that_key_of_the_runs_setting(tmp_path):
    # add inherits the run's dataset: the override changes one option of it, not the whole
    config, errors = load(tmp_path, ["adapters.add.dataset.options.operation=sub",
                                     "adapters.sub.dataset.options.operation=sub"])
    assert not errors
    add, sub = config.adapters
    assert add.dataset.name == "arithmetic" and add.dataset.options == {"seed": 5, "operation": "sub"}
    assert sub.dataset.options == {"operation": "sub"}  # sub's own dataset, without the run's seed
    assert config.dataset.options == {"seed": 5}


def test_override_an_entry_by_index(tmp_path):
    config, errors = load(tmp_path, ["adapters.0.lora_rank=2", "adapters[1].batch_size=5"])
    assert not errors and config.adapters[0].lora_rank == 2 and config.adapters[1].batch_size == 5


def test_a_name_with_dots_is_matched_whole(tmp_path):
    text = RUN.replace("name: add", "name: arith.small")
    config, errors = load(tmp_path, ["adapters.arith.small.optimizer.lr=3e-3"], text)
    assert not errors and config.adapters[0].optimizer.lr == 3e-3


def test_an_unknown_adapter_name_lists_the_names(tmp_path):
    _, errors = load(tmp_path, ["adapters.mul.lora_rank=4"])
    assert [e.key for e in errors] == ["adapters.mul.lora_rank"]
    assert "no adapter named 'mul'" in errors[0].problem and "add, sub" in errors[0].fix
    _, errors = load(tmp_path, ["adapters.7.lora_rank=4"])
    assert "no adapter at index 7" in errors[0].problem and "add, sub" in errors[0].fix
    _, errors = load_config(None, ["adapters.add.lora_rank=4"])
    assert errors[0].key == "adapters.add.lora_rank" and "no adapters: list" in errors[0].fix


def test_unknown_keys_and_bad_types_are_keyed_by_the_adapters_name(tmp_path):
    text = RUN.replace("lora_rank: 8\n", "lora_rnak: 8\n    batch_size: many\n    optimizer: {weight_dcay: 1}\n")
    _, errors = load(tmp_path, text=text)
    found = {e.key: e for e in errors}
    assert set(found) == {"adapters.add.lora_rnak", "adapters.add.batch_size", "adapters.add.optimizer.weight_dcay"}
    assert found["adapters.add.lora_rnak"].problem == "unknown key"
    assert "adapters.add.lora_rank" in found["adapters.add.lora_rnak"].fix
    assert "int" in found["adapters.add.batch_size"].problem
    assert "adapters.add.optimizer.weight_decay" in found["adapters.add.optimizer.weight_dcay"].fix


def test_an_entry_without_a_unique_name_is_keyed_by_its_index(tmp_path):
    text = "adapters:\n  - {name: a, lora_rnak: 1}\n  - {name: a, lora_rnak: 1}\n  - {lora_rnak: 1}\n"
    _, errors = load(tmp_path, text=text)
    assert [e.key for e in errors] == ["adapters[0].lora_rnak", "adapters[1].lora_rnak", "adapters[2].lora_rnak"]


def test_a_top_level_mistake_is_reported_once_not_per_adapter(tmp_path):
    text = RUN.replace("weight_decay: 0.1,", "weight_decay: 0.1, lr_rate: 3,").replace("batch_size: 6", "batch_size: six")
    config, errors = load(tmp_path, text=text)
    assert sorted(e.key for e in errors) == ["actor.optimizer.lr_rate", "train.batch_size"]
    assert config.adapters[0].batch_size == RunConfig().train.batch_size  # the default it kept


def test_an_entrys_gconfig_lora_name_is_refused(tmp_path):
    text = RUN.replace("gconfig: {n_samples: 4}", "gconfig: {n_samples: 4, lora_name: other}")
    _, errors = load(tmp_path, text=text)
    assert [e.key for e in errors] == ["adapters.sub.gconfig.lora_name"]
    assert errors[0].value == "other" and "its name" in errors[0].problem and "delete" in errors[0].fix
    _, errors = load(tmp_path, ["adapters.add.gconfig.lora_name=x"])
    assert [e.key for e in errors] == ["adapters.add.gconfig.lora_name"]


@pytest.mark.parametrize("text,key,words", [
    ("adapters: {add: {lora_rank: 8}}\n", "adapters", "list of adapter entries"),
    ("adapters:\n  - 5\n", "adapters[0]", "mapping"),
    ("adapters:\n  - {name: a, optimizer: 3}\n", "adapters.a.optimizer", "mapping"),
])
def test_malformed_lists_and_entries(tmp_path, text, key, words):
    _, errors = load(tmp_path, text=text)
    assert [e.key for e in errors] == [key] and words in errors[0].problem and errors[0].fix


def test_a_config_without_adapters_is_unchanged(tmp_path):
    text = RUN.split("adapters:")[0]
    config, errors = load(tmp_path, ["actor.lora_rank=8"], text)
    assert not errors and config.adapters == [] and not config.multi_adapter
    assert config.actor.lora_rank == 8 and config.gconfig.lora_name == "top"
    assert config_to_dict(config)["adapters"] == []
    empty, errors = load(tmp_path, text=text + "adapters: []\n")
    assert not errors and empty.adapters == []
