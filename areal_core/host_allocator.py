"""Keep a CPU training process's resident memory close to what its tensors really use.

glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), so after the
first step most activation-sized tensors come from the heap, whose freed holes are kept as
resident memory: measured on a 125M-parameter LoRA step on CPU, 0.5 GB per rank of RSS above
what was live. A fixed threshold makes every tensor of 1 MiB or more its own mapping, given
back to the system when freed. No effect (and no error) where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
MMAP_THRESHOLD_BYTES = 1 << 20


@functools.lru_cache(maxsize=None)
def return_freed_tensors_to_the_system() -> bool:
    """Set glibc's mmap threshold to 1 MiB (fixed); True when glibc accepted it."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
