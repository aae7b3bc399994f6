"""The arithmetic reward: 1.0 only for the right digits followed at once by eos."""

from __future__ import annotations

import pytest

from areal_core.tasks.arithmetic import answer_ids, encode, make_record, parse_answer, reward
from areal_core.testing.tiny_models import BOS_ID, EOS_ID, PAD_ID

RECORD = make_record(57, 68)  # 125; forgetting the carries gives 15


def test_right_answer_then_eos_earns_one():
    assert reward(RECORD, encode("125") + [EOS_ID]) == 1.0
    assert reward(make_record(0, 0), encode("0") + [EOS_ID]) == 1.0
    assert reward(make_record(99, 99), answer_ids(198)) == 1.0


@pytest.mark.parametrize(
    "completion",
    [
        encode("15") + [EOS_ID],  # the carry bug
        encode("124") + [EOS_ID],  # off by one
        encode("1250") + [EOS_ID],  # extra digit
        encode("12") + [EOS_ID],  # a prefix of the answer
    ],
    ids=["carry-bug", "off-by-one", "extra-digit", "prefix"],
)
def test_wrong_number_earns_zero(completion):
    assert reward(RECORD, completion) == 0.0


def test_missing_eos_earns_zero():
    assert reward(RECORD, encode("125")) == 0.0
    assert reward(RECORD, encode("125") + [PAD_ID]) == 0.0


@pytest.mark.parametrize(
    "completion",
    [
        [],
        [EOS_ID],
        encode("1+25") + [EOS_ID],
        encode(" 125") + [EOS_ID],
        [BOS_ID] + encode("125") + [EOS_ID],
        encode("12") + [PAD_ID] + encode("5") + [EOS_ID],
    ],
    ids=["empty", "eos-only", "plus-inside", "leading-space", "bos", "pad-inside"],
)
def test_garbage_earns_zero(completion):
    assert reward(RECORD, completion) == 0.0


def test_tokens_after_the_first_eos_are_ignored():
    assert reward(RECORD, encode("125") + [EOS_ID, PAD_ID, PAD_ID]) == 1.0
    assert reward(RECORD, encode("15") + [EOS_ID] + encode("125") + [EOS_ID]) == 0.0


def test_reward_reads_the_records_answer_and_accepts_any_sequence():
    assert reward({"answer": 7}, tuple(encode("7") + [EOS_ID])) == 1.0
    assert parse_answer(encode("042") + [EOS_ID]) == 42
    assert parse_answer(encode("42")) is None
