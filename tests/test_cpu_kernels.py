"""The compiled depthwise kernel gradient: values against numpy and XLA's reductions, under a
sharded batch, inside the layer's gradient; its build cache and its fallback."""

import os
import shutil
import stat
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cae_jax import cpu_kernels, models, sharding

pytestmark = pytest.mark.skipif(not shutil.which(os.environ.get("CXX", "c++")),
                                reason="no C++ compiler here")


def numpy_kernel_grad(x: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """The definition, in float64: tap (i, j) sums x[h + i - 1, w + j - 1] * grad[h, w]."""
    padded = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    _, h, w, c = x.shape
    out = np.zeros((3, 3, 1, c))
    for i in range(3):
        for j in range(3):
            out[i, j, 0] = np.einsum("nhwc,nhwc->c", padded[:, i : i + h, j : j + w], grad)
    return out


@pytest.mark.parametrize("shape", [(2, 9, 11, 20), (1, 1, 1, 3), (3, 1, 7, 17), (2, 6, 1, 33),
                                   (2, 2, 5, 16), (1, 4, 6, 40), (4, 19, 19, 48)])
def test_matches_numpy_and_xla_reductions(shape):
    """Odd sizes: rows and columns of one pixel, widths around the 4-pixel step, channels
    around the 16-lane blocks."""
    x = jax.random.normal(jax.random.key(shape[1]), shape)
    grad = jax.random.normal(jax.random.key(shape[2]), shape)
    got = jax.jit(cpu_kernels.depthwise_kernel_grad)(x, grad)
    assert got.shape == (3, 3, 1, shape[-1]) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, numpy_kernel_grad(np.asarray(x), np.asarray(grad)),
                               rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got, models._kernel_grad_by_reductions(x, grad), rtol=1e-5,
                               atol=1e-4)


def test_same_result_with_the_batch_sharded_over_8_devices():
    x = jax.random.normal(jax.random.key(0), (8, 10, 9, 24))
    grad = jax.random.normal(jax.random.key(1), x.shape)
    mesh = sharding.make_mesh(4, 2)
    fn = jax.jit(cpu_kernels.depthwise_kernel_grad)
    sharded = fn(*(jax.device_put(a, sharding.batch_sharding(mesh)) for a in (x, grad)))
    np.testing.assert_allclose(sharded, fn(x, grad), rtol=1e-6, atol=1e-5)


def test_layer_gradient_takes_the_kernel_and_matches_native():
    x = jax.random.normal(jax.random.key(2), (2, 13, 13, 40))
    kernel = jax.random.normal(jax.random.key(3), (3, 3, 1, 40))

    def loss(x, kernel, impl):
        return jnp.sum(jnp.sin(models.depthwise_conv3x3(x, kernel, impl)))

    decomposed = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    assert cpu_kernels.TARGET in decomposed.lower(x, kernel, "decomposed").as_text()
    for got, want in zip(decomposed(x, kernel, "decomposed"),
                         jax.grad(loss, argnums=(0, 1))(x, kernel, "native"), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_a_second_build_reuses_the_cached_library(tmp_path, monkeypatch):
    monkeypatch.setenv("CAE_JAX_CACHE", str(tmp_path))
    library = cpu_kernels.build()
    assert library.parent == tmp_path and library.suffix == ".so"
    built = library.stat().st_mtime_ns
    assert cpu_kernels.build() == library and library.stat().st_mtime_ns == built
    assert list(tmp_path.iterdir()) == [library]


def test_failed_build_names_the_problem_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("CAE_JAX_CACHE", str(tmp_path / "cache"))
    with pytest.raises(OSError, match="no C.. compiler 'no-such-c\\+\\+'"):
        cpu_kernels.build("no-such-c++")
    # A compiler that writes half a library, then fails.
    broken = tmp_path / "broken-c++"
    broken.write_text('#!/bin/sh\nfor a; do out=$a; done\necho partial > "$out"\n'
                      'echo "error: out of memory" >&2\nexit 1\n')
    broken.chmod(broken.stat().st_mode | stat.S_IEXEC)
    with pytest.raises(OSError, match="error: out of memory"):
        cpu_kernels.build(str(broken))
    assert list((tmp_path / "cache").iterdir()) == []


def test_without_kernels_the_layer_falls_back_to_xla():
    """CAE_JAX_CPU_KERNELS=0 (or no compiler): no custom call, the same gradient."""
    program = (
        "import jax, jax.numpy as jnp\n"
        "from cae_jax import models\n"
        "x = jax.random.normal(jax.random.key(0), (2, 7, 7, 20))\n"
        "g = jax.random.normal(jax.random.key(1), x.shape)\n"
        "print(jax.jit(models.depthwise_kernel_grad).lower(x, g).as_text().count('custom_call'))\n"
        "print(jax.numpy.abs(models.depthwise_kernel_grad(x, g)).sum())\n"
    )
    env = {**os.environ, "CAE_JAX_CPU_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    x = jax.random.normal(jax.random.key(0), (2, 7, 7, 20))
    grad = jax.random.normal(jax.random.key(1), x.shape)
    assert out[0] == "0"
    np.testing.assert_allclose(float(out[1]),
                               float(jnp.abs(cpu_kernels.depthwise_kernel_grad(x, grad)).sum()),
                               rtol=1e-5)
