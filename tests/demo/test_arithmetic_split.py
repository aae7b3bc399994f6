"""The arithmetic task's prompts and its fixed held-out split."""

from __future__ import annotations

import pytest

from areal_core.tasks import arithmetic
from areal_core.tasks.arithmetic import ArithmeticDataset, split_pairs


def test_held_out_pairs_are_never_in_the_train_split():
    train, held_out = split_pairs()
    assert len(held_out) == 500
    assert len(train) + len(held_out) == 100 * 100
    assert not set(train) & set(held_out)
    assert set(train) | set(held_out) == {(a, b) for a in range(100) for b in range(100)}


def test_a_whole_epoch_and_more_of_the_train_stream_avoids_the_held_out_pairs():
    dataset = ArithmeticDataset(seed=3)
    held_out = set(dataset.eval_pairs)
    seen = [(r["a"], r["b"]) for r in dataset.train_batch(0, len(dataset) + 50)]
    assert not set(seen) & held_out
    assert set(seen[: len(dataset)]) == set(dataset.train_pairs)  # an epoch visits each pair once


def test_split_is_deterministic_and_independent_of_the_training_seed():
    first, second, other_seed = ArithmeticDataset(seed=1), ArithmeticDataset(seed=1), ArithmeticDataset(seed=2)
    assert first.eval_records() == second.eval_records() == other_seed.eval_records()
    assert first.train_batch(0, 64) == second.train_batch(0, 64)
    assert first.train_batch(0, 64) != other_seed.train_batch(0, 64)


def test_split_seed_and_held_out_change_the_split():
    assert split_pairs(split_seed=0)[1] != split_pairs(split_seed=1)[1]
    assert len(ArithmeticDataset(held_out=100).eval_records()) == 100
    assert len(ArithmeticDataset().eval_records(limit=20)) == 20


@pytest.mark.parametrize("held_out", [0, -1, 10_000])
def test_impossible_held_out_size_is_refused(held_out):
    with pytest.raises(ValueError, match="held_out must be between 1 and 9999"):
        split_pairs(held_out=held_out)


def test_non_integer_options_are_refused():
    with pytest.raises(TypeError, match="seed must be an integer"):
        ArithmeticDataset(seed="1")


def test_records_hold_prompt_ids_and_answer():
    record = arithmetic.make_record(57, 68)
    assert record["answer"] == 125
    assert record["prompt_ids"] == arithmetic.prompt_ids(57, 68)
    assert record["text"] == "57+68="
    assert record["answer_ids"] == arithmetic.answer_ids(125)


def test_prompt_ids_are_those_of_the_demo_tokenizer(tmp_path):
    from areal_core.testing.tiny_models import build_tokenizer

    tokenizer = build_tokenizer(tmp_path)
    for a, b in [(0, 0), (7, 93), (57, 68), (99, 99)]:
        assert arithmetic.prompt_ids(a, b) == tokenizer(f"<bos>{a}+{b}=").input_ids
    assert tokenizer.decode(arithmetic.answer_ids(125)) == "125<eos>"
    assert tokenizer.convert_tokens_to_ids("<eos>") == arithmetic.answer_ids(1)[-1]


def test_carry_helpers():
    assert arithmetic.carry_forgotten_sum(57, 68) == 15
    assert arithmetic.carry_forgotten_sum(50, 50) == 0
    assert arithmetic.carry_forgotten_sum(12, 34) == 46
    assert arithmetic.needs_carry(5, 5) and arithmetic.needs_carry(50, 50)
    assert not arithmetic.needs_carry(12, 34)
    train, _ = split_pairs()
    share = sum(arithmetic.needs_carry(a, b) for a, b in train) / len(train)
    assert 0.65 < share < 0.75  # about 70% of prompts need a carry
