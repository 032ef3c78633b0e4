"""CPU kernels XLA:CPU has no fast form of, as XLA FFI custom calls.

`cpu_kernels.cc` is compiled on first use with the machine's C++ compiler (`$CXX`, else
`c++`) against the FFI headers that ship in jaxlib, for this CPU (`-march=native`), and cached
under `$CAE_JAX_CACHE` (default `~/.cache/cae_jax`), keyed by source, flags, jaxlib version and
CPU. Where that fails (no compiler, say) the callers keep their pure-XLA form and one warning
says why; `CAE_JAX_CPU_KERNELS=0` turns the kernels off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

SOURCE = Path(__file__).with_name("cpu_kernels.cc")
TARGETS = {"cae_jax_depthwise_kernel_grad": "CaeDepthwiseKernelGrad", "cae_jax_im2col": "CaeIm2col"}
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cae_jax"
    return Path(os.environ.get("CAE_JAX_CACHE", default))


def _cpu_signature() -> str:
    """What -march=native compiles for: the CPU model and feature flags."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return platform.processor()
    lines = cpuinfo.read_text().splitlines()
    return "\n".join(next((ln for ln in lines if ln.startswith(key)), "")
                     for key in ("model name", "flags"))


def build(compiler: str | None = None) -> Path:
    """The compiled kernel library, built unless cached; raises with the compiler's message."""
    compiler = compiler or os.environ.get("CXX", "c++")
    if not shutil.which(compiler):
        raise OSError(f"no C++ compiler {compiler!r} on PATH")
    command = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE)]
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *command, jaxlib.__version__,
                                    _cpu_signature()]).encode()).hexdigest()[:16]
    library = cache_dir() / f"{SOURCE.stem}-{key}.so"
    if library.is_file():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    # Written under a temporary name and renamed: concurrent builds never load a partial file.
    fd, partial = tempfile.mkstemp(suffix=".so", dir=library.parent)
    os.close(fd)
    try:
        done = subprocess.run([*command, "-o", partial], capture_output=True, text=True)
        if done.returncode:
            raise OSError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
        os.replace(partial, library)
    finally:
        Path(partial).unlink(missing_ok=True)
    return library


@functools.cache
def available() -> bool:
    """Builds and registers the kernels once per process; False (with a warning) where not."""
    if os.environ.get("CAE_JAX_CPU_KERNELS", "1") == "0":
        return False
    try:
        library = ctypes.cdll.LoadLibrary(str(build()))
    except OSError as error:
        warnings.warn(f"cae-jax CPU kernels unavailable, using XLA's forms instead: {error}",
                      stacklevel=2)
        return False
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                    platform="cpu")
    return True


def _require() -> None:
    if not available():
        raise RuntimeError("cae-jax CPU kernels are unavailable (see the warning above)")


def depthwise_kernel_grad(x: jax.Array, grad: jax.Array) -> jax.Array:
    """Kernel gradient [3, 3, 1, C] of a 3x3 'SAME' depthwise conv from its float32 input and
    output gradient [N, H, W, C]: one pass over both, instead of nine windows and reductions.
    """
    _require()
    per_example = jax.ffi.ffi_call(
        "cae_jax_depthwise_kernel_grad",
        jax.ShapeDtypeStruct((x.shape[0], 9, x.shape[-1]), jnp.float32),
        vmap_method="sequential")(x, grad)
    return per_example.sum(axis=0).reshape(3, 3, 1, x.shape[-1])


def im2col(x: jax.Array, kernel_size: tuple[int, int], strides: tuple[int, int],
           pads_low: tuple[int, int], out_size: tuple[int, int]) -> jax.Array:
    """[N, OH, OW, kh * kw * C] from float32 x [N, H, W, C]: output pixel (i, j) holds
    x[sh * i + a - ph, sw * j + b - pw] for taps (a, b) in row-major order, zero outside x.
    One pass; XLA:CPU copies each tap's window and then concatenates them."""
    _require()
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, strides, pads_low
    shape = (x.shape[0], *out_size, kh * kw * x.shape[-1])
    return jax.ffi.ffi_call("cae_jax_im2col", jax.ShapeDtypeStruct(shape, jnp.float32),
                            vmap_method="sequential")(
        x, kh=np.int64(kh), kw=np.int64(kw), sh=np.int64(sh), sw=np.int64(sw),
        ph=np.int64(ph), pw=np.int64(pw))
