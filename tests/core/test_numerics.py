"""The norm-relative comparison of areal_core.testing.numerics."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from areal_core.testing.numerics import assert_close_to_norm, relative_error, unit_roundoff  # noqa: E402


def test_unit_roundoff_is_half_the_machine_epsilon():
    assert unit_roundoff(torch.float32) == 2.0**-24
    assert unit_roundoff(torch.bfloat16) == 2.0**-8
    assert unit_roundoff(torch.float16) == 2.0**-11


def test_relative_error_in_both_norms_and_over_lists():
    expected = torch.tensor([3.0, 4.0])
    assert relative_error(expected.clone(), expected) == 0.0
    assert relative_error(torch.tensor([3.0, 4.5]), expected) == pytest.approx(0.1)
    assert relative_error(torch.tensor([3.0, 4.5]), expected, norm="max") == pytest.approx(0.125)
    # A list is one vector: the error of one tensor is measured against the size of all of them.
    assert relative_error([torch.tensor([3.0]), torch.tensor([4.5])], [torch.tensor([3.0]), torch.tensor([4.0])]) \
        == pytest.approx(0.1)
    assert relative_error(torch.zeros(2), torch.zeros(2)) == 0.0
    assert relative_error(torch.ones(2), torch.zeros(2)) == float("inf")
    with pytest.raises(AssertionError, match="shapes differ"):
        relative_error(torch.zeros(2), torch.zeros(3))


def test_a_summation_order_passes_and_a_lost_term_fails():
    # One float32 matrix product in two blockings: the rounding differs, the norm-relative error
    # stays within a few u (its reduction has 4096 terms: u * sqrt(4096) = 64 u at the most,
    # a few u in practice), while losing one block of the sum is an error of order 1.
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, 4096, generator=generator), torch.randn(4096, 16, generator=generator)
    whole = a @ b
    blocked = sum(a[:, i: i + 512] @ b[i: i + 512] for i in range(0, 4096, 512))
    assert_close_to_norm(blocked, whole, ulps=64)
    lost = sum(a[:, i: i + 512] @ b[i: i + 512] for i in range(512, 4096, 512))
    with pytest.raises(AssertionError, match=r"lost block: relative error \(fro norm\) .* exceeds the bound 64 u"):
        assert_close_to_norm(lost, whole, ulps=64, msg="lost block")
