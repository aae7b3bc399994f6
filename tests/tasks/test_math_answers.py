"""The math reward against the real math-verify, beside the gsm8k reward: the table of tricky
answers (math_answer_table.py, shown in docs/math.md) graded for real, in both modes, through a
real tokenizer; and the grading off the main thread, where math-verify's own timeout cannot run."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from areal_core.tasks import get_reward, reward_metrics
from areal_core.tasks.math import MathReward
from areal_core.tasks.math_grading import boxed_contents, last_boxed

from .math_answer_table import TABLE, markdown_rows

DOCS = Path(__file__).resolve().parents[2] / "docs" / "math.md"


@pytest.fixture(scope="module")
def tokenizer(text_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(text_tokenizer_dir)


@pytest.fixture(scope="module")
def math_reward():
    """One reward object for the module: its grading process starts once."""
    reward = MathReward()
    yield reward
    reward.close()


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


@pytest.mark.parametrize("shows, math_ref, gsm8k_ref, completion, boxed, plain, gsm8k", TABLE,
                         ids=[row[0] for row in TABLE])
def test_the_table_of_tricky_answers(math_reward, tokenizer, text_tokenizer_dir, shows, math_ref, gsm8k_ref,
                                     completion, boxed, plain, gsm8k):
    ids = encode(tokenizer, completion)
    math_record = {"answer": math_ref, "tokenizer_path": text_tokenizer_dir}
    assert math_reward(math_record, ids, mode="boxed") == boxed
    assert math_reward(math_record, ids, mode="plain") == plain
    assert get_reward("gsm8k")({"answer": gsm8k_ref, "tokenizer_path": text_tokenizer_dir}, ids) == gsm8k
    assert math_reward.drain_metrics() == {"reward_grader_timeouts": 0, "reward_grader_errors": 0}


def test_docs_show_the_same_table():
    text = DOCS.read_text()
    missing = [row for row in markdown_rows() if row not in text]
    assert not missing, "docs/math.md lacks these rows of tests/tasks/math_answer_table.py:\n" + "\n".join(missing)


def test_the_built_in_name_grades_and_reports_its_counts(tokenizer, text_tokenizer_dir):
    reward = get_reward("math", {"mode": "boxed"})
    record = {"answer": "\\frac{3}{4}", "tokenizer_path": text_tokenizer_dir}
    assert reward(record, encode(tokenizer, "So \\boxed{0.75}")) == 1.0
    assert reward(record, encode(tokenizer, "So \\boxed{0.7}")) == 0.0
    assert reward_metrics(reward) == {"reward_grader_timeouts": 0, "reward_grader_errors": 0}
    assert reward_metrics(get_reward("gsm8k")) == {}  # a reward without counts reports none


def test_text_after_eos_is_not_graded(math_reward, tokenizer, text_tokenizer_dir):
    record = {"answer": "3", "tokenizer_path": text_tokenizer_dir}
    ids = encode(tokenizer, "\\boxed{3}") + encode(tokenizer, "\\boxed{4}")
    assert math_reward(record, ids) == 1.0


def test_grading_runs_off_the_main_thread(math_reward, tokenizer, text_tokenizer_dir):
    """The rollout thread calls the reward: math-verify's SIGALRM timeout refuses to run there,
    the grading process does not need it."""
    import math_verify

    failures = []
    scores = []

    def with_math_verify_timeout():
        try:
            math_verify.parse("\\boxed{1}", parsing_timeout=5, raise_on_error=True)
        except ValueError as exc:
            failures.append(str(exc))

    def with_the_reward():
        record = {"answer": "12", "tokenizer_path": text_tokenizer_dir}
        scores.append(math_reward(record, encode(tokenizer, "\\boxed{12}")))

    for target in (with_math_verify_timeout, with_the_reward):
        thread = threading.Thread(target=target)
        thread.start()
        thread.join()
    assert failures and "signal" in failures[0].lower()
    assert scores == [1.0]


@pytest.mark.parametrize("text, contents", [
    ("\\boxed{\\frac{1}{2}}", ["\\frac{1}{2}"]),
    ("\\boxed{1} and \\fbox{2} and \\boxed {3}", ["1", "2", "3"]),
    ("\\boxed{1} then \\boxed{2", ["1"]),
    ("\\boxed 5", []),
    ("no box", []),
])
def test_boxed_contents(text, contents):
    assert boxed_contents(text) == contents
    assert last_boxed(text) == (contents[-1] if contents else None)
