"""examples/math_grpo_lora.yaml: shaped like the GSM8K example, valid for `areal check` with a
tiny local model and small MATH files, and its dataset and reward build from its own options."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import attrs
import pytest

from areal_core.config_loader import load_config
from areal_core.tasks import get_dataset, get_reward, resolve_dataset_factory, resolve_reward
from areal_core.tasks.math import make_dataset, reward

from .gsm8k_files import write_jsonl
from .math_files import math_rows

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
EXAMPLE = EXAMPLES / "math_grpo_lora.yaml"


@pytest.fixture(scope="module")
def overrides(tmp_path_factory, servable_tiny_qwen2):
    directory = tmp_path_factory.mktemp("math-example")
    train = write_jsonl(directory / "train.jsonl", math_rows(12))
    test = write_jsonl(directory / "test.jsonl", math_rows(3, start=50))
    return [f"actor.path={servable_tiny_qwen2}", f"dataset.options.path={train}",
            f"dataset.options.eval_path={test}"]


def test_example_is_the_gsm8k_example_with_the_math_task():
    config, errors = load_config(EXAMPLE)
    gsm8k, gsm8k_errors = load_config(EXAMPLES / "gsm8k_grpo_lora.yaml")
    assert errors == gsm8k_errors == []
    # the same model, LoRA, objective, server and schedule; longer completions and a smaller eval
    assert config.actor == gsm8k.actor
    assert config.rollout == attrs.evolve(gsm8k.rollout, max_model_len=config.rollout.max_model_len)
    assert config.gconfig == attrs.evolve(gsm8k.gconfig, max_new_tokens=config.gconfig.max_new_tokens,
                                          lora_name=config.gconfig.lora_name)
    assert config.train == attrs.evolve(gsm8k.train, eval_size=config.train.eval_size)
    assert (config.dataset.name, config.reward.name) == ("math", "math")
    options = config.dataset.options
    assert (options["path"], options["eval_path"]) == ("data/math/train.jsonl", "data/math/test.jsonl")
    assert (options["problem_column"], options["answer_column"]) == ("problem", "solution")  # MATH's
    assert options["tokenizer_path"] == config.reward.options["tokenizer_path"] == config.actor.path
    assert config.reward.options["mode"] == "boxed" and config.reward.options["timeout_seconds"] > 0
    assert options["max_prompt_tokens"] + config.gconfig.max_new_tokens <= config.rollout.max_model_len
    assert config.gconfig.lora_name == "math-lora"


def test_example_names_resolve_to_the_math_task():
    config, _ = load_config(EXAMPLE)
    assert resolve_dataset_factory(config.dataset.name) is make_dataset
    assert resolve_reward(config.reward.name) is reward


def test_example_dataset_and_reward_build_from_its_options(overrides, servable_tiny_qwen2):
    config, errors = load_config(EXAMPLE, overrides)
    assert errors == []
    dataset = get_dataset(config.dataset.name, config.dataset.options)
    assert len(dataset) == 12 and len(dataset.eval_records()) == 3
    record = dataset.eval_records()[0]
    assert record["answer"] == "\\frac{51}{2}"
    # The tiny tokenizer spells no backslash: a bare answer, graded in mode plain.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(servable_tiny_qwen2)
    options = {**config.reward.options, "mode": "plain"}
    score = get_reward(config.reward.name, options)
    record = {**record, "answer": "51"}
    right = tokenizer("51", add_special_tokens=False)["input_ids"]
    wrong = tokenizer("52", add_special_tokens=False)["input_ids"]
    assert (score(record, right), score(record, wrong)) == (1.0, 0.0)
    assert get_reward(config.reward.name, config.reward.options)(record, right) == 0.0  # boxed: no box, no answer


def test_areal_check_on_the_example_exits_0(overrides):
    result = subprocess.run([sys.executable, "-m", "areal_core.cli", "check", str(EXAMPLE), *overrides],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "areal check: ok: fsdp2 x vllm" in result.stdout
