"""Make host-memory pinning a no-op in an SGLang server process running on the CPU.

Imported by Python at start-up of each process of an SGLang server that areal launches in CPU
mode (this folder is first on that process's ``PYTHONPATH``; nothing else has it).

Why: SGLang's LoRA code creates its host-side index and weight tensors with
``pin_memory=True`` or ``.pin_memory()``. Pinning (page-locking) memory asks the CUDA driver, so
on a machine without an NVIDIA driver it raises, although the server never copies to a GPU.

Why this changes nothing SGLang computes: pinned memory differs from ordinary memory only in
that the driver may copy it to a GPU asynchronously. The tensors keep the same values, dtype,
shape and device ("cpu"), and on a CPU-only server there is no copy to a device at all.

How: ``Tensor.pin_memory()`` returns the tensor itself, ``Tensor.is_pinned()`` says False, and
the factory functions that take a ``pin_memory`` argument get it dropped.
"""

import functools

import torch

_FACTORIES_WITH_PIN_MEMORY = (
    "tensor",
    "empty",
    "empty_strided",
    "zeros",
    "ones",
    "full",
    "arange",
    "empty_like",
    "zeros_like",
    "ones_like",
    "full_like",
    "rand",
    "randn",
    "randint",
)


def _without_pin_memory(factory):
    @functools.wraps(factory)
    def create(*args, **kwargs):
        kwargs.pop("pin_memory", None)
        return factory(*args, **kwargs)

    return create


def _install() -> None:
    if torch.cuda.is_available():  # a real GPU: pinning works and is wanted, change nothing
        return
    for name in _FACTORIES_WITH_PIN_MEMORY:
        setattr(torch, name, _without_pin_memory(getattr(torch, name)))
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self
    torch.Tensor.is_pinned = lambda self, *args, **kwargs: False


_install()
