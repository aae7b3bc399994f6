"""The arithmetic task's ``operation`` option: add (the default, unchanged) and sub, each with its
prompts, answers, reward, hard prompts and held-out split."""

from __future__ import annotations

import hashlib
import json

import pytest

from areal_core.tasks import arithmetic, get_dataset, get_reward
from areal_core.tasks.arithmetic import EOS_ID, encode, make_record, parse_answer, reward


def _fingerprint(records) -> str:
    return hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()[:16]


# Fingerprints of the addition task's records taken before the option existed.
@pytest.mark.parametrize("options,position,size,eval_hash,train_hash", [
    ({}, 0, 3000, "6a4eaaf3a55bec63", "2e2ff74150e32a40"),
    ({"seed": 7, "split_seed": 3, "held_out": 200}, 12345, 500, "51bd306e986659d9", "650c173ba30ab58c"),
])
def test_default_records_are_those_before_the_option(options, position, size, eval_hash, train_hash):
    for dataset in (arithmetic.make_dataset(**options), arithmetic.make_dataset(**options, operation="add")):
        assert _fingerprint(dataset.eval_records()) == eval_hash
        assert _fingerprint(dataset.train_batch(position, size)) == train_hash
    assert "operation" not in make_record(57, 68)
    assert arithmetic.operation_split("add", 3, 200) == arithmetic.split_pairs(3, 200)


def test_sub_prompts_and_answers_match_the_tokenizer(tmp_path):
    from areal_core.testing.tiny_models import build_tokenizer

    tokenizer = build_tokenizer(tmp_path)
    for a, b, answer in ((57, 12, "45"), (3, 57, "-54"), (52, 37, "15"), (0, 0, "0"), (0, 99, "-99")):
        record = make_record(a, b, "sub")
        assert record["text"] == f"{a}-{b}=" and record["operation"] == "sub"
        assert record["prompt_ids"] == tokenizer(f"<bos>{a}-{b}=").input_ids
        assert record["answer"] == a - b
        assert record["answer_ids"] == tokenizer(answer).input_ids + [EOS_ID]
        assert len(record["answer_ids"]) <= arithmetic.MAX_ANSWER_TOKENS


def test_sub_reward_takes_a_sign_and_add_does_not():
    assert reward(make_record(3, 57, "sub"), encode("-54") + [EOS_ID]) == 1.0
    assert reward(make_record(3, 57, "sub"), encode("54") + [EOS_ID]) == 0.0  # the sign forgotten
    assert reward(make_record(57, 3, "sub"), encode("54") + [EOS_ID]) == 1.0
    assert reward(make_record(57, 3, "sub"), encode("-54") + [EOS_ID]) == 0.0
    assert reward(make_record(52, 37, "sub"), encode("25") + [EOS_ID]) == 0.0  # the borrow forgotten
    assert reward(make_record(5, 5, "sub"), encode("0") + [EOS_ID]) == 1.0
    assert reward(make_record(5, 5, "sub"), encode("-0") + [EOS_ID]) == 0.0
    assert reward(make_record(3, 57, "sub"), encode("-54")) == 0.0  # no eos
    assert reward(make_record(3, 57, "sub"), encode("--54") + [EOS_ID]) == 0.0
    assert reward(make_record(3, 57, "sub"), encode("-") + [EOS_ID]) == 0.0
    # add: a sign is never an answer (as before the option)
    assert parse_answer(encode("-5") + [EOS_ID]) is None
    assert parse_answer(encode("-5") + [EOS_ID], signed=True) == -5
    assert reward(make_record(0, 0), encode("-0") + [EOS_ID]) == 0.0


def test_reward_option_checks_the_records_operation():
    sub = get_reward("arithmetic", {"operation": "sub"})
    add = get_reward("arithmetic", {"operation": "add"})
    assert sub(make_record(3, 57, "sub"), encode("-54") + [EOS_ID]) == 1.0
    assert add(make_record(57, 68), encode("125") + [EOS_ID]) == 1.0
    assert get_reward("arithmetic")(make_record(3, 57, "sub"), encode("-54") + [EOS_ID]) == 1.0
    with pytest.raises(ValueError, match="reward.options.operation to the same"):
        sub(make_record(57, 68), encode("125") + [EOS_ID])
    with pytest.raises(ValueError, match="reward.options.operation to the same"):
        add(make_record(3, 57, "sub"), encode("-54") + [EOS_ID])
    with pytest.raises(ValueError, match="must be one of add, sub"):
        get_reward("arithmetic", {"operation": "mul"})


@pytest.mark.parametrize("operation", ["mul", "", None, 1])
def test_unknown_operation_is_refused_by_the_dataset(operation):
    with pytest.raises(ValueError, match="must be one of add, sub"):
        get_dataset("arithmetic", {"operation": operation})


def test_sub_split_is_its_own_disjoint_and_fixed():
    add = arithmetic.make_dataset()
    sub = arithmetic.make_dataset(operation="sub")
    train, held_out = arithmetic.operation_split("sub")
    assert sub.eval_pairs == held_out and sub.train_pairs == train
    assert len(held_out) == arithmetic.DEFAULT_HELD_OUT
    assert not set(train) & set(held_out)
    assert len(set(train) | set(held_out)) == arithmetic.NUM_PAIRS
    assert set(held_out) != set(add.eval_pairs)  # a held-out split of its own
    assert arithmetic.make_dataset(seed=9, operation="sub").eval_records() == sub.eval_records()
    assert arithmetic.operation_split("sub", 1)[1] != held_out
    stream = sub.train_batch(0, 2 * len(sub))
    assert all(r["operation"] == "sub" and (r["a"], r["b"]) not in set(held_out) for r in stream)
    assert [r["position"] for r in sub.train_batch(17, 3)] == [17, 18, 19]


def test_hard_prompts_and_their_bugs():
    assert arithmetic.is_hard(57, 68, "add") and arithmetic.buggy_answer(57, 68, "add") == 15
    assert not arithmetic.is_hard(12, 34, "add") and arithmetic.buggy_answer(12, 34, "add") == 46
    assert arithmetic.is_hard(52, 37, "sub") and arithmetic.buggy_answer(52, 37, "sub") == 25
    assert arithmetic.is_hard(3, 57, "sub") and arithmetic.buggy_answer(3, 57, "sub") == 54
    assert arithmetic.is_hard(37, 52, "sub") and arithmetic.buggy_answer(37, 52, "sub") == 25
    assert not arithmetic.is_hard(57, 12, "sub") and arithmetic.buggy_answer(57, 12, "sub") == 45
    for operation in arithmetic.OPERATIONS:
        train, _ = arithmetic.operation_split(operation)
        for a, b in train[:2000]:
            right = arithmetic.apply(a, b, operation)
            buggy = arithmetic.buggy_answer(a, b, operation)
            assert (buggy != right) == arithmetic.is_hard(a, b, operation), (operation, a, b)
            assert 0 <= buggy <= 99 and len(arithmetic.answer_ids(right)) <= arithmetic.MAX_ANSWER_TOKENS
        share = sum(arithmetic.is_hard(a, b, operation) for a, b in train) / len(train)
        assert 0.6 < share < 0.8, (operation, share)
