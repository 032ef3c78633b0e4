"""The compiled CPU kernels (depthwise kernel gradient, im2col): values against numpy and the
XLA forms, under a sharded batch, inside the layers' gradients; the build cache and the
fallback."""

import os
import shutil
import stat
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cae_jax import ops, sharding
from cae_jax.ops import cpu, cpu_kernels, native

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
    np.testing.assert_allclose(got, cpu._kernel_grad_by_reductions(x, grad), rtol=1e-5,
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
        return jnp.sum(jnp.sin(ops.depthwise_conv3x3(x, kernel, impl)))

    decomposed = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    assert "cae_jax_depthwise_kernel_grad" in decomposed.lower(x, kernel, "decomposed").as_text()
    for got, want in zip(decomposed(x, kernel, "decomposed"),
                         jax.grad(loss, argnums=(0, 1))(x, kernel, "native"), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def numpy_im2col(x, kernel_size, strides, pads):
    """The definition: pixel (i, j), tap (a, b) holds x[sh * i + a - ph, sw * j + b - pw]."""
    (kh, kw), (sh, sw), ((ph, ph_hi), (pw, pw_hi)) = kernel_size, strides, pads
    n, h, w, c = x.shape
    oh, ow = (h + ph + ph_hi - kh) // sh + 1, (w + pw + pw_hi - kw) // sw + 1
    out = np.zeros((n, oh, ow, kh, kw, c), x.dtype)
    for i in range(oh):
        for j in range(ow):
            for a in range(kh):
                for b in range(kw):
                    r, q = sh * i + a - ph, sw * j + b - pw
                    if 0 <= r < h and 0 <= q < w:
                        out[:, i, j, a, b] = x[:, r, q]
    return out.reshape(n, oh, ow, kh * kw * c)


# The stem convs (3x3, stride 2 and 1, 3 and 32 channels), the transposed-conv gradients
# (4x4 stride 2 padded (1, 2); 4x4 stride 3 with a cropping high pad), 1x1 stride 2, one-pixel
# inputs.
GEOMETRIES = [((3, 3), (2, 2), ((0, 0), (0, 0)), (2, 15, 13, 3)),
              ((3, 3), (1, 1), ((1, 1), (1, 1)), (1, 9, 8, 32)),
              ((4, 4), (2, 2), ((1, 2), (1, 2)), (2, 10, 12, 5)),
              ((4, 4), (3, 3), ((2, -1), (3, 0)), (1, 11, 13, 4)),
              ((1, 1), (2, 2), ((0, 0), (0, 0)), (3, 7, 6, 7)),
              ((3, 3), (1, 1), ((1, 1), (1, 1)), (2, 1, 1, 6))]


@pytest.mark.parametrize(("kernel_size", "strides", "pads", "shape"), GEOMETRIES)
def test_im2col_matches_numpy_and_the_slicing_form(kernel_size, strides, pads, shape):
    x = jax.random.normal(jax.random.key(shape[1]), shape)
    fastest = jax.jit(cpu._im2col_fastest, static_argnums=(1, 2, 3))
    got = fastest(x, kernel_size, strides, pads)
    want = numpy_im2col(np.asarray(x), kernel_size, strides, pads)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(cpu.im2col(x, kernel_size, strides, pads), want)
    if kernel_size != (1, 1):
        assert "cae_jax_im2col" in fastest.lower(x, kernel_size, strides, pads).as_text()
    cotangent = jax.random.normal(jax.random.key(7), got.shape)
    grads = [jax.grad(lambda x, f=f: jnp.sum(f(x, kernel_size, strides, pads) * cotangent))(x)
             for f in (cpu.im2col, cpu._im2col_by_slices)]
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-6, atol=1e-6)


def test_im2col_takes_the_kernel_only_when_differentiated():
    """Inference (and so every exported program) stays plain XLA; training gets the kernel."""
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))

    def cols(x):
        return cpu.im2col(x, (3, 3), (1, 1), ((1, 1), (1, 1)))

    assert "custom_call" not in jax.jit(cols).lower(x).as_text()
    assert "cae_jax_im2col" in jax.jit(jax.grad(lambda x: jnp.sum(cols(x) ** 2))).lower(
        x).as_text()


def test_im2col_same_result_with_the_batch_sharded_over_8_devices():
    x = jax.random.normal(jax.random.key(0), (8, 9, 9, 6))
    fn = jax.jit(lambda x: cpu._im2col_fastest(x, (3, 3), (2, 2), ((1, 1), (1, 1))))
    sharded = fn(jax.device_put(x, sharding.batch_sharding(sharding.make_mesh(4, 2))))
    np.testing.assert_array_equal(sharded, fn(x))


def test_conv_and_transposed_conv_gradients_take_im2col_and_match_native():
    x = jax.random.normal(jax.random.key(4), (2, 9, 9, 8))
    conv_kernel = jax.random.normal(jax.random.key(5), (3, 3, 8, 8)) * 0.2
    up_kernel = jax.random.normal(jax.random.key(6), (4, 4, 8, 5)) * 0.2

    def loss(x, conv_kernel, up_kernel, impl):
        conv = cpu.conv_as_matmul if impl == "decomposed" else jax.lax.conv_general_dilated
        y = conv(x, conv_kernel, (2, 2), "SAME", dimension_numbers=native.DIMS)
        return jnp.sum(jnp.sin(ops.conv_transpose(y, up_kernel, 2, impl)))

    decomposed = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    program = decomposed.lower(x, conv_kernel, up_kernel, "decomposed").as_text()
    assert program.count("cae_jax_im2col") == 2  # conv forward, transposed conv backward
    for got, want in zip(decomposed(x, conv_kernel, up_kernel, "decomposed"),
                         jax.grad(loss, argnums=(0, 1, 2))(x, conv_kernel, up_kernel, "native"),
                         strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))


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
    """CAE_JAX_CPU_KERNELS=0 (or no compiler): no custom call, the same values."""
    program = (
        "import jax, jax.numpy as jnp\n"
        "from cae_jax.ops import cpu\n"
        "x = jax.random.normal(jax.random.key(0), (2, 7, 7, 20))\n"
        "g = jax.random.normal(jax.random.key(1), x.shape)\n"
        "print(jax.jit(cpu.depthwise_kernel_grad).lower(x, g).as_text().count('custom_call'))\n"
        "print(jax.numpy.abs(cpu.depthwise_kernel_grad(x, g)).sum())\n"
        "cols = jax.jit(lambda x: cpu._im2col_fastest(x, (3, 3), (1, 1), ((1, 1), (1, 1))))\n"
        "print(cols.lower(x).as_text().count('custom_call'))\n"
    )
    env = {**os.environ, "CAE_JAX_CPU_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    x = jax.random.normal(jax.random.key(0), (2, 7, 7, 20))
    grad = jax.random.normal(jax.random.key(1), x.shape)
    assert out[0] == out[2] == "0"
    np.testing.assert_allclose(float(out[1]),
                               float(jnp.abs(cpu_kernels.depthwise_kernel_grad(x, grad)).sum()),
                               rtol=1e-5)
