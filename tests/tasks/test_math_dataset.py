"""The math dataset: local JSON Lines and Parquet files with configurable columns (MATH's
problem/solution with the answer in the solution's last \\boxed{}, DAPO-Math's prompt/answer),
the stream and split it shares with gsm8k, and errors that name the file, column or option and
the fix."""

from __future__ import annotations

import pytest

from areal_core.tasks import TaskResolutionError, get_dataset
from areal_core.tasks.data_files import TaskDataError
from areal_core.tasks.math import DEFAULT_PROMPT_TEMPLATE

from .gsm8k_files import write_jsonl, write_parquet
from .math_files import dapo_rows, math_rows


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("math")
    return {
        "train": write_jsonl(directory / "train.jsonl", math_rows(20)),
        "test": write_jsonl(directory / "test.jsonl", math_rows(4, start=100)),
        "parquet": write_parquet(directory / "train.parquet", math_rows(20)),
        "dapo": write_parquet(directory / "dapo.parquet", dapo_rows(10)),
    }


@pytest.fixture(scope="module")
def tokenizer(text_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(text_tokenizer_dir)


def build(files, tokenizer_dir, **options):
    options = {"path": files["train"], "eval_path": files["test"], "tokenizer_path": tokenizer_dir, **options}
    return get_dataset("math", options)


def test_math_rows_give_the_last_boxed_answer(files, text_tokenizer_dir, tokenizer):
    dataset = build(files, text_tokenizer_dir)
    record = dataset.eval_records()[0]
    row = math_rows(1, start=100)[0]
    assert record["problem"] == row["problem"] and record["solution"] == row["solution"]
    assert record["answer"] == "\\frac{101}{2}" and record["row"] == 0
    assert record["tokenizer_path"] == text_tokenizer_dir
    assert record["prompt_ids"][0] == tokenizer.bos_token_id
    assert tokenizer.decode(record["prompt_ids"][1:]) == DEFAULT_PROMPT_TEMPLATE.format(problem=row["problem"])
    assert "\\boxed{}" in tokenizer.decode(record["prompt_ids"])  # the default asks for a boxed answer


def test_dapo_columns_and_numeric_answers(files, text_tokenizer_dir):
    dataset = build(files, text_tokenizer_dir, path=files["dapo"], eval_path="", held_out=2,
                    problem_column="prompt", answer_column="answer")
    records = dataset.train_batch(0, len(dataset)) + dataset.eval_records()
    assert len(dataset) == 8 and len(dataset.eval_records()) == 2
    assert sorted((r["problem"], r["answer"]) for r in records) == sorted(
        (f"Compute {i} * 3.", str(i * 3)) for i in range(10))


def test_parquet_reads_like_jsonl(files, text_tokenizer_dir):
    assert build(files, text_tokenizer_dir, path=files["parquet"]).train_batch(0, 20) == build(
        files, text_tokenizer_dir).train_batch(0, 20)


def test_stream_and_split_are_gsm8ks(files, text_tokenizer_dir):
    """The shared stream: seeded, resumable by position, every row once an epoch."""
    dataset = build(files, text_tokenizer_dir, seed=5)
    whole = dataset.train_batch(0, 50)
    assert build(files, text_tokenizer_dir, seed=5).train_batch(0, 50) == whole
    assert dataset.train_batch(0, 13) + dataset.train_batch(13, 37) == whole
    assert sorted(r["problem"] for r in whole[:20]) == sorted(r["problem"] for r in math_rows(20))
    held = build(files, text_tokenizer_dir, eval_path="", held_out=3)
    assert not {r["problem"] for r in held.eval_records()} & {r["problem"] for r in held.train_batch(0, 17)}


def test_templates(files, chat_tokenizer_dir, tokenizer):
    problem = math_rows(1, start=100)[0]["problem"]
    chat = build(files, chat_tokenizer_dir, prompt_template="Problem: {problem}").eval_records()[0]
    assert tokenizer.decode(chat["prompt_ids"][1:]) == f"<|user|>\nProblem: {problem}\n<|assistant|>\n"
    plain = build(files, chat_tokenizer_dir, prompt_template="{problem}", use_chat_template=False).eval_records()[0]
    assert tokenizer.decode(plain["prompt_ids"][1:]) == problem


def test_max_prompt_tokens(files, text_tokenizer_dir):
    lengths = sorted(len(r["prompt_ids"]) for r in build(files, text_tokenizer_dir).train_batch(0, 20))
    dataset = build(files, text_tokenizer_dir, max_prompt_tokens=lengths[9], eval_path=files["train"])
    assert len(dataset) == 10 and dataset.dropped == {"train": 10, "eval": 10}


# --- bad input: what is wrong and how to fix it, before any tokenizer or model is loaded --------


def test_missing_file(files, tmp_path):
    missing = str(tmp_path / "nowhere.jsonl")
    with pytest.raises(TaskDataError) as error:
        build(files, str(tmp_path / "no-model"), path=missing)  # the file is checked before the tokenizer
    assert missing in str(error.value) and "dataset.options.path" in str(error.value)
    with pytest.raises(TaskDataError, match="the math dataset needs dataset.options.path"):
        build(files, "", path="")


def test_missing_column_names_the_options_that_fix_it(files, text_tokenizer_dir, tmp_path):
    with pytest.raises(TaskDataError) as error:
        build(files, text_tokenizer_dir, path=files["dapo"])
    message = str(error.value)
    assert "has no 'problem' field" in message and "its fields: prompt, solution, answer" in message
    assert "dataset.options.problem_column" in message and "DAPO-Math: prompt/answer" in message
    with pytest.raises(TaskDataError, match="has no 'final' field"):
        build(files, text_tokenizer_dir, answer_column="final")


def test_empty_file(files, text_tokenizer_dir, tmp_path):
    path = write_parquet(tmp_path / "empty.parquet", [])
    with pytest.raises(TaskDataError, match="empty.parquet"):
        build(files, text_tokenizer_dir, path=path)
    empty_jsonl = tmp_path / "empty.jsonl"
    empty_jsonl.write_text("")
    with pytest.raises(TaskDataError, match="empty.jsonl"):
        build(files, text_tokenizer_dir, path=str(empty_jsonl))


def test_bad_rows_are_listed(files, text_tokenizer_dir, tmp_path):
    rows = math_rows(4)
    rows[1]["solution"] = "So the answer is \\boxed{\\frac{1}{2}"
    rows[2]["solution"] = "  "
    rows[3]["problem"] = ""
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(TaskDataError) as error:
        build(files, text_tokenizer_dir, path=path)
    message = str(error.value)
    assert path in message and "3 bad row(s)" in message
    assert "row 1: its \\boxed{ is never closed" in message
    assert "row 2: the reference answer is empty" in message and "row 3: empty or non-text 'problem'" in message


@pytest.mark.parametrize("options, message", [
    ({"prompt_template": "Solve: {question}"}, "must be a text containing {problem}"),
    ({"prompt_template": "{problem} in {unit}"}, "does not format with {problem} alone"),
    ({"problem_column": ""}, "problem_column must be a column name"),
    ({"answer_column": 3}, "answer_column must be a column name"),
    ({"eval_path": ""}, "exactly one eval split"),
    ({"max_prompt_tokens": -1}, "max_prompt_tokens must be an integer >= 0"),
])
def test_bad_options(files, tmp_path, options, message):
    with pytest.raises(TaskDataError, match=message.replace("{", r"\{").replace("}", r"\}")):
        build(files, str(tmp_path / "no-model"), **options)  # refused before the tokenizer is looked at


def test_unknown_option_lists_the_options(files, text_tokenizer_dir):
    with pytest.raises(TaskResolutionError, match="problem_column, answer_column"):
        build(files, text_tokenizer_dir, question_column="q")
