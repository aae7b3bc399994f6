"""Maths problems from a LOCAL file, and their reward graded by Hugging Face's ``math-verify``.

The file holds one problem a row, as JSON Lines (``.jsonl``/``.json``) or Parquet
(``.parquet``), read with the ``datasets`` library (no hub access). Which columns hold the
problem and its reference answer is configurable: MATH's rows are ``problem``/``solution``
(the answer is the solution's last ``\\boxed{}``), DAPO-Math's ``prompt``/``answer``.

Options of the dataset factory ``make_dataset`` (``dataset.options``): those of gsm8k
(``path``, ``eval_path`` or ``held_out``, ``tokenizer_path``, ``use_chat_template``,
``max_prompt_tokens``, ``seed``, ``split_seed``; see ``areal_core.tasks.prompt_dataset``), and

- ``problem_column`` (default ``problem``): the column of the problem text;
- ``answer_column`` (default ``solution``): the column of the reference answer; when its text
  holds a ``\\boxed{...}``, the content of the last one is the reference, else the whole text
  (``$`` delimiters stripped); numbers are read as their text;
- ``prompt_template``: a ``str.format`` template with one field, ``{problem}``; the default asks
  for the final answer in ``\\boxed{}``.

Each record holds ``prompt_ids``, ``problem``, ``answer`` (the reference answer's text),
``solution`` (the answer column's text as in the file), ``row`` and ``tokenizer_path``.

The reward (``reward``, a ``MathReward``) decodes a completion and grades it against the
record's ``answer`` with ``math_verify.parse``/``verify`` (``areal_core.tasks.math_grading``,
modes ``boxed`` and ``plain``) in a grading process, with a deadline per completion
(``areal_core.tasks.grader_pool``). A completion whose grading overruns the deadline or raises
scores 0 and is counted: ``reward_grader_timeouts`` and ``reward_grader_errors`` in every step's
record of ``metrics.jsonl`` (those since the previous step's batch). docs/math.md has the table of
what each mode grades right.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
import threading

from areal_core.tasks.data_files import FileLayout, TaskDataError, listed, read_columns
from areal_core.tasks.grader_pool import GraderPool
from areal_core.tasks.math_grading import MODES, last_boxed
from areal_core.tasks.prompt_dataset import PromptDataset, build_prompt_dataset
from areal_core.tasks.prompt_encoding import decode_completion, load_tokenizer

DEFAULT_PROMPT_TEMPLATE = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
DEFAULT_GRADER = "areal_core.tasks.math_grading:grade"
TIMEOUT_METRIC = "reward_grader_timeouts"
ERROR_METRIC = "reward_grader_errors"


# --- the file and the dataset ---------------------------------------------------------------------


def reference_of(text: str) -> str:
    """The reference answer an answer column's text gives: its last ``\\boxed{}``'s content, else
    the text itself without ``$`` delimiters; ValueError when that is empty or a box is unclosed."""
    boxed = last_boxed(text)
    if boxed is None and ("\\boxed" in text or "\\fbox" in text):
        raise ValueError("its \\boxed{ is never closed")
    reference = (boxed if boxed is not None else text).strip().strip("$").strip()
    if not reference:
        raise ValueError("the reference answer is empty")
    return reference


def _layout(problem_column: str, answer_column: str) -> FileLayout:
    return FileLayout(
        dataset="math", title="math file", columns=(problem_column, answer_column),
        row_needs=(f"every row needs {problem_column!r} (the problem) and {answer_column!r} (the reference answer, "
                   f"or a solution whose last \\boxed{{}} holds it); name other columns with "
                   f"dataset.options.problem_column and answer_column (MATH: problem/solution, DAPO-Math: "
                   f"prompt/answer)"),
        example="data/math/train.jsonl", eval_example="data/math/test.jsonl",
    )


def _rows_reader(problem_column: str, answer_column: str):
    layout = _layout(problem_column, answer_column)

    def read_rows(path: str, option: str) -> list[dict]:
        columns = read_columns(path, option, layout)
        rows, problems = [], []
        for index, (problem, solution) in enumerate(zip(columns[problem_column], columns[answer_column])):
            if not isinstance(problem, str) or not problem.strip():
                problems.append(f"row {index}: empty or non-text {problem_column!r}")
                continue
            if isinstance(solution, (int, float)) and not isinstance(solution, bool):
                solution = str(solution)
            if not isinstance(solution, str):
                problems.append(f"row {index}: {answer_column!r} is a {type(solution).__name__}, not a text")
                continue
            try:
                answer = reference_of(solution)
            except ValueError as exc:
                problems.append(f"row {index}: {exc}")
                continue
            rows.append({"problem": problem, "solution": solution, "answer": answer, "row": index})
        if problems:
            raise TaskDataError(
                f"math file {path!r} ({option}) has {len(problems)} bad row(s) (0-based): {listed(problems)}; "
                f"fix or remove them, or point answer_column at the column of the answers"
            )
        return rows

    return layout, read_rows


def _check_column(option: str, value) -> None:
    if not isinstance(value, str) or not value:
        raise TaskDataError(f"math dataset option {option} must be a column name such as 'problem' (got {value!r})")


def make_dataset(path: str = "", tokenizer_path: str = "", eval_path: str = "", held_out: int = 0,
                 problem_column: str = "problem", answer_column: str = "solution",
                 prompt_template: str = DEFAULT_PROMPT_TEMPLATE, use_chat_template: bool = True,
                 max_prompt_tokens: int = 0, seed: int = 1, split_seed: int = 0) -> PromptDataset:
    """The dataset factory behind the built-in name "math" (its options are these arguments; see
    the module's docstring). Raises ``TaskDataError`` naming the option, file, column or row at
    fault and the fix, before the tokenizer is loaded."""
    _check_column("problem_column", problem_column)
    _check_column("answer_column", answer_column)
    layout, read_rows = _rows_reader(problem_column, answer_column)
    return build_prompt_dataset(
        layout, read_rows, path=path, eval_path=eval_path, held_out=held_out, tokenizer_path=tokenizer_path,
        prompt_template=prompt_template, field="problem", use_chat_template=use_chat_template,
        max_prompt_tokens=max_prompt_tokens, seed=seed, split_seed=split_seed)


# --- the reward -------------------------------------------------------------------------------------


class MathReward:
    """The reward behind the built-in name "math": ``reward(prompt_record, completion_ids,
    **options)``, graded in grading processes it starts at its first call.

    ``drain_metrics()`` returns the completions whose grading timed out or raised since its
    previous call (the loop adds them to each step's record).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._pools: dict[tuple[str, int], GraderPool] = {}
        self._counts = {TIMEOUT_METRIC: 0, ERROR_METRIC: 0}
        self._said: set[str] = set()

    def check_options(self, **options) -> None:
        """TaskDataError naming a bad option of ``__call__`` and its fix (``get_reward`` calls this
        first, once the option names are known to be right)."""
        bound = inspect.signature(self.__call__).bind(None, None, **options)
        bound.apply_defaults()
        mode, timeout_seconds, grader, grader_processes = (
            bound.arguments[name] for name in ("mode", "timeout_seconds", "grader", "grader_processes"))
        if mode not in MODES:
            raise TaskDataError(f"math reward option mode must be one of {', '.join(MODES)} (got {mode!r}): "
                                f"boxed grades the last \\boxed{{}} alone, plain the whole completion")
        if isinstance(timeout_seconds, bool) or not isinstance(timeout_seconds, (int, float)) or timeout_seconds <= 0:
            raise TaskDataError(f"math reward option timeout_seconds must be a number of seconds > 0 "
                                f"(got {timeout_seconds!r}): the deadline of grading one completion")
        if isinstance(grader_processes, bool) or not isinstance(grader_processes, int) or grader_processes < 1:
            raise TaskDataError(f"math reward option grader_processes must be an integer >= 1 (got {grader_processes!r})")
        if grader == DEFAULT_GRADER and importlib.util.find_spec("math_verify") is None:
            raise TaskDataError("the math reward grades with math-verify, which is not installed; "
                                "install areal-core[math] (pip install 'areal-core[math]')")
        from areal_core.tasks import import_function

        import_function(grader, "grader")

    def __call__(self, prompt_record: dict, completion_ids, mode: str = "boxed", tokenizer_path: str = "",
                 timeout_seconds: float = 5.0, grader: str = DEFAULT_GRADER, grader_processes: int = 1) -> float:
        """1.0 when the completion's answer (per ``mode``: ``boxed`` or ``plain``) is, by
        math-verify, equal to ``prompt_record["answer"]``; 0.0 when it is not, states none, or its
        grading overran ``timeout_seconds`` or raised (both counted).

        ``tokenizer_path``: the directory of the tokenizer that decodes ``completion_ids``
        (empty: the record's own). ``grader``: the grading function's import path, called as
        ``grader(completion_text, reference, mode) -> float`` in ``grader_processes`` processes.
        """
        tokenizer = load_tokenizer(tokenizer_path or prompt_record.get("tokenizer_path", ""))
        text = decode_completion(tokenizer, completion_ids)
        outcome, value = self._pool(grader, grader_processes).call(
            (text, str(prompt_record["answer"]), mode), timeout_seconds)
        if outcome == "ok":
            return float(value)
        metric = TIMEOUT_METRIC if outcome == "timeout" else ERROR_METRIC
        with self._lock:
            self._counts[metric] += 1
            first = metric not in self._said
            self._said.add(metric)
        if first:
            what = (f"overran its {timeout_seconds:g} s deadline (the grading process was replaced)"
                    if outcome == "timeout" else f"raised {value}")
            print(f"areal: math reward: grading a completion {what}; it scores 0 and metrics.jsonl counts "
                  f"such completions as {metric} (said once)", file=sys.stderr, flush=True)
        return 0.0

    def _pool(self, grader: str, processes: int) -> GraderPool:
        with self._lock:
            key = (grader, processes)
            if key not in self._pools:
                self._pools[key] = GraderPool(grader, processes)
            return self._pools[key]

    def drain_metrics(self) -> dict[str, int]:
        """The timed-out and failed gradings since the previous call (zeros included)."""
        with self._lock:
            counts = dict(self._counts)
            self._counts = dict.fromkeys(self._counts, 0)
        return counts

    def close(self) -> None:
        """Stop the grading processes (a later call starts new ones)."""
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.close()


reward = MathReward()
