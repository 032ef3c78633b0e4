"""How the benchmark times: medians of calls taking turns, fresh processes, the machine."""

from __future__ import annotations

import concurrent.futures
import importlib.util
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax

from cae_jax import host_memory


def cores() -> int:
    return len(os.sched_getaffinity(0))


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
                        ) -> dict[str, float]:
    """Median wall time of each `fn()`, the functions taking turns repeat by repeat.

    Alternating keeps a change in the machine's load (a shared VM) from landing on one side
    of a ratio only. Each function first runs `warmup` untimed calls.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn()` over `repeats` calls after `warmup` untimed ones."""
    return interleaved_medians({"fn": fn}, repeats, warmup)["fn"]


def log(message: str) -> None:
    """Progress on stderr: a full run takes many minutes and prints its table only at the end."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine() -> dict:
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    info = {
        "cpu": cpu,
        "cores": cores(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": len(jax.devices()),
        "load_average": list(os.getloadavg()),
    }
    if importlib.util.find_spec("torch"):
        import torch

        info["torch"] = torch.__version__
    return info


def gflops(compiled) -> float:
    """Floating-point operations of one call of a compiled function, from XLA, in GFLOP."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", 0.0)) / 1e9


def in_fresh_process(fn: Callable, *args):
    """fn(*args) run in a new interpreter, for a timed row that must not inherit the heap the
    rows before it left: in one process, inference timed after the train-step row ran slower
    than before it, from the heap that row left (numbers: docs/benchmarks.md). The child gets
    this process's environment (so its huge pages) and `host_memory.retain_freed_memory`."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
            1, mp_context=context, initializer=host_memory.retain_freed_memory) as pool:
        return pool.submit(fn, *args).result()
