"""WORKAROUND: run megatron-core on a machine without a GPU (tests, debugging, the CPU demo).

megatron-core assumes CUDA. Its forward and backward call ``torch.cuda.current_device()`` to
place buffers (tensor_parallel/layers.py and mappings.py, the rotary embedding, the global memory
buffer in core/utils.py, ...) and keep a CUDA random-number tracker (tensor_parallel/random.py).
Without a GPU those calls raise. This module redirects exactly those calls to the CPU, and only
inside megatron-core's own modules: every ``megatron.core.*`` module that did ``import torch`` gets
a thin stand-in for ``torch`` whose ``cuda.current_device()`` answers the CPU device and whose CUDA
RNG functions use the CPU generator. Everything else (``torch.cuda.is_available()``, tensors,
``torch.distributed``) is the real torch, and no other library sees any change.

It is opt-in, documented in docs/backends.md (Megatron), and refused where a GPU is present:
- ``AREAL_MEGATRON_CPU_MODE=1`` in the environment (inherited by every training rank), or
- ``actor.device: cpu`` with ``actor.backend: megatron``.
On a GPU none of this is needed or applied.
"""

from __future__ import annotations

import os
import sys
import types

from areal_core.errors import ArealError

ENV_VAR = "AREAL_MEGATRON_CPU_MODE"
_TRUE = ("1", "true", "yes", "on")


def env_requested() -> bool:
    """Whether ``AREAL_MEGATRON_CPU_MODE`` is set to a true value (1, true, yes, on)."""
    return os.environ.get(ENV_VAR, "").strip().lower() in _TRUE


def requested(device: str = "auto") -> bool:
    """Whether the user opted in: the environment variable, or ``actor.device == "cpu"``."""
    return env_requested() or device == "cpu"


class _CpuCuda(types.ModuleType):
    """Stands in for ``torch.cuda`` inside megatron-core: device and RNG calls go to the CPU."""

    def __init__(self, real_torch):
        super().__init__("torch.cuda (areal-megatron CPU mode)")
        self._torch = real_torch

    def current_device(self):
        return self._torch.device("cpu")

    def get_rng_state(self, device=None):
        return self._torch.get_rng_state()

    def set_rng_state(self, new_state, device=None):
        self._torch.set_rng_state(new_state)

    def manual_seed(self, seed):
        self._torch.manual_seed(seed)

    def synchronize(self, device=None):
        return None

    def __getattr__(self, name):
        return getattr(self._torch.cuda, name)


class _TorchForMegatron(types.ModuleType):
    """Stands in for ``torch`` inside megatron-core: the real torch except for ``cuda``."""

    def __init__(self, real_torch):
        super().__init__("torch (areal-megatron CPU mode)")
        self.cuda = _CpuCuda(real_torch)
        self._torch = real_torch

    def __getattr__(self, name):
        return getattr(self._torch, name)


_STAND_IN = None


def _cpu_rng_get(device="cuda", clone=False, graph_safe=False):
    import torch

    return torch.get_rng_state()


def _cpu_rng_set(new_state, device=-1, graph_safe=False):
    import torch

    torch.set_rng_state(new_state)


def apply() -> int:
    """Redirect megatron-core's direct CUDA calls to the CPU; return how many modules changed.

    Idempotent and cheap: call it again after importing more of megatron-core (the engine does
    so before every model call), since modules imported later still hold the real torch.
    Raises ArealError where a GPU is present: there the workaround must not be used.
    """
    global _STAND_IN
    import torch

    if torch.cuda.is_available():
        raise ArealError(
            f"the megatron CPU mode is a workaround for machines without a GPU, but a GPU is "
            f"present; unset {ENV_VAR} and set actor.device to auto or cuda"
        )
    import megatron.core.tensor_parallel.random as mcore_random

    if _STAND_IN is None:
        _STAND_IN = _TorchForMegatron(torch)
    changed = 0
    for name, module in list(sys.modules.items()):
        if not name.startswith("megatron.core") or module is None:
            continue
        if getattr(module, "torch", None) is torch:
            module.torch = _STAND_IN
            changed += 1
    # random.py imported these helpers by name; they call torch.cuda's generators directly.
    if mcore_random._get_cuda_rng_state is not _cpu_rng_get:
        mcore_random._get_cuda_rng_state = _cpu_rng_get
        mcore_random._set_cuda_rng_state = _cpu_rng_set
        changed += 1
    return changed


def is_applied() -> bool:
    """Whether ``apply()`` ran in this process."""
    return _STAND_IN is not None
