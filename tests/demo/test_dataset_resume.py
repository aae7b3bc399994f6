"""The train stream resumes from a remembered position, within and across epochs."""

from __future__ import annotations

import itertools

import pytest

from areal_core.tasks.arithmetic import ArithmeticDataset


def _pairs(records):
    return [(r["a"], r["b"], r["position"]) for r in records]


def test_resuming_from_a_position_continues_the_same_stream():
    dataset = ArithmeticDataset(seed=5)
    whole = dataset.train_batch(0, 96)
    resumed = ArithmeticDataset(seed=5).train_batch(48, 48)  # a fresh object, as after a restart
    assert _pairs(resumed) == _pairs(whole[48:])
    assert [r["position"] for r in whole] == list(range(96))


def test_batches_tile_the_stream():
    dataset = ArithmeticDataset(seed=5)
    batches = [dataset.train_batch(position, 16) for position in range(0, 64, 16)]
    assert _pairs(itertools.chain(*batches)) == _pairs(dataset.train_batch(0, 64))


def test_iterator_and_batches_agree():
    dataset = ArithmeticDataset(seed=2)
    from_iterator = list(itertools.islice(dataset.train_records(start=10), 20))
    assert _pairs(from_iterator) == _pairs(dataset.train_batch(10, 20))


def test_resuming_across_an_epoch_boundary():
    dataset = ArithmeticDataset(seed=7, held_out=9990)  # 10 train pairs: epochs of 10 records
    stream = dataset.train_batch(0, 35)
    assert _pairs(ArithmeticDataset(seed=7, held_out=9990).train_batch(17, 18)) == _pairs(stream[17:])
    epochs = [sorted((r["a"], r["b"]) for r in stream[i : i + 10]) for i in (0, 10, 20)]
    assert epochs[0] == epochs[1] == epochs[2] == sorted(dataset.train_pairs)
    orders = [[(r["a"], r["b"]) for r in stream[i : i + 10]] for i in (0, 10, 20)]
    assert len({tuple(o) for o in orders}) > 1  # each epoch is a new permutation


@pytest.mark.parametrize("position, size", [(-1, 4), (0, 0)])
def test_bad_positions_and_sizes_are_refused(position, size):
    with pytest.raises(ValueError):
        ArithmeticDataset().train_batch(position, size)
