"""The built-in demo task: two-number addition, ``<bos>a+b=`` -> the digits of a+b, then ``<eos>``.

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

TOKEN_IDS = {token: i for i, token in enumerate(SPECIAL_TOKENS + ARITHMETIC_SYMBOLS)}
DIGIT_IDS = tuple(TOKEN_IDS[str(d)] for d in range(10))
_DIGIT_OF_ID = {token_id: d for d, token_id in enumerate(DIGIT_IDS)}


def encode(text: str) -> list[int]:
    """Token ids of ``text`` (characters of the arithmetic vocabulary only, no specials)."""
    try:
        return [TOKEN_IDS[ch] for ch in text]
    except KeyError as exc:
        raise ValueError(f"character {exc.args[0]!r} is not in the arithmetic vocabulary") from None


def prompt_ids(a: int, b: int) -> list[int]:
    """The prompt ``<bos>a+b=`` as token ids."""
    return [BOS_ID] + encode(f"{a}+{b}=")


def answer_ids(answer: int) -> list[int]:
    """The completion that earns reward 1: the decimal digits of ``answer``, then ``<eos>``."""
    return encode(str(answer)) + [EOS_ID]


def needs_carry(a: int, b: int) -> bool:
    """Whether adding a and b column by column carries (units into tens, or tens into hundreds)."""
    return (a % 10 + b % 10) >= 10 or (a // 10 + b // 10) >= 10


def carry_forgotten_sum(a: int, b: int) -> int:
    """The sum with every carry dropped, column by column: 57+68 -> 15, 50+50 -> 0."""
    return (a % 10 + b % 10) % 10 + 10 * ((a // 10 + b // 10) % 10)


def make_record(a: int, b: int) -> dict:
    """The prompt record of ``a+b``: ``prompt_ids``, ``answer`` (int), ``answer_ids`` (the
    completion that earns reward 1; the agreement probe uses prompt + answer, natural text for the
    model), ``a``, ``b``, ``text``."""
    return {"prompt_ids": prompt_ids(a, b), "answer": a + b, "answer_ids": answer_ids(a + b),
            "a": a, "b": b, "text": f"{a}+{b}="}


def split_pairs(split_seed: int = 0, held_out: int = DEFAULT_HELD_OUT):
    """``(train_pairs, eval_pairs)``: every (a, b), shuffled by ``split_seed``, eval taken first.

    The eval pairs are returned sorted so that evaluation order does not depend on the shuffle.
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
    are held out (the same for every ``seed``).
    """

    name = "arithmetic"

    def __init__(self, seed: int = 1, split_seed: int = 0, held_out: int = DEFAULT_HELD_OUT):
        for key, value in (("seed", seed), ("split_seed", split_seed), ("held_out", held_out)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"arithmetic dataset option {key} must be an integer (got {value!r})")
        self.seed, self.split_seed, self.held_out = seed, split_seed, held_out
        self.train_pairs, self.eval_pairs = split_pairs(split_seed, held_out)

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
            record = make_record(*self.train_pair(position))
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
        return [make_record(a, b) for a, b in pairs]


def make_dataset(seed: int = 1, split_seed: int = 0, held_out: int = DEFAULT_HELD_OUT):
    """The dataset factory behind the built-in name "arithmetic" (options are its arguments)."""
    return ArithmeticDataset(seed=seed, split_seed=split_seed, held_out=held_out)


def parse_answer(completion_ids) -> int | None:
    """The number a completion states, or None when it is not digits followed by ``<eos>``.

    Tokens after the first ``<eos>`` are ignored (the policy stops there).
    """
    completion_ids = list(completion_ids)
    if EOS_ID not in completion_ids:
        return None
    digits = completion_ids[: completion_ids.index(EOS_ID)]
    if not digits or any(token not in _DIGIT_OF_ID for token in digits):
        return None
    value = 0
    for token in digits:
        value = value * 10 + _DIGIT_OF_ID[token]
    return value


def reward(prompt_record: dict, completion_ids) -> float:
    """1.0 when the completion's digits parse to ``prompt_record["answer"]`` and ``<eos>`` follows
    them at once; else 0.0 (wrong number, missing eos, other tokens, empty)."""
    return 1.0 if parse_answer(completion_ids) == prompt_record["answer"] else 0.0
