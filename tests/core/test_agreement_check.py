"""The agreement check's decision: wrong weights are told from rounding noise by a wide margin.

Synthetic scores stand in for a server and a trainer here: noise of a chosen per-token size on
top of a trainer's scores, and wrong weights built as the check's alternatives (the base model,
the previous version, twice the adapter, another adapter). The figures the real servers give are
in docs/agreement.md; the real wrong-weights cases are tests/faults/test_wrong_weights.py.
"""

import math
import random

import pytest

from areal_core.agreement import (
    GAP_THRESHOLD, MIN_DECISION_TOKENS, NEARER_FACTOR, PROBE_TOKENS, compute_dtype, judge, nearer_factor,
    probe_sequences,
)
from areal_core.errors import AgreementError


def scores(n, seed, spread=3.0):
    rng = random.Random(seed)
    return [-abs(rng.gauss(0.0, spread)) for _ in range(n)]


def plus_noise(values, size, seed):
    """``values`` with per-token noise of mean absolute value ``size`` (Laplace: heavy-ish tails)."""
    rng = random.Random(seed)
    return [v + rng.choice((-1, 1)) * rng.expovariate(1.0 / size) for v in values]


def moved(values, by, seed):
    """Another set of weights: each token moved by about ``by`` (mean absolute), in a fixed pattern."""
    rng = random.Random(seed)
    return [v + rng.gauss(0.0, by * math.sqrt(math.pi / 2)) for v in values]


N = PROBE_TOKENS
# Healthy noise, the largest gap measured (docs/agreement.md): float32 7.7e-7, bfloat16 0.0044.
# The synthetic runs use these as the noise's mean absolute size on every token.
NOISE = {"float32": 7.7e-7, "bfloat16": 0.0044}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("update", [0.0, 1e-9, 0.3, 3.0], ids=["no-update", "tiny", "noise-sized", "large"])
def test_a_healthy_server_never_alarms_whatever_the_update(dtype, update):
    noise = NOISE[dtype]
    for seed in range(20):
        base = scores(N, seed)
        previous = moved(base, 5 * noise, seed + 100)
        trainer = moved(previous, update * noise, seed + 200) if update else list(previous)
        served = plus_noise(trainer, noise, seed + 300)
        result = judge(3, dtype, served, trainer, base, previous)
        assert not result.alarm, result.describe()
        assert max(result.nearer.values()) < NEARER_FACTOR / 2  # the margin, not just a pass


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_version_0_served_as_the_base_is_no_fault(dtype):
    base = scores(N, 1)
    served = plus_noise(base, NOISE[dtype], 2)
    assert not judge(0, dtype, served, list(base), base, None).alarm


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", ["base", "previous", "double_scale", "other_adapter"])
def test_wrong_weights_are_caught_once_their_effect_is_a_few_times_the_noise(dtype, case):
    noise = NOISE[dtype]
    effect = 8 * noise  # the adapter's (and the update's) effect: eight times the noise
    base = scores(N, 5)
    previous = moved(base, effect, 6)
    trainer = moved(previous, effect, 7)
    wrong = {"base": base, "previous": previous,
             "double_scale": [2 * t - b for t, b in zip(trainer, base)],
             "other_adapter": moved(base, 50 * GAP_THRESHOLD[dtype], 8)}[case]
    result = judge(2, dtype, plus_noise(wrong, noise, 9), trainer, base, previous)
    assert result.alarm
    if case != "other_adapter":
        assert result.reason.startswith("the server serves")
        assert result.nearer[case] > NEARER_FACTOR * 1.2  # a margin, not just a pass
    else:
        assert result.gap > 3 * result.threshold


def test_the_nearer_factor_is_one_for_identical_alternatives_and_grows_with_nearness():
    trainer = scores(N, 3)
    w = [1.0] * N
    assert nearer_factor(trainer, trainer, trainer, w) == 1.0
    far = [t - 1.0 for t in trainer]
    assert nearer_factor(plus_noise(trainer, 0.01, 4), trainer, far, w) < 0.02
    assert nearer_factor(plus_noise(far, 0.01, 4), trainer, far, w) > 50


def test_a_few_outlying_tokens_do_not_make_a_gap():
    """bfloat16 noise is heavy-tailed: a handful of tokens differing by 0.8 (docs/agreement.md)."""
    trainer = [-0.5] * N
    served = list(trainer)
    for t in range(0, 10 * 25, 25):  # 10 of 256 tokens, under the 5 % trimmed
        served[t] -= 0.8
    result = judge(1, "bfloat16", served, trainer, [-1.0] * N, None)
    assert result.gap == 0.0 and not result.alarm and result.gap_max_abs == pytest.approx(0.8)


def test_figures_name_the_version_and_what_each_alternative_would_show():
    base = scores(N, 1)
    trainer = moved(base, 0.5, 2)
    result = judge(7, "float32", base, trainer, base, None)
    assert result.alarm and "the base model" in result.reason
    text = result.describe()
    assert text.startswith("adapter version 7: the server serves the base model") and "256 probe tokens" in text
    assert result.metrics()["agreement_nearer_previous"] is None and result.update_effect is None


def test_length_mismatch_is_an_error():
    with pytest.raises(AgreementError, match="returned 1 log-probabilities"):
        judge(1, "float32", [-1.0], [-1.0, -2.0], [-1.0, -2.0], None)


def test_the_lower_precision_sets_the_threshold():
    assert compute_dtype("float32", "bfloat16") == "bfloat16"
    assert compute_dtype("bfloat16", "float32") == "bfloat16"
    assert compute_dtype("float32", "float32") == "float32"
    assert GAP_THRESHOLD["float16"] < GAP_THRESHOLD["bfloat16"]


def test_probe_sequences_hold_whole_records_and_score_exactly_the_tokens_asked():
    records = [{"prompt_ids": [1, 2, 3], "answer_ids": [4, 5]} for _ in range(200)]
    probe = probe_sequences(records, 256, max_length=63)
    assert all(len(s) <= 63 for s in probe)
    assert sum(len(s) - 1 for s in probe) == 256
    assert probe[0][:5] == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="needs 256 tokens.*gives only 98.*train.agreement=off"):
        probe_sequences(records[:20], 256, max_length=63)
    assert MIN_DECISION_TOKENS <= PROBE_TOKENS
