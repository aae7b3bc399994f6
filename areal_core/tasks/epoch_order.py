"""The order of a dataset's train stream: epoch after epoch, each a permutation of the train rows
drawn from the dataset's seed and the epoch number. Record number ``position`` is then a pure
function of the options, so a run resumes its data by remembering one integer."""

from __future__ import annotations

import functools
import random


@functools.lru_cache(maxsize=8)  # a stream reads one epoch at a time, the next at its end
def _order(seed: int, epoch: int, size: int) -> tuple[int, ...]:
    order = list(range(size))
    random.Random(f"{seed}/{epoch}").shuffle(order)
    return tuple(order)


def train_row_index(seed: int, position: int, size: int) -> int:
    """The train row (of ``size``) that record number ``position`` (0-based, across epochs) is."""
    epoch, index = divmod(position, size)
    return _order(seed, epoch, size)[index]
