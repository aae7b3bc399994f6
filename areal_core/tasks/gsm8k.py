"""GSM8K: grade-school maths word problems from a LOCAL file, and their exact-answer reward.

The file is the openai/gsm8k layout, one problem a row, as JSON Lines (``.jsonl``/``.json``) or
Parquet (``.parquet``), read with the ``datasets`` library (no hub access): ``question`` is the
problem, ``answer`` the worked solution ending in a line ``#### N`` whose N is the reference
answer.

Options of the dataset factory ``make_dataset`` (``dataset.options`` in the configuration, passed
as keyword arguments by the loop):

- ``path``: the train file; ``eval_path``: the held-out file (GSM8K's ``test`` split). Without
  ``eval_path``, ``held_out`` rows of the train file form the eval split instead.
- ``tokenizer_path``: the model directory whose tokenizer encodes the prompts; the example
  config sets it with ``${actor.path}`` so that it is always the trained model's own.
- ``prompt_template``: a ``str.format`` template with one field, ``{question}``; the default asks
  for the final answer on a ``#### N`` line. ``use_chat_template``: wrap it as a user message with
  the tokenizer's chat template when the tokenizer has one (instruct models), else plain text.
- ``max_prompt_tokens``: rows whose prompt is longer are dropped (0: keep every row).
- ``seed`` orders the train stream; ``split_seed`` picks the ``held_out`` rows.

The train split is an endless stream of epochs, each a permutation of the train rows drawn from
``seed`` and the epoch number, so record number ``position`` is a pure function of the options:
a run resumes its data by remembering one integer (as the arithmetic dataset does).

Each record holds ``prompt_ids``, ``question``, ``answer`` (the reference number as a string,
e.g. ``"72"`` or ``"3.5"``), ``solution`` (the file's answer text), ``row`` (0-based row in its
file) and ``tokenizer_path`` (so the reward can decode without options of its own).

The reward (``reward``) decodes a completion and extracts its final answer as GSM8K defines it:
the number after the last ``####``; when no number follows a ``####`` (or there is none), the
last number in the text, unless ``last_number_fallback=False`` (default on, as most GSM8K rewards
do, since a model that has not learned the format yet still earns signal). Numbers may carry
thousands commas (``1,234``), a sign (``-5``), decimals (``3.50`` equals ``3.5``), a ``$`` and a
trailing full stop. The comparison is numeric and exact (``decimal.Decimal``).

Nothing here imports torch; ``datasets`` and ``transformers`` are imported when first needed.
"""

from __future__ import annotations

import functools
import random
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Iterator, Sequence

from areal_core.errors import ArealError

DEFAULT_PROMPT_TEMPLATE = (
    "{question}\n"
    "Solve the problem step by step. Then write the final answer, a number alone, "
    "on the last line after '####', like this: #### 42"
)
FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
REQUIRED_FIELDS = ("question", "answer")
ANSWER_MARK = "####"
#: How many bad rows an error lists before it says "and N more".
MAX_LISTED_ROWS = 5

# A number as written in maths prose: an optional sign (before or after a '$'), digits with
# thousands commas or without, an optional decimal part. The look-behind keeps the tail of a word
# or of another number ("x2", "1.5.3") and the minus of a range ("10-3") from starting one; a full
# stop with no digit after it (end of sentence) is not part of the number.
_NUMBER = re.compile(
    r"(?<![\w.])"
    r"(?P<sign>[-+\u2212]?)\$?(?P<sign_after_dollar>[-\u2212]?)"
    r"(?P<body>(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)"
)


class GSM8KDataError(ArealError, ValueError):
    """A GSM8K file that is missing, unreadable, or not in the question/answer layout."""


# --- answers --------------------------------------------------------------------------------------


def numbers_in(text: str) -> list[Decimal]:
    """Every number written in ``text``, in order (``"$1,234.50 and -3."`` -> 1234.50, -3)."""
    found = []
    for match in _NUMBER.finditer(text):
        negative = (match["sign"] or match["sign_after_dollar"]) in ("-", "\u2212")
        try:
            value = Decimal(match["body"].replace(",", ""))
        except InvalidOperation:  # the pattern admits only decimal literals; kept for safety
            continue
        found.append(-value if negative else value)
    return found


def extract_answer(text: str, last_number_fallback: bool = True) -> Decimal | None:
    """The final answer ``text`` states, or None when it states none.

    The first number after the last ``####``; without one, the last number anywhere in ``text``
    when ``last_number_fallback`` is true (else None).
    """
    if ANSWER_MARK in text:
        after_mark = numbers_in(text.rsplit(ANSWER_MARK, 1)[1])
        if after_mark:
            return after_mark[0]
    if last_number_fallback:
        everywhere = numbers_in(text)
        return everywhere[-1] if everywhere else None
    return None


def reference_answer(solution: str) -> Decimal:
    """The number after ``####`` in a GSM8K answer field; ValueError when it has none."""
    if not isinstance(solution, str) or ANSWER_MARK not in solution:
        raise ValueError(f"the answer does not end in '{ANSWER_MARK} N'")
    value = extract_answer(solution, last_number_fallback=False)
    if value is None:
        raise ValueError(f"no number follows '{ANSWER_MARK}'")
    return value


def format_number(value: Decimal) -> str:
    """``value`` without trailing zeros or exponent: 72, 3.5, -0.25."""
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "+0") else text


# --- the file ---------------------------------------------------------------------------------------


def _file_format(path: Path, option: str) -> str:
    if not path.is_file():
        where = "a directory, not a file" if path.is_dir() else "not found"
        raise GSM8KDataError(
            f"GSM8K file {str(path)!r} ({option}) is {where}; give a local .jsonl or .parquet file "
            f"whose rows have 'question' and 'answer' fields (e.g. data/gsm8k/train.jsonl), "
            f"set with dataset.options.{option}"
        )
    fmt = FILE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise GSM8KDataError(
            f"GSM8K file {str(path)!r} ({option}) has the suffix {path.suffix!r}; "
            f"use one of {', '.join(FILE_FORMATS)} (JSON Lines or Parquet)"
        )
    return fmt


def _listed(problems: list[str]) -> str:
    extra = len(problems) - MAX_LISTED_ROWS
    return "; ".join(problems[:MAX_LISTED_ROWS]) + (f"; and {extra} more" if extra > 0 else "")


def read_rows(path: str, option: str = "path") -> list[dict]:
    """The rows of a local GSM8K file as ``{"question", "solution", "answer", "row"}`` dicts.

    ``answer`` is the reference number as a string (``format_number``); ``row`` the 0-based row
    number in the file. ``option`` names the configuration option that gave ``path`` (errors name
    it). Raises ``GSM8KDataError`` naming the file and the fix when the file is missing, of
    another format, unreadable, empty, lacks a field, or has answers without ``#### N``.
    """
    if not isinstance(path, str) or not path:
        raise GSM8KDataError(
            f"the gsm8k dataset needs dataset.options.{option}: the local GSM8K file "
            f"(.jsonl or .parquet, e.g. data/gsm8k/train.jsonl); got {path!r}"
        )
    file = Path(path)
    fmt = _file_format(file, option)
    import datasets

    datasets.disable_progress_bars()  # one bar per rank and split only clutters the run's log
    try:
        table = datasets.load_dataset(fmt, data_files=str(file.absolute()), split="train")
    except Exception as exc:  # datasets/pyarrow raise many kinds; the file is what is wrong
        raise GSM8KDataError(
            f"cannot read GSM8K file {str(file)!r} ({option}) as {fmt}: {type(exc).__name__}: {exc}; "
            f"a .jsonl file holds one JSON object per line, a .parquet file one table"
        ) from exc
    missing = [field for field in REQUIRED_FIELDS if field not in table.column_names]
    if missing:
        raise GSM8KDataError(
            f"GSM8K file {str(file)!r} ({option}) has no {' and no '.join(repr(m) for m in missing)} "
            f"field (its fields: {', '.join(table.column_names) or 'none'}); every row needs "
            f"'question' (the problem) and 'answer' (the solution ending in '#### N'), as in openai/gsm8k"
        )
    if table.num_rows == 0:
        raise GSM8KDataError(f"GSM8K file {str(file)!r} ({option}) has no rows; give a file with problems in it")
    rows, problems = [], []
    for index, (question, solution) in enumerate(zip(table["question"], table["answer"])):
        if not isinstance(question, str) or not question.strip():
            problems.append(f"row {index}: empty or non-text question")
            continue
        try:
            answer = reference_answer(solution)
        except ValueError as exc:
            problems.append(f"row {index}: {exc}")
            continue
        rows.append({"question": question, "solution": solution, "answer": format_number(answer), "row": index})
    if problems:
        raise GSM8KDataError(
            f"GSM8K file {str(file)!r} ({option}) has {len(problems)} bad row(s) (0-based): "
            f"{_listed(problems)}; fix or remove them (each answer must end in '{ANSWER_MARK} N')"
        )
    return rows


# --- prompts -----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def load_tokenizer(tokenizer_path: str):
    """The tokenizer saved in the local directory ``tokenizer_path`` (loaded once per process)."""
    if not isinstance(tokenizer_path, str) or not tokenizer_path:
        raise GSM8KDataError(
            f"gsm8k needs tokenizer_path, the local model directory whose tokenizer encodes prompts "
            f"and decodes completions (got {tokenizer_path!r}); the example sets "
            "dataset.options.tokenizer_path: ${actor.path}"
        )
    if not Path(tokenizer_path).is_dir():
        raise GSM8KDataError(
            f"tokenizer_path {tokenizer_path!r} is not a directory; point it at the local model "
            "directory (normally ${actor.path}); models are not downloaded from a hub"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
    except Exception as exc:
        raise GSM8KDataError(
            f"cannot load a tokenizer from {tokenizer_path!r}: {type(exc).__name__}: {exc}; the "
            f"directory needs the tokenizer files save_pretrained writes (tokenizer.json, tokenizer_config.json)"
        ) from exc


def check_prompt_template(template: str) -> None:
    """ValueError unless ``template`` formats with ``question`` alone and uses it."""
    if not isinstance(template, str) or "{question}" not in template:
        raise GSM8KDataError(
            f"prompt_template must be a text containing {{question}} (got {template!r}); "
            f"write literal braces as {{{{ and }}}}"
        )
    try:
        template.format(question="")
    except (KeyError, IndexError, ValueError) as exc:
        raise GSM8KDataError(
            f"prompt_template {template!r} does not format with {{question}} alone "
            f"({type(exc).__name__}: {exc}); write literal braces as {{{{ and }}}}"
        ) from None


def encode_prompts(tokenizer, texts: Sequence[str], use_chat_template: bool) -> list[list[int]]:
    """Token ids of each prompt text: as a user message through the tokenizer's chat template
    (with the assistant's turn opened) when ``use_chat_template`` and the tokenizer has one, else
    the plain text; the bos token first whenever the tokenizer has one."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        rendered = [
            tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                          add_generation_prompt=True)
            for text in texts
        ]
        encoded = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    else:
        encoded = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    return [list(ids) if bos is None or ids[:1] == [bos] else [bos, *ids] for ids in encoded]


# --- the dataset ----------------------------------------------------------------------------------


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise GSM8KDataError(f"gsm8k dataset option {name} must be an integer >= {minimum} (got {value!r})")


class GSM8KDataset:
    """GSM8K prompt records: a seeded endless train stream and a fixed eval split.

    Built by ``make_dataset``; ``train_rows`` and ``eval_rows`` are the file rows (with
    ``prompt_ids``) that survived ``max_prompt_tokens``; ``dropped`` counts the others per split.
    """

    name = "gsm8k"

    def __init__(self, train_rows: list[dict], eval_rows: list[dict], seed: int, dropped: dict,
                 tokenizer_path: str):
        self.train_rows, self.eval_rows = train_rows, eval_rows
        self.seed, self.dropped, self.tokenizer_path = seed, dropped, tokenizer_path
        self._epoch_cache: tuple[int, list[int]] | None = None

    def __len__(self) -> int:
        """The number of train rows (one epoch of the train stream)."""
        return len(self.train_rows)

    def _epoch_order(self, epoch: int) -> list[int]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            order = list(range(len(self.train_rows)))
            random.Random(f"{self.seed}/{epoch}").shuffle(order)
            self._epoch_cache = (epoch, order)
        return self._epoch_cache[1]

    def _record(self, row: dict) -> dict:
        return {**row, "prompt_ids": list(row["prompt_ids"]), "tokenizer_path": self.tokenizer_path}

    def train_records(self, start: int = 0) -> Iterator[dict]:
        """The endless train stream from record number ``start`` on (resume by passing it).

        Each record also carries ``position``, its own number in the stream.
        """
        if start < 0:
            raise ValueError(f"a data position is >= 0 (got {start})")
        position = start
        while True:
            epoch, index = divmod(position, len(self.train_rows))
            record = self._record(self.train_rows[self._epoch_order(epoch)[index]])
            record["position"] = position
            yield record
            position += 1

    def train_batch(self, position: int, size: int) -> list[dict]:
        """Records ``position .. position + size - 1`` of the train stream; the next batch starts
        at ``position + size``."""
        if size < 1:
            raise ValueError(f"a batch holds at least one prompt (got size {size})")
        stream = self.train_records(position)
        return [next(stream) for _ in range(size)]

    def eval_records(self, limit: int = 0) -> list[dict]:
        """The eval records in file order; the first ``limit`` of them when ``limit > 0``."""
        rows = self.eval_rows[:limit] if limit > 0 else self.eval_rows
        return [self._record(row) for row in rows]


def _with_prompts(rows: list[dict], tokenizer, template: str, use_chat_template: bool,
                  max_prompt_tokens: int) -> tuple[list[dict], int]:
    """``rows`` with ``prompt_ids`` added, less those longer than ``max_prompt_tokens``; and how
    many were dropped."""
    encoded = encode_prompts(tokenizer, [template.format(question=r["question"]) for r in rows],
                             use_chat_template)
    kept = [{**row, "prompt_ids": ids} for row, ids in zip(rows, encoded)
            if not max_prompt_tokens or len(ids) <= max_prompt_tokens]
    return kept, len(rows) - len(kept)


def make_dataset(path: str = "", tokenizer_path: str = "", eval_path: str = "", held_out: int = 0,
                 prompt_template: str = DEFAULT_PROMPT_TEMPLATE, use_chat_template: bool = True,
                 max_prompt_tokens: int = 0, seed: int = 1, split_seed: int = 0) -> GSM8KDataset:
    """The dataset factory behind the built-in name "gsm8k" (its options are these arguments;
    see the module's docstring).

    Checks every option, then reads the files, then loads the tokenizer and encodes the prompts.
    Raises ``GSM8KDataError`` naming the option, file or row at fault and the fix.
    """
    _check_int("held_out", held_out, 0)
    _check_int("max_prompt_tokens", max_prompt_tokens, 0)
    _check_int("seed", seed, 0)
    _check_int("split_seed", split_seed, 0)
    if not isinstance(use_chat_template, bool):
        raise GSM8KDataError(f"gsm8k dataset option use_chat_template must be true or false (got {use_chat_template!r})")
    check_prompt_template(prompt_template)
    if bool(eval_path) == bool(held_out):
        raise GSM8KDataError(
            f"the gsm8k dataset needs exactly one eval split: eval_path (a local file such as "
            f"data/gsm8k/test.jsonl) or held_out (rows of the train file kept out of training); "
            f"got eval_path={eval_path!r}, held_out={held_out}"
        )
    train_rows = read_rows(path, "path")
    if eval_path:
        eval_rows = read_rows(eval_path, "eval_path")
    else:
        if held_out >= len(train_rows):
            raise GSM8KDataError(
                f"held_out={held_out} leaves no train rows ({path!r} has {len(train_rows)}); "
                f"hold out fewer rows or give eval_path"
            )
        order = list(range(len(train_rows)))
        random.Random(split_seed).shuffle(order)
        held = set(order[:held_out])
        eval_rows = [row for i, row in enumerate(train_rows) if i in held]
        train_rows = [row for i, row in enumerate(train_rows) if i not in held]

    tokenizer = load_tokenizer(tokenizer_path)
    dropped = {}
    train_rows, dropped["train"] = _with_prompts(train_rows, tokenizer, prompt_template, use_chat_template,
                                                 max_prompt_tokens)
    eval_rows, dropped["eval"] = _with_prompts(eval_rows, tokenizer, prompt_template, use_chat_template,
                                               max_prompt_tokens)
    for split, rows in (("train", train_rows), ("eval", eval_rows)):
        if not rows:
            raise GSM8KDataError(
                f"every {split} prompt is longer than max_prompt_tokens={max_prompt_tokens}; "
                f"raise it (and rollout.max_model_len with it) or shorten prompt_template"
            )
    return GSM8KDataset(train_rows, eval_rows, seed, dropped, tokenizer_path)


# --- the reward -------------------------------------------------------------------------------------


def decode_completion(tokenizer, completion_ids) -> str:
    """The text of ``completion_ids`` up to the first eos token, special tokens left out."""
    ids = list(completion_ids)
    eos = tokenizer.eos_token_id
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    return tokenizer.decode(ids, skip_special_tokens=True)


def reward(prompt_record: dict, completion_ids, tokenizer_path: str = "",
           last_number_fallback: bool = True) -> float:
    """1.0 when the completion's final answer equals ``prompt_record["answer"]`` numerically, else
    0.0 (wrong number, no number, empty).

    ``tokenizer_path``: the directory of the tokenizer that decodes ``completion_ids``; empty
    means the record's own ``tokenizer_path`` (gsm8k records carry it). ``last_number_fallback``:
    see ``extract_answer``.
    """
    tokenizer = load_tokenizer(tokenizer_path or prompt_record.get("tokenizer_path", ""))
    stated = extract_answer(decode_completion(tokenizer, completion_ids), last_number_fallback)
    return 1.0 if stated is not None and stated == Decimal(str(prompt_record["answer"])) else 0.0
