import ctypes
import ctypes.util
import platform
import subprocess
import sys

import pytest

from areal_core.host_allocator import return_freed_tensors_to_the_system

is_glibc = platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not is_glibc, reason="mallopt tuning applies to glibc only")
def test_glibc_accepts_the_threshold():
    assert return_freed_tensors_to_the_system() is True


@pytest.mark.skipif(not is_glibc, reason="mallopt tuning applies to glibc only")
def test_freed_blocks_leave_the_resident_set():
    # Without the fixed threshold, a freed 8 MiB block after a bigger one stays on the heap.
    program = """
import ctypes, sys
from areal_core.host_allocator import return_freed_tensors_to_the_system
if sys.argv[1] == "tuned":
    return_freed_tensors_to_the_system()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
big = libc.malloc(16 << 20); libc.free(big)   # raises glibc's dynamic threshold to 16 MiB
blocks = [libc.malloc(8 << 20) for _ in range(8)]
for b in blocks: libc.memset(b, 1, 8 << 20)
keep = libc.malloc(4096)                      # pins the heap top
before = rss()
for b in blocks: libc.free(b)
print(before - rss())
"""
    given_back = {}
    for mode in ("default", "tuned"):
        out = subprocess.run([sys.executable, "-c", program, mode], capture_output=True, text=True, check=True)
        given_back[mode] = int(out.stdout)
    assert given_back["tuned"] >= 60 << 20
    assert given_back["default"] < given_back["tuned"]
