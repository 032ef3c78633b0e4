"""retain_freed_memory: a freed large buffer is reused, not faulted in again page by page."""

import os
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


# Restarts on huge pages, fills a 256 MB malloc buffer, prints GLIBC_TUNABLES and the kB of
# the process's memory on transparent huge pages.
HUGE_PAGES_PROGRAM = """
import ctypes, os, re
from cae_jax import host_memory
host_memory.restart_with_huge_pages()
host_memory.retain_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
ctypes.memset(libc.malloc(256 << 20), 1, 256 << 20)
rollup = open("/proc/self/smaps_rollup").read()
print(os.environ.get("GLIBC_TUNABLES", "-"), re.search(r"AnonHugePages:\\s+(\\d+)", rollup)[1])
"""


def huge_page_kb(**env: str) -> tuple[str, int]:
    env = {**{k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}, **env}
    out = subprocess.run([sys.executable, "-c", HUGE_PAGES_PROGRAM], env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not host_memory.THP_SETTING.is_file()
                    or "[never]" in host_memory.THP_SETTING.read_text(),
                    reason="no transparent huge pages")
def test_restart_puts_the_heap_on_huge_pages():
    tunables, kb = huge_page_kb()
    assert tunables == host_memory.HUGE_PAGES
    assert kb >= 128 << 10  # At least half of the 256 MB buffer.
    tunables, kb = huge_page_kb(CAE_JAX_HUGE_PAGES="0")
    assert tunables == "-"
    if "[madvise]" in host_memory.THP_SETTING.read_text():  # Huge pages only where asked for.
        assert kb == 0
    # Tunables a user set are kept beside it.
    tunables, kb = huge_page_kb(GLIBC_TUNABLES="glibc.malloc.tcache_count=0")
    assert tunables == f"glibc.malloc.tcache_count=0:{host_memory.HUGE_PAGES}" and kb >= 128 << 10


def test_cpu_backend_expected_from_jax_platforms_or_installed_plugins(monkeypatch):
    assert host_memory.cpu_backend_expected({"JAX_PLATFORMS": "cpu"})
    assert not host_memory.cpu_backend_expected({"JAX_PLATFORMS": "cuda,cpu"})
    assert not host_memory.cpu_backend_expected({"JAX_PLATFORMS": "tpu"})
    # The compile extras install libtpu and the CUDA plugin here: names stand in for them.
    monkeypatch.setattr(host_memory, "ACCELERATOR_PLUGINS", ("cae_jax_no_such_plugin",))
    assert host_memory.cpu_backend_expected({})
    monkeypatch.setattr(host_memory, "ACCELERATOR_PLUGINS", ("json",))  # An installed name.
    assert not host_memory.cpu_backend_expected({})


# Prints the heap tuning the `cae-jax` console script chose for a command, then stops.
CLI_PROGRAM = """
import os, sys
from cae_jax import host_memory, main
host_memory.os.execve = lambda *a: print("restart", flush=True) or sys.exit(0)
sys.argv = ["cae-jax", *sys.argv[1:], "--help"]
main.cli()
"""


@pytest.mark.parametrize(("command", "jax_platforms", "restarts"),
                         [("train", "cpu", True), ("bench", "cpu", True), ("demo", "cpu", True),
                          ("train", "cuda", False), ("export", "cpu", False),
                          ("predict", "cpu", False)])
def test_only_cpu_training_commands_tune_the_heap(command, jax_platforms, restarts):
    env = {**{k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES",
                                                               "CAE_JAX_HUGE_PAGES")},
           "JAX_PLATFORMS": jax_platforms}
    out = subprocess.run([sys.executable, "-c", CLI_PROGRAM, command], env=env,
                         capture_output=True, text=True)
    thp = host_memory.THP_SETTING.is_file() and "[never]" not in host_memory.THP_SETTING.read_text()
    assert (out.stdout.startswith("restart")) == (restarts and thp), out.stderr[-2000:]
    out = subprocess.run([sys.executable, "-c", CLI_PROGRAM, command],
                         env={**env, "CAE_JAX_HUGE_PAGES": "0"}, capture_output=True, text=True)
    assert "restart" not in out.stdout
    assert (f"cae-jax {command}: CPU run, freed host memory kept" in out.stderr) == restarts
