"""examples/gsm8k_grpo_lora.yaml: the reference system's LoRA keys, valid for `areal check` with a
tiny local model and small GSM8K files, and its dataset and reward build from its own options."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from areal_core.config_loader import load_config
from areal_core.tasks import get_dataset, get_reward, resolve_dataset_factory, resolve_reward
from areal_core.tasks.gsm8k import make_dataset, reward

from .gsm8k_files import gsm8k_rows, write_jsonl

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "gsm8k_grpo_lora.yaml"


@pytest.fixture(scope="module")
def overrides(tmp_path_factory, servable_tiny_qwen2):
    """The command-line overrides: the tiny model, and small train/test files in GSM8K's layout."""
    directory = tmp_path_factory.mktemp("gsm8k-example")
    train = write_jsonl(directory / "train.jsonl", gsm8k_rows(12))
    test = write_jsonl(directory / "test.jsonl", gsm8k_rows(3, start=50))
    return [f"actor.path={servable_tiny_qwen2}", f"dataset.options.path={train}",
            f"dataset.options.eval_path={test}"]


def test_example_has_the_reference_lora_keys_and_gpu_settings():
    config, errors = load_config(EXAMPLE)
    assert errors == []
    a, r, g, t = config.actor, config.rollout, config.gconfig, config.train
    assert (a.use_lora, a.peft_type, a.target_modules) == (True, "lora", ["all-linear"])
    assert a.lora_rank >= 8 and a.lora_alpha > 0 and a.optimizer.lr > 0
    assert (a.device, a.dtype, a.world_size, r.dtype) == ("cuda", "bfloat16", 8, "bfloat16")
    assert a.path == "models/Qwen2.5-1.5B-Instruct"
    assert g.n_samples >= 2 and g.max_new_tokens == 512 and g.lora_name and a.eps_clip > 0
    assert (config.dataset.name, config.reward.name) == ("gsm8k", "gsm8k")
    options = config.dataset.options
    assert (options["path"], options["eval_path"]) == ("data/gsm8k/train.jsonl", "data/gsm8k/test.jsonl")
    # ${actor.path}: the prompts are encoded, and completions decoded, by the trained model's tokenizer.
    assert options["tokenizer_path"] == config.reward.options["tokenizer_path"] == a.path
    # The longest prompt kept plus the completion fits the server's context.
    assert options["max_prompt_tokens"] + g.max_new_tokens <= r.max_model_len


def test_example_uses_the_reference_recipes_objective():
    """The settings of the reference system's examples/lora/gsm8k_grpo_lora.yaml that exist here."""
    config, errors = load_config(EXAMPLE)
    assert errors == []
    a = config.actor
    assert (a.eps_clip, a.kl_ctl, a.ppo_n_minibatches) == (0.4, 0.0, 1)
    assert (a.recompute_logprob, a.use_decoupled_loss, a.behav_imp_weight_cap) == (True, True, 5.0)
    assert (a.reward_scaling, a.reward_bias) == (10.0, -0.5)
    assert (a.reward_norm.mean_level, a.reward_norm.std_level, a.reward_norm.std_unbiased) == ("group", "group", True)
    assert (a.adv_norm.mean_level, a.adv_norm.std_level) == ("batch", "batch")
    assert (a.lora_rank, a.lora_alpha) == (32, 16)
    o = a.optimizer
    assert (o.lr, o.betas, o.weight_decay, o.grad_clip, o.lr_scheduler_type) == (3e-5, (0.9, 0.999), 0.01, 1.0,
                                                                                  "constant")
    assert config.rollout.max_head_offpolicyness == 4


def test_example_names_resolve_to_the_gsm8k_task():
    config, _ = load_config(EXAMPLE)
    assert resolve_dataset_factory(config.dataset.name) is make_dataset
    assert resolve_reward(config.reward.name) is reward


def test_example_dataset_and_reward_build_from_its_options(overrides, servable_tiny_qwen2):
    config, errors = load_config(EXAMPLE, overrides)
    assert errors == []
    assert config.dataset.options["tokenizer_path"] == servable_tiny_qwen2
    dataset = get_dataset(config.dataset.name, config.dataset.options)
    score = get_reward(config.reward.name, config.reward.options)
    assert len(dataset) == 12 and len(dataset.eval_records()) == 3
    record = dataset.train_batch(0, 1)[0]
    # The tiny tokenizer spells digits only: the last-number fallback reads a bare answer.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(servable_tiny_qwen2)
    right = tokenizer(record["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    wrong = tokenizer(str(int(record["answer"]) + 1), add_special_tokens=False)["input_ids"]
    assert (score(record, right), score(record, wrong)) == (1.0, 0.0)


def test_example_passes_every_rule_but_the_pair_readiness(overrides):
    """The checks `areal check` runs, each plugin's own included, without the support-matrix gate
    (which hides the plugins' checks while a plugin still declares itself not ready)."""
    from areal_core.registry import default_registry
    from areal_core.validation import check_model_dir, check_tasks, check_values

    config, errors = load_config(EXAMPLE, overrides)
    errors += check_values(config) + check_model_dir(config) + check_tasks(config)
    registry = default_registry()
    for backend in (config.actor.backend, config.rollout.backend):
        errors += registry.manager.hook.areal_validate_config(backend=backend, config=config) or []
    assert errors == []


def test_areal_check_on_the_example_exits_0(overrides):
    result = subprocess.run([sys.executable, "-m", "areal_core.cli", "check", str(EXAMPLE), *overrides],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "areal check: ok: fsdp2 x vllm" in result.stdout


def test_areal_check_names_a_bad_dataset_name(overrides):
    result = subprocess.run([sys.executable, "-m", "areal_core.cli", "check", str(EXAMPLE), *overrides,
                             "dataset.name=gsm9k", "reward.name=gsm8k_reward"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "dataset.name: unknown dataset 'gsm9k'" in result.stderr
    assert "reward.name: unknown reward 'gsm8k_reward'" in result.stderr
