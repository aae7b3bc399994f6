"""The per-step training-inference mismatch: its figures, and null when no token is comparable."""

import math

import pytest
import torch

from areal_core.grpo.mismatch import MismatchMeter, mismatch_metrics


def test_figures_of_known_differences():
    meter = MismatchMeter()
    server = torch.tensor([-1.0, -2.0, -0.5, -3.0])
    d = torch.tensor([0.0, 0.1, -0.3, 0.25])  # trainer - server
    meter.add(server + d, server)
    meter.add(torch.tensor([]), torch.tensor([]))  # an item with no completion token
    figures = mismatch_metrics(meter.sums(), meter.max_abs)
    assert figures["mismatch_tokens"] == 4
    assert figures["mismatch_mean_abs"] == pytest.approx(0.65 / 4)
    assert figures["mismatch_max_abs"] == pytest.approx(0.3)
    k3 = sum(math.exp(x) - 1 - x for x in d.tolist()) / 4
    assert figures["mismatch_kl"] == pytest.approx(k3, rel=1e-6)
    # exp(-0.3) = 0.74 and exp(0.25) = 1.28 leave [0.8, 1.25]; exp(0.1) = 1.105 does not
    assert figures["mismatch_ratio_outside"] == pytest.approx(2 / 4)


def test_a_step_without_tokens_of_the_current_version_reports_nulls():
    figures = mismatch_metrics(MismatchMeter().sums(), 0.0)
    assert figures == {"mismatch_mean_abs": None, "mismatch_max_abs": None, "mismatch_kl": None,
                       "mismatch_ratio_outside": None, "mismatch_tokens": 0}


def test_sums_from_several_ranks_add_up():
    a, b = MismatchMeter(), MismatchMeter()
    a.add(torch.tensor([-1.0]), torch.tensor([-1.5]))
    b.add(torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -1.0]))
    summed = {k: a.sums()[k] + b.sums()[k] for k in a.sums()}
    figures = mismatch_metrics(summed, max(a.max_abs, b.max_abs))
    assert figures["mismatch_tokens"] == 3 and figures["mismatch_max_abs"] == pytest.approx(1.0)
    assert figures["mismatch_mean_abs"] == pytest.approx(1.5 / 3)
