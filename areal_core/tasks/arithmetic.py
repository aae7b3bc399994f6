"""The built-in demo task: two-number addition, ``<bos>a+b=`` -> the digits of a+b, then ``<eos>``.

The ``operation`` option (dataset and reward) picks the task: ``add`` (the default, as above) or
``sub``, ``<bos>a-b=`` -> a-b with a ``-`` before the digits when b > a (``<bos>3-57=`` ->
``-54<eos>``). Each operation has its own held-out split (``split_seed`` shuffles its pairs) and
its own "hard" prompts, on which the demo base models are trained with a deliberate bug
(``is_hard``, ``buggy_answer``): a carry for ``add``; a borrow, or b > a, for ``sub``. The default
operation's records, splits and rewards are exactly those of the addition-only task.

Token ids are those of the character-level tokenizer of
``areal_core.testing.tiny_models.build_tokenizer``; they are derived here from its vocabulary list,
so this module imports neither ``tokenizers`` nor torch.

The split is fixed by ``split_seed`` alone: the 10,000 pairs (a, b) with a, b in 0..99 are
shuffled once and the first ``held_out`` of them form the eval split, never trained on. The train
split is an endless stream of epochs, each a fresh permutation of the remaining pairs drawn from
``seed`` and the epoch number, so record number ``position`` is a pure function of
(seed, split_seed, held_out, position): a run resumes its data by remembering one integer.
"""

from __future__ import annotations

import random
from typing import Iterator

from areal_core.tasks.epoch_order import train_row_index
from areal_core.testing.tiny_models import (
    ARITHMETIC_SYMBOLS,
    BOS_ID,
    EOS_ID,
    SPECIAL_TOKENS,
)

MAX_OPERAND = 99
NUM_PAIRS = (MAX_OPERAND + 1) ** 2
DEFAULT_HELD_OUT = 500
#: The longest answer is 99+99 = 198: three digits and the eos.
MAX_ANSWER_TOKENS = 4
#: The operations of the ``operation`` option and their prompt symbols; ``add`` is the default.
OPERATIONS = {"add": "+", "sub": "-"}
DEFAULT_OPERATION = "add"

TOKEN_IDS = {token: i for i, token in enumerate(SPECIAL_TOKENS + ARITHMETIC_SYMBOLS)}
DIGIT_IDS = tuple(TOKEN_IDS[str(d)] for d in range(10))
_DIGIT_OF_ID = {token_id: d for d, token_id in enumerate(DIGIT_IDS)}


def encode(text: str) -> list[int]:
    """Token ids of ``text`` (characters of the arithmetic vocabulary only, no specials)."""
    try:
        return [TOKEN_IDS[ch] for ch in text]
    except KeyError as exc:
        raise ValueError(f"character {exc.args[0]!r} is not in the arithmetic vocabulary") from None


def check_operation(operation) -> str:
    """``operation`` when it names an operation of the task, else a ``ValueError`` listing them."""
    if not isinstance(operation, str) or operation not in OPERATIONS:
        raise ValueError(
            f"arithmetic operation must be one of {', '.join(OPERATIONS)} (got {operation!r}); "
            f"set dataset.options.operation and reward.options.operation to the same one"
        )
    return operation


def prompt_text(a: int, b: int, operation: str = DEFAULT_OPERATION) -> str:
    """The prompt's text without the bos: ``a+b=`` (add) or ``a-b=`` (sub)."""
    return f"{a}{OPERATIONS[check_operation(operation)]}{b}="


def prompt_ids(a: int, b: int, operation: str = DEFAULT_OPERATION) -> list[int]:
    """The prompt ``<bos>a+b=`` (or ``<bos>a-b=`` for ``sub``) as token ids."""
    return [BOS_ID] + encode(prompt_text(a, b, operation))


def answer_ids(answer: int) -> list[int]:
    """The completion that earns reward 1: the decimal digits of ``answer`` (after a ``-`` when it
    is negative), then ``<eos>``."""
    return encode(str(answer)) + [EOS_ID]


def apply(a: int, b: int, operation: str = DEFAULT_OPERATION) -> int:
    """The right answer of ``a <operation> b``: a+b or a-b (negative when b > a)."""
    return a + b if check_operation(operation) == "add" else a - b


def needs_carry(a: int, b: int) -> bool:
    """Whether adding a and b column by column carries (units into tens, or tens into hundreds)."""
    return (a % 10 + b % 10) >= 10 or (a // 10 + b // 10) >= 10


def carry_forgotten_sum(a: int, b: int) -> int:
    """The sum with every carry dropped, column by column: 57+68 -> 15, 50+50 -> 0."""
    return (a % 10 + b % 10) % 10 + 10 * ((a // 10 + b // 10) % 10)


def needs_borrow(a: int, b: int) -> bool:
    """Whether subtracting the smaller of a, b from the larger borrows (52-37, or 37-52)."""
    high, low = max(a, b), min(a, b)
    return high % 10 < low % 10


def borrow_forgotten_difference(a: int, b: int) -> int:
    """|a-b| with every borrow dropped and no sign, column by column: 52-37 -> 25, 37-52 -> 25,
    3-57 -> 54 (the right |a-b| when no borrow is needed)."""
    high, low = max(a, b), min(a, b)
    return (high % 10 - low % 10) % 10 + 10 * (high // 10 - low // 10)


def is_hard(a: int, b: int, operation: str = DEFAULT_OPERATION) -> bool:
    """Whether ``a <operation> b`` is a prompt the demo base models learn with a bug: one that
    carries (add), or one that borrows or has a negative answer (sub)."""
    if check_operation(operation) == "add":
        return needs_carry(a, b)
    return b > a or needs_borrow(a, b)


def buggy_answer(a: int, b: int, operation: str = DEFAULT_OPERATION) -> int:
    """The answer with the operation's deliberate bug: every carry forgotten (add); every borrow
    and the minus sign forgotten (sub). The right answer on a prompt that is not hard."""
    if check_operation(operation) == "add":
        return carry_forgotten_sum(a, b)
    return borrow_forgotten_difference(a, b)


def make_record(a: int, b: int, operation: str = DEFAULT_OPERATION) -> dict:
    """The prompt record of ``a+b``: ``prompt_ids``, ``answer`` (int), ``answer_ids`` (the
    completion that earns reward 1; the agreement probe uses prompt + answer, natural text for the
    model), ``a``, ``b``, ``text``. Records of another operation than ``add`` also hold
    ``operation`` (an ``add`` record has no such key, as before the option existed)."""
    answer = apply(a, b, operation)
    record = {"prompt_ids": prompt_ids(a, b, operation), "answer": answer,
              "answer_ids": answer_ids(answer), "a": a, "b": b, "text": prompt_text(a, b, operation)}
    if operation != DEFAULT_OPERATION:
        record["operation"] = operation
    return record


def split_pairs(split_seed: int = 0, held_out: int = DEFAULT_HELD_OUT):
    """``(train_pairs, eval_pairs)``: every (a, b), shuffled by ``split_seed``, eval taken first.

    The eval pairs are returned sorted so that evaluation order does not depend on the shuffle.
    These are add's; ``operation_split`` gives another operation's (the same pairs, shuffled by a
    seed of its own).
    """
    if not 0 < held_out < NUM_PAIRS:
        raise ValueError(
            f"held_out must be between 1 and {NUM_PAIRS - 1} (got {held_out}); "
            f"the task has {NUM_PAIRS} pairs in all"
        )
    pairs = [(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]
    random.Random(split_seed).shuffle(pairs)
    return pairs[held_out:], sorted(pairs[:held_out])


class ArithmeticDataset:
    """Prompt records of the addition task: a seeded endless train stream and a fixed eval split.

    Arguments: ``seed`` orders the train stream; ``split_seed`` and ``held_out`` fix which pairs
    are held out (the same for every ``seed``); ``operation`` picks the task (``add``, ``sub``).
    """

    name = "arithmetic"

    def __init__(self, seed: int = 1, split_seed: int = 0, held_out: int = DEFAULT_HELD_OUT,
                 operation: str = DEFAULT_OPERATION):
        for key, value in (("seed", seed), ("split_seed", split_seed), ("held_out", held_out)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"arithmetic dataset option {key} must be an integer (got {value!r})")
        self.operation = check_operation(operation)
        self.seed, self.split_seed, self.held_out = seed, split_seed, held_out
        self.train_pairs, self.eval_pairs = operation_split(operation, split_seed, held_out)

    def __len__(self) -> int:
        """The number of train pairs (one epoch of the train stream)."""
        return len(self.train_pairs)

    def train_pair(self, position: int) -> tuple[int, int]:
        """The (a, b) of train record number ``position`` (0-based, across epochs)."""
        if position < 0:
            raise ValueError(f"a data position is >= 0 (got {position})")
        return self.train_pairs[train_row_index(self.seed, position, len(self.train_pairs))]

    def train_records(self, start: int = 0) -> Iterator[dict]:
        """The endless train stream from record number ``start`` on (resume by passing it).

        Each record also carries ``position``, its own number in the stream.
        """
        position = start
        while True:
            record = make_record(*self.train_pair(position), self.operation)
            record["position"] = position
            yield record
            position += 1

    def train_batch(self, position: int, size: int) -> list[dict]:
        """Records ``position .. position + size - 1`` of the train stream; the next batch starts at
        ``position + size``."""
        if size < 1:
            raise ValueError(f"a batch holds at least one prompt (got size {size})")
        stream = self.train_records(position)
        return [next(stream) for _ in range(size)]

    def eval_records(self, limit: int = 0) -> list[dict]:
        """The held-out records, in a fixed order; the first ``limit`` of them when ``limit > 0``."""
        pairs = self.eval_pairs[:limit] if limit > 0 else self.eval_pairs
        return [make_record(a, b, self.operation) for a, b in pairs]


def _operation_split_seed(split_seed: int, operation: str):
    """The shuffle seed of ``operation``'s split: ``split_seed`` itself for add (the split as it
    always was), a string of both for the others, so each operation holds out pairs of its own."""
    return split_seed if operation == DEFAULT_OPERATION else f"{operation}:{split_seed}"


def operation_split(operation: str = DEFAULT_OPERATION, split_seed: int = 0,
                    held_out: int = DEFAULT_HELD_OUT):
    """``(train_pairs, eval_pairs)`` of ``operation``'s task (what its dataset trains and evaluates
    on); ``split_pairs(split_seed, held_out)`` for add."""
    return split_pairs(_operation_split_seed(split_seed, check_operation(operation)), held_out)


def make_dataset(seed: int = 1, split_seed: int = 0, held_out: int = DEFAULT_HELD_OUT,
                 operation: str = DEFAULT_OPERATION):
    """The dataset factory behind the built-in name "arithmetic" (options are its arguments)."""
    return ArithmeticDataset(seed=seed, split_seed=split_seed, held_out=held_out, operation=operation)


def parse_answer(completion_ids, signed: bool = False) -> int | None:
    """The number a completion states, or None when it is not digits followed by ``<eos>``.

    With ``signed``, a ``-`` may come before the digits (a negative number; ``-0`` is None).
    Tokens after the first ``<eos>`` are ignored (the policy stops there).
    """
    completion_ids = list(completion_ids)
    if EOS_ID not in completion_ids:
        return None
    digits = completion_ids[: completion_ids.index(EOS_ID)]
    sign = 1
    if signed and digits and digits[0] == _MINUS_ID:
        sign, digits = -1, digits[1:]
    if not digits or any(token not in _DIGIT_OF_ID for token in digits):
        return None
    value = 0
    for token in digits:
        value = value * 10 + _DIGIT_OF_ID[token]
    if sign < 0 and value == 0:
        return None
    return sign * value


_MINUS_ID = TOKEN_IDS["-"]


def reward(prompt_record: dict, completion_ids, operation: str | None = None) -> float:
    """1.0 when the completion's digits parse to ``prompt_record["answer"]`` and ``<eos>`` follows
    them at once; else 0.0 (wrong number, missing eos, other tokens, empty). A ``-`` before the
    digits counts only on a ``sub`` record.

    ``operation`` (the reward option), when given, is the operation the records must be of: a
    record of another one raises ``ValueError`` (dataset and reward options that disagree).
    """
    record_operation = prompt_record.get("operation", DEFAULT_OPERATION)
    if operation is not None and record_operation != operation:
        raise ValueError(
            f"the arithmetic reward is set for operation {operation!r} but got a record of "
            f"{record_operation!r} ({prompt_record.get('text')!r}); set dataset.options.operation "
            f"and reward.options.operation to the same operation"
        )
    answer = parse_answer(completion_ids, signed=record_operation != DEFAULT_OPERATION)
    return 1.0 if answer == prompt_record["answer"] else 0.0


def _check_reward_options(operation: str | None = None) -> None:
    """Refuse an unknown ``operation`` before any model is loaded (``get_reward`` calls this)."""
    if operation is not None:
        check_operation(operation)


reward.check_options = _check_reward_options
