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

import re
from decimal import Decimal, InvalidOperation

from areal_core.tasks.data_files import FileLayout, TaskDataError, listed, read_columns
from areal_core.tasks.prompt_dataset import PromptDataset, build_prompt_dataset
from areal_core.tasks.prompt_encoding import decode_completion, load_tokenizer

DEFAULT_PROMPT_TEMPLATE = (
    "{question}\n"
    "Solve the problem step by step. Then write the final answer, a number alone, "
    "on the last line after '####', like this: #### 42"
)
REQUIRED_FIELDS = ("question", "answer")
ANSWER_MARK = "####"

# A number as written in maths prose: an optional sign (before or after a '$'), digits with
# thousands commas or without, an optional decimal part. The look-behind keeps the tail of a word
# or of another number ("x2", "1.5.3") and the minus of a range ("10-3") from starting one; a full
# stop with no digit after it (end of sentence) is not part of the number.
_NUMBER = re.compile(
    r"(?<![\w.])"
    r"(?P<sign>[-+\u2212]?)\$?(?P<sign_after_dollar>[-\u2212]?)"
    r"(?P<body>(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)"
)


#: The name this module's errors have always had: the shared ``TaskDataError``.
GSM8KDataError = TaskDataError


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

LAYOUT = FileLayout(
    dataset="gsm8k", title="GSM8K file", columns=REQUIRED_FIELDS,
    row_needs="every row needs 'question' (the problem) and 'answer' (the solution ending in '#### N'), "
              "as in openai/gsm8k",
    example="data/gsm8k/train.jsonl", eval_example="data/gsm8k/test.jsonl",
)


def read_rows(path: str, option: str = "path") -> list[dict]:
    """The rows of a local GSM8K file as ``{"question", "solution", "answer", "row"}`` dicts.

    ``answer`` is the reference number as a string (``format_number``); ``row`` the 0-based row
    number in the file. ``option`` names the configuration option that gave ``path`` (errors name
    it). Raises ``GSM8KDataError`` naming the file and the fix when the file is missing, of
    another format, unreadable, empty, lacks a field, or has answers without ``#### N``.
    """
    columns = read_columns(path, option, LAYOUT)
    rows, problems = [], []
    for index, (question, solution) in enumerate(zip(columns["question"], columns["answer"])):
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
            f"GSM8K file {path!r} ({option}) has {len(problems)} bad row(s) (0-based): "
            f"{listed(problems)}; fix or remove them (each answer must end in '{ANSWER_MARK} N')"
        )
    return rows


# --- the dataset ----------------------------------------------------------------------------------


def make_dataset(path: str = "", tokenizer_path: str = "", eval_path: str = "", held_out: int = 0,
                 prompt_template: str = DEFAULT_PROMPT_TEMPLATE, use_chat_template: bool = True,
                 max_prompt_tokens: int = 0, seed: int = 1, split_seed: int = 0) -> PromptDataset:
    """The dataset factory behind the built-in name "gsm8k" (its options are these arguments;
    see the module's docstring).

    Checks every option, then reads the files, then loads the tokenizer and encodes the prompts.
    Raises ``GSM8KDataError`` naming the option, file or row at fault and the fix.
    """
    return build_prompt_dataset(
        LAYOUT, read_rows, path=path, eval_path=eval_path, held_out=held_out, tokenizer_path=tokenizer_path,
        prompt_template=prompt_template, field="question", use_chat_template=use_chat_template,
        max_prompt_tokens=max_prompt_tokens, seed=seed, split_seed=split_seed)


# --- the reward -------------------------------------------------------------------------------------


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
