"""Tests see 8 virtual CPU devices, so sharding tests run on any machine. The suite is mostly
compiling small programs, so XLA:CPU compiles them the quick way: without LLVM's optimization
passes (`--xla_backend_optimization_level=0`, a third off a tiny train step's compile) and,
where jaxlib still has them, with its older loop emitters for fusions
(`--xla_cpu_use_fusion_emitters=false`, half of what is left: 8 s to 4 s; removed in jaxlib
0.11.1, where an unknown flag aborts the process). Both change how XLA:CPU generates code, not
the HLO it runs, and every process of a test (subprocesses inherit them) compiles the same way.
`test_conftest.py` checks that the running XLA knows each flag."""

import os
from importlib import metadata


def _version(package: str) -> tuple[int, ...]:
    return tuple(int(part) for part in metadata.version(package).split(".")[:3] if part.isdigit())


FAST_COMPILE_FLAGS = ["--xla_backend_optimization_level=0"]
if _version("jaxlib") < (0, 11, 1):
    FAST_COMPILE_FLAGS.append("--xla_cpu_use_fusion_emitters=false")
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8",
     *FAST_COMPILE_FLAGS]).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compiled programs are reused across tests and the subprocesses they start.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "jax-compilation-cache"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402

# With the `bench` extra installed, timm loads triton (through torchvision), whose native
# library segfaults when it loads after TensorFlow's, as it would once an earlier test has
# imported TensorFlow. Loading it first avoids that.
if importlib.util.find_spec("triton"):
    import triton  # noqa: E402, F401

import pytest  # noqa: E402

FFPP_MINI = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "ffpp_mini"


@pytest.fixture
def ffpp_mini() -> Path:
    """The five real FF++ c23 clips beside the repository; skipped where absent."""
    if not FFPP_MINI.is_dir():
        pytest.skip(f"{FFPP_MINI} not present")
    return FFPP_MINI


# Files of a minute or more of the suite (`--durations`), started first: with `--dist
# loadfile` a long file handed out last keeps one process busy while the other idles.
LONG_FILES = ("test_train.py", "test_export.py", "test_device_augment.py", "test_train_step.py",
              "test_bench_accelerator.py", "test_platforms.py", "test_deepfakebench_weights.py",
              "test_ops.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))
