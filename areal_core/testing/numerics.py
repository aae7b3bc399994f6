"""Comparing floating-point results with a bound relative to their size, in unit roundoffs.

Two correct computations of the same quantity differ by rounding, and how they round depends on
the kernels that ran: PyTorch picks its CPU kernels by the CPU (``ATEN_CPU_CAPABILITY``:
``default``, ``avx2``, ``avx512``), and the blocking of a matrix product or a reduction changes
the order of its sums. An element-wise tolerance on a sum of many products is therefore fitted to
one machine's rounding (one element lands 1.5e-5 off on one CPU and 1e-7 off on another), while
the rounding error of the whole tensor, measured against the whole tensor's size, does not move
with the kernel: ``||actual - expected|| <= ulps * u * ||expected||``, with ``u`` the unit
roundoff of the dtype the values were computed in (``unit_roundoff``).

``ulps`` is the caller's budget, and the caller writes the figures behind it next to the call:
the relative error measured (in units of ``u``), the bound, and what the bug the check exists for
gives, so both margins are visible. ``relative_error`` gives the measured figure for a check that
compares it with something else (a threshold that a bug must exceed, say).

Tensors are compared in float64, so the comparison itself adds no rounding. A list of tensors is
compared as the one vector of all their elements (pairs must have equal shapes).
"""

from __future__ import annotations

from typing import Sequence

#: ``norm`` values: "fro" the 2-norm of all elements, "max" the largest absolute value.
NORMS = ("fro", "max")


def unit_roundoff(dtype) -> float:
    """The unit roundoff ``u`` of a torch floating dtype: half its machine epsilon.

    float32 2^-24 (6.0e-8), bfloat16 2^-8 (3.9e-3), float16 2^-11 (4.9e-4), float64 2^-53.
    """
    import torch

    return torch.finfo(dtype).eps / 2


def _flat(values):
    import torch

    if isinstance(values, torch.Tensor):
        return values.detach().reshape(-1).double()
    return torch.cat([v.detach().reshape(-1).double() for v in values])


def _norm(vector, norm: str) -> float:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, not {norm!r}")
    if vector.numel() == 0:
        return 0.0
    return float(vector.abs().max()) if norm == "max" else float(vector.norm())


def _check_shapes(actual, expected) -> None:
    import torch

    if isinstance(actual, torch.Tensor) != isinstance(expected, torch.Tensor):
        raise TypeError("compare a tensor with a tensor, or a list of tensors with a list")
    pairs = [(actual, expected)] if isinstance(actual, torch.Tensor) else list(zip(actual, expected, strict=True))
    for a, e in pairs:
        if a.shape != e.shape:
            raise AssertionError(f"shapes differ: {tuple(a.shape)} and {tuple(e.shape)}")


def relative_error(actual, expected, *, norm: str = "fro") -> float:
    """``||actual - expected|| / ||expected||``: 0 when equal, inf when only ``expected`` is 0."""
    _check_shapes(actual, expected)
    a, e = _flat(actual), _flat(expected)
    difference, scale = _norm(a - e, norm), _norm(e, norm)
    if difference == 0:
        return 0.0
    return difference / scale if scale > 0 else float("inf")


def assert_close_to_norm(actual, expected, *, ulps: float, dtype=None, norm: str = "fro", msg: str = "") -> None:
    """Assert ``relative_error(actual, expected, norm=norm) <= ulps * unit_roundoff(dtype)``.

    ``dtype`` is the precision the values were computed in (default: ``expected``'s dtype).
    """
    import torch

    if dtype is None:
        dtype = expected.dtype if isinstance(expected, torch.Tensor) else expected[0].dtype
    u = unit_roundoff(dtype)
    error = relative_error(actual, expected, norm=norm)
    if not error <= ulps * u:
        where = f"{msg}: " if msg else ""
        raise AssertionError(
            f"{where}relative error ({norm} norm) {error:.3g} = {error / u:.3g} u of {dtype} "
            f"exceeds the bound {ulps:g} u = {ulps * u:.3g}"
        )
