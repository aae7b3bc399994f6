"""The GSM8K dataset: local JSON Lines and Parquet files through `datasets`, prompts from the
model's tokenizer, a seeded resumable train stream, and errors that name the file and the fix."""

from __future__ import annotations

import json

import pytest

from areal_core.tasks import TaskResolutionError, get_dataset
from areal_core.tasks.gsm8k import DEFAULT_PROMPT_TEMPLATE, GSM8KDataError

from .gsm8k_files import gsm8k_rows, write_jsonl, write_parquet


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """train.jsonl (40 rows), test.jsonl (6 rows) and train.parquet (the same 40 rows)."""
    directory = tmp_path_factory.mktemp("gsm8k")
    return {
        "train": write_jsonl(directory / "train.jsonl", gsm8k_rows(40)),
        "test": write_jsonl(directory / "test.jsonl", gsm8k_rows(6, start=100)),
        "parquet": write_parquet(directory / "train.parquet", gsm8k_rows(40)),
    }


@pytest.fixture(scope="module")
def tokenizer(text_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(text_tokenizer_dir)


def build(files, tokenizer_dir, **options):
    options = {"path": files["train"], "eval_path": files["test"], "tokenizer_path": tokenizer_dir, **options}
    return get_dataset("gsm8k", options)


def questions(records):
    return [record["question"] for record in records]


def test_records_hold_prompt_ids_answer_and_solution(files, text_tokenizer_dir, tokenizer):
    dataset = build(files, text_tokenizer_dir)
    assert len(dataset) == 40
    record = dataset.eval_records()[0]
    row = gsm8k_rows(1, start=100)[0]
    assert record["question"] == row["question"] and record["solution"] == row["answer"]
    assert record["answer"] == "103" and record["row"] == 0
    assert record["tokenizer_path"] == text_tokenizer_dir
    assert record["prompt_ids"][0] == tokenizer.bos_token_id
    assert tokenizer.decode(record["prompt_ids"][1:]) == DEFAULT_PROMPT_TEMPLATE.format(question=row["question"])


def test_eval_split_is_the_eval_file_in_order(files, text_tokenizer_dir):
    dataset = build(files, text_tokenizer_dir)
    assert questions(dataset.eval_records()) == [r["question"] for r in gsm8k_rows(6, start=100)]
    assert questions(dataset.eval_records(limit=2)) == questions(dataset.eval_records())[:2]


def test_parquet_reads_like_jsonl(files, text_tokenizer_dir):
    from_jsonl = build(files, text_tokenizer_dir).train_batch(0, 40)
    from_parquet = build(files, text_tokenizer_dir, path=files["parquet"]).train_batch(0, 40)
    assert from_parquet == from_jsonl


def test_custom_template_and_chat_template(files, chat_tokenizer_dir, tokenizer):
    question = gsm8k_rows(1, start=100)[0]["question"]
    chat = build(files, chat_tokenizer_dir, prompt_template="Q: {question}\nA:").eval_records()[0]
    assert tokenizer.decode(chat["prompt_ids"][1:]) == f"<|user|>\nQ: {question}\nA:\n<|assistant|>\n"
    plain = build(files, chat_tokenizer_dir, prompt_template="Q: {question}\nA:",
                  use_chat_template=False).eval_records()[0]
    assert tokenizer.decode(plain["prompt_ids"][1:]) == f"Q: {question}\nA:"


def test_train_stream_is_seeded_and_resumable(files, text_tokenizer_dir):
    dataset = build(files, text_tokenizer_dir, seed=3)
    again = build(files, text_tokenizer_dir, seed=3)
    other = build(files, text_tokenizer_dir, seed=4)
    whole = dataset.train_batch(0, 100)
    assert again.train_batch(0, 100) == whole
    assert questions(other.train_batch(0, 40)) != questions(whole[:40])
    # Resuming at a position, even across an epoch boundary, continues the same stream.
    assert dataset.train_batch(0, 37) + dataset.train_batch(37, 63) == whole
    assert again.train_batch(55, 10) == whole[55:65]
    assert [record["position"] for record in whole] == list(range(100))
    # Each epoch is a permutation of every train row, and epochs differ in order.
    all_rows = sorted(r["question"] for r in gsm8k_rows(40))
    assert sorted(questions(whole[:40])) == all_rows == sorted(questions(whole[40:80]))
    assert questions(whole[:40]) != questions(whole[40:80])
    assert questions(whole[:40]) != [r["question"] for r in gsm8k_rows(40)]  # shuffled, not file order


def test_held_out_rows_never_train(files, text_tokenizer_dir):
    dataset = build(files, text_tokenizer_dir, eval_path="", held_out=5, split_seed=7)
    held = set(questions(dataset.eval_records()))
    trained = set(questions(dataset.train_batch(0, 35)))
    assert len(held) == 5 and len(dataset) == 35 and not held & trained
    assert held | trained == {r["question"] for r in gsm8k_rows(40)}
    same = build(files, text_tokenizer_dir, eval_path="", held_out=5, split_seed=7, seed=9)
    assert set(questions(same.eval_records())) == held  # the split depends on split_seed alone


def test_max_prompt_tokens_drops_longer_prompts(files, text_tokenizer_dir):
    options = {"prompt_template": "{question}", "eval_path": files["train"]}
    lengths = sorted(len(r["prompt_ids"]) for r in build(files, text_tokenizer_dir, **options).train_batch(0, 40))
    limit = lengths[0]  # the rows with a one-digit count of marbles: 0..9
    dataset = build(files, text_tokenizer_dir, max_prompt_tokens=limit, **options)
    kept = dataset.train_batch(0, len(dataset))
    assert len(dataset) == 10 and all(len(r["prompt_ids"]) <= limit for r in kept)
    assert dataset.dropped == {"train": 30, "eval": 30}
    assert {r["question"] for r in kept} == {r["question"] for r in gsm8k_rows(10)}
    with pytest.raises(GSM8KDataError, match="longer than max_prompt_tokens=3"):
        build(files, text_tokenizer_dir, max_prompt_tokens=3)


# --- bad input: errors naming the file or option, and the fix ----------------------------------


def test_missing_file_names_it_and_the_option(files, text_tokenizer_dir, tmp_path):
    missing = str(tmp_path / "no" / "train.jsonl")
    with pytest.raises(GSM8KDataError) as error:
        build(files, text_tokenizer_dir, path=missing)
    assert missing in str(error.value) and "dataset.options.path" in str(error.value)
    with pytest.raises(GSM8KDataError, match="dataset.options.eval_path"):
        build(files, text_tokenizer_dir, eval_path=missing)
    with pytest.raises(GSM8KDataError, match="needs dataset.options.path"):
        build(files, text_tokenizer_dir, path="")


def test_unknown_suffix_is_refused(files, text_tokenizer_dir, tmp_path):
    csv = tmp_path / "train.csv"
    csv.write_text("question,answer\n")
    with pytest.raises(GSM8KDataError, match=r"suffix '\.csv'; use one of \.jsonl, \.json, \.parquet"):
        build(files, text_tokenizer_dir, path=str(csv))


def test_missing_field_names_the_file_and_the_fields(files, text_tokenizer_dir, tmp_path):
    path = write_jsonl(tmp_path / "renamed.jsonl", [{"problem": "1+1?", "solution": "#### 2"}])
    with pytest.raises(GSM8KDataError) as error:
        build(files, text_tokenizer_dir, path=path)
    message = str(error.value)
    assert path in message and "'question'" in message and "'answer'" in message
    assert "problem, solution" in message  # what the file has instead


def test_answer_without_mark_names_the_rows(files, text_tokenizer_dir, tmp_path):
    rows = gsm8k_rows(4)
    rows[2]["answer"] = "Sam has 5 marbles."
    rows[3]["answer"] = "#### many"
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(GSM8KDataError) as error:
        build(files, text_tokenizer_dir, path=path)
    message = str(error.value)
    assert path in message and "2 bad row(s)" in message
    assert "row 2: the answer does not end in '#### N'" in message and "row 3: no number follows" in message


def test_malformed_json_names_the_file(files, text_tokenizer_dir, tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(gsm8k_rows(1)[0]) + "\n{\"question\": \"unterminated\n")
    with pytest.raises(GSM8KDataError, match="cannot read GSM8K file .*broken.jsonl.* as json"):
        build(files, text_tokenizer_dir, path=str(path))


def test_empty_file_is_refused(files, text_tokenizer_dir, tmp_path):
    path = write_parquet(tmp_path / "empty.parquet", [])
    with pytest.raises(GSM8KDataError, match="empty.parquet"):
        build(files, text_tokenizer_dir, path=path)


def test_tokenizer_path_is_required_and_checked(files, tmp_path):
    with pytest.raises(GSM8KDataError, match=r"needs tokenizer_path.*\$\{actor.path\}"):
        build(files, "")
    with pytest.raises(GSM8KDataError, match="is not a directory"):
        build(files, str(tmp_path / "no-model"))
    (tmp_path / "empty-model").mkdir()
    with pytest.raises(GSM8KDataError, match="cannot load a tokenizer from"):
        build(files, str(tmp_path / "empty-model"))


@pytest.mark.parametrize("options, message", [
    ({"eval_path": "", "held_out": 0}, "exactly one eval split"),
    ({"held_out": 2}, "exactly one eval split"),
    ({"eval_path": "", "held_out": 40}, "held_out=40 leaves no train rows"),
    ({"prompt_template": "Solve this."}, "must be a text containing {question}"),
    ({"prompt_template": "{question} in {unit}"}, "does not format with {question} alone"),
    ({"max_prompt_tokens": -1}, "max_prompt_tokens must be an integer >= 0"),
    ({"seed": "1"}, "seed must be an integer"),
    ({"use_chat_template": "yes"}, "use_chat_template must be true or false"),
])
def test_bad_options_are_refused(files, text_tokenizer_dir, options, message):
    with pytest.raises(GSM8KDataError, match=message.replace("{", r"\{").replace("}", r"\}")):
        build(files, text_tokenizer_dir, **options)


def test_unknown_option_is_refused_before_reading(files, text_tokenizer_dir):
    with pytest.raises(TaskResolutionError, match="its options are: path, tokenizer_path, eval_path"):
        build(files, text_tokenizer_dir, batch_size=8)
