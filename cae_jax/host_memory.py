"""CPU runs only: keep freed host memory in the process, and glibc's heap on huge pages.

Both help XLA:CPU training, where activations live in host memory; on a GPU or TPU they live
on the device, so `cae-jax` tunes the heap only for the commands that train or time training
(`main.HEAP_TUNED_COMMANDS`) and only where JAX will run on the CPU (`cpu_backend_expected`).

An XLA:CPU train step allocates and frees gigabytes of activation buffers. By default glibc
serves each allocation above its mmap threshold (at most 32 MB) with a fresh mmap, unmaps it
on free, and gives each thread its own arena; so every step faults its buffers back in page
by page, and the kernel's fault handling takes over half the step. Served from one heap that
never shrinks, the step takes no page faults. The cost is that the process keeps its peak
host memory.

The heap's 4 KB pages are a second cost: walking gigabytes of activations misses the TLB at
every page. glibc puts its heap on transparent huge pages (2 MB) when started with the tunable
`glibc.malloc.hugetlb=1`; it reads tunables only at process start, so the `cae-jax` command
restarts itself once with it (`restart_with_huge_pages`).

Numbers: docs/benchmarks.md#measurements-behind-the-cpu-choices.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import platform
import sys
from pathlib import Path

# mallopt(3) parameters, from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
HUGE_PAGES = "glibc.malloc.hugetlb=1"
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
# Packages that give JAX a GPU or TPU backend (jax[cuda12], jax[cuda13], jax[tpu], ROCm).
ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu", "jax_rocm60_plugin",
                       "jax_rocm7_plugin")


def cpu_backend_expected(environ: dict[str, str] | None = None) -> bool:
    """Whether JAX will pick the CPU, told before JAX starts: `JAX_PLATFORMS` says so, or no
    GPU or TPU plugin is installed."""
    environ = os.environ if environ is None else environ
    if environ.get("JAX_PLATFORMS"):
        return environ["JAX_PLATFORMS"].split(",")[0].strip() == "cpu"
    return not any(importlib.util.find_spec(name) for name in ACCELERATOR_PLUGINS)


def retain_freed_memory() -> bool:
    """One malloc arena, no mmap per large allocation, no trimming; False where not glibc.

    Call it early, before JAX starts its threads: a thread keeps the arena it first used.
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # Not glibc (macOS, musl): nothing to tune.
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; -1 for M_TRIM_THRESHOLD means "never trim".
    return all(mallopt(param, value) == 1
               for param, value in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)))


def restart_with_huge_pages() -> None:
    """Re-executes this process (same pid, argv and environment) with glibc's heap on
    transparent huge pages; returns at once where it is on them already, where glibc or the
    kernel's transparent huge pages are missing, or with CAE_JAX_HUGE_PAGES=0."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if (HUGE_PAGES in tunables or os.environ.get("CAE_JAX_HUGE_PAGES") == "0"
            or platform.libc_ver()[0] != "glibc" or not THP_SETTING.is_file()
            or "[never]" in THP_SETTING.read_text()):
        return
    env = {**os.environ, "GLIBC_TUNABLES": ":".join(filter(None, (tunables, HUGE_PAGES)))}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
