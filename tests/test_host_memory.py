"""retain_freed_memory: a freed large buffer is reused, not faulted in again page by page."""

import subprocess
import sys

import pytest

from cae_jax import host_memory

# Mallocs, fills and frees a 256 MB buffer ten times (as XLA:CPU does its activation buffers),
# then prints the page faults of the last nine rounds.
PROGRAM = """
import ctypes, resource, sys
from cae_jax import host_memory
if sys.argv[1] == "retain":
    assert host_memory.retain_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 256 << 20

def fill_and_free():
    buffer = libc.malloc(size)
    ctypes.memset(buffer, 1, size)
    libc.free(buffer)

fill_and_free()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(9):
    fill_and_free()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True,
                         check=True)
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
def test_freed_large_buffers_are_reused_without_page_faults():
    pages = 9 * (256 << 20) // 4096
    assert page_faults("default") > pages // 2  # Each buffer mmapped and faulted in anew.
    assert page_faults("retain") < pages // 100


def test_reports_whether_it_applied():
    assert host_memory.retain_freed_memory() is sys.platform.startswith("linux")
