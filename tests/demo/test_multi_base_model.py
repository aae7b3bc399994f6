"""The multi-task base model's recipe: its own hash and cache beside the demo's, its mixed and
deliberately bugged batches, and a tiny build."""

from __future__ import annotations

import random

import attrs
import pytest

from areal_core.demo import base_model, multi_base_model
from areal_core.demo.base_model import DEFAULT_RECIPE, read_marker
from areal_core.demo.multi_base_model import (
    DEFAULT_MULTI_RECIPE,
    MultiTaskRecipe,
    build_multi_base_model,
)
from areal_core.tasks import arithmetic

VOCABULARY = arithmetic.SPECIAL_TOKENS + arithmetic.ARITHMETIC_SYMBOLS
SMALL = MultiTaskRecipe(
    hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
    steps=3, batch_size=8, warmup_steps=1, held_out=50,
)


def test_make_demos_recipe_keeps_its_hash():
    # `make demo`'s cached base (.cache/demo-base) is keyed by this: it must not move.
    assert DEFAULT_RECIPE.digest() == "90021775c0be6c6f"


def test_multi_recipe_hash_is_its_own():
    assert DEFAULT_MULTI_RECIPE.digest() != DEFAULT_RECIPE.digest()
    assert DEFAULT_MULTI_RECIPE.digest() == MultiTaskRecipe().digest()
    digests = {DEFAULT_MULTI_RECIPE.digest()}
    for change in ({"bug_rates": (0.6, 0.5)}, {"operations": ("sub", "add")}, {"steps": 10},
                   {"num_threads": 2}, {"operations": ("add",), "bug_rates": (0.6,), "operation_weights": (1,)},
                   {"operation_weights": (1.0, 1.0)}):
        digests.add(attrs.evolve(DEFAULT_MULTI_RECIPE, **change).digest())
    assert len(digests) == 7
    assert DEFAULT_MULTI_RECIPE.operations == ("add", "sub")
    assert MultiTaskRecipe(operations=["add", "sub"], bug_rates=[0.6, 0.6]) == DEFAULT_MULTI_RECIPE


@pytest.mark.parametrize("fields,match", [
    ({"operations": ("add", "mul"), "bug_rates": (0.6, 0.6)}, "must be one of add, sub"),
    ({"operations": ("add", "add")}, "listed twice"),
    ({"bug_rates": (0.6,)}, "one rate per operation"),
    ({"bug_rates": (0.6, 1.5)}, "between 0 and 1"),
    ({"operations": (), "bug_rates": (), "operation_weights": ()}, "at least one operation"),
    ({"operation_weights": (1.0,)}, "one positive weight per operation"),
    ({"operation_weights": (1.0, 0.0)}, "one positive weight per operation"),
])
def test_bad_recipes_are_refused(fields, match):
    with pytest.raises(ValueError, match=match):
        MultiTaskRecipe(**fields)


def test_batches_mix_the_tasks_bug_only_hard_prompts_and_skip_held_out_pairs():
    recipe = attrs.evolve(DEFAULT_MULTI_RECIPE, batch_size=512, bug_rates=(1.0, 0.0))
    train = {op: arithmetic.operation_split(op)[0] for op in recipe.operations}
    held_out = {op: set(arithmetic.operation_split(op)[1]) for op in recipe.operations}
    input_ids, labels = multi_base_model._training_batch(recipe, train, random.Random(0))
    seen = {"add": 0, "sub": 0}
    symbol_of = {arithmetic.TOKEN_IDS[s]: op for op, s in arithmetic.OPERATIONS.items()}
    for row, label_row in zip(input_ids.tolist(), labels.tolist()):
        start = next(i for i, x in enumerate(label_row) if x != -100)
        prompt, answer = row[:start], [x for x in label_row[start:] if x != -100]
        operation = next(symbol_of[t] for t in prompt if t in symbol_of)
        text = "".join(VOCABULARY[t] for t in prompt[1:-1])  # between the bos and the "="
        a, b = map(int, text.split(arithmetic.OPERATIONS[operation]))
        assert prompt == arithmetic.prompt_ids(a, b, operation)
        assert (a, b) not in held_out[operation]
        expected = (arithmetic.buggy_answer(a, b, operation) if operation == "add"
                    else arithmetic.apply(a, b, operation))  # add: every hard label bugged; sub: none
        assert answer == arithmetic.answer_ids(expected)
        seen[operation] += 1
    # operation_weights (1, 2): sub's share is 2/3, give or take 0.021 (one sd of 512 draws)
    assert recipe.operation_weights == (1.0, 2.0) and abs(seen["sub"] / 512 - 2 / 3) < 0.07, seen


@pytest.mark.slow
def test_tiny_build_has_its_marker_and_per_task_metrics(tmp_path, monkeypatch):
    out = build_multi_base_model(tmp_path / "base", SMALL)
    marker = read_marker(out)
    assert marker["hash"] == SMALL.digest()
    assert marker["recipe"]["operations"] == ["add", "sub"]
    for key in ("add_eval_accuracy_greedy", "sub_eval_accuracy_greedy", "sub_hard_accuracy_sampled",
                "eval_accuracy_greedy", "eval_accuracy_sampled"):
        assert 0.0 <= marker["metrics"][key] <= 1.0, key
    assert multi_base_model.is_built(out, SMALL)
    assert not base_model.is_built(out)  # never taken for `make demo`'s base
    monkeypatch.setattr(multi_base_model, "train_multi_base_model",
                        lambda *a, **k: pytest.fail("rebuilt a cached recipe"))
    assert build_multi_base_model(out, SMALL) == out
