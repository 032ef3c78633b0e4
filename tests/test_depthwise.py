"""The shifted depthwise 3x3 equals XLA's grouped convolution, in values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cae_jax import models


def _loss(impl):
    def loss(x, kernel, cotangent):
        return jnp.sum(models.depthwise_conv3x3(x, kernel, impl) * cotangent)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))


@pytest.mark.parametrize("shape", [(2, 9, 9, 5), (1, 7, 12, 3), (3, 1, 1, 4), (2, 37, 37, 16)])
def test_shifted_matches_native_values_and_gradients(shape):
    kx, kk, kc = jax.random.split(jax.random.key(sum(shape)), 3)
    x = jax.random.normal(kx, shape)
    kernel = jax.random.normal(kk, (3, 3, 1, shape[-1]))
    cotangent = jax.random.normal(kc, shape)

    native = models.depthwise_conv3x3(x, kernel, "native")
    shifted = models.depthwise_conv3x3(x, kernel, "shifted")
    assert shifted.shape == native.shape == shape
    np.testing.assert_allclose(shifted, native, rtol=1e-5, atol=1e-5)

    grads_native = _loss("native")(x, kernel, cotangent)
    grads_shifted = _loss("shifted")(x, kernel, cotangent)
    for g_shifted, g_native in zip(grads_shifted, grads_native, strict=True):
        np.testing.assert_allclose(g_shifted, g_native, rtol=1e-4, atol=1e-4)


def test_shifted_matches_a_direct_numpy_loop():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 4, 5, 2)).astype(np.float32)
    kernel = rng.normal(size=(3, 3, 1, 2)).astype(np.float32)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    expected = np.zeros_like(x)
    for r in range(4):
        for c in range(5):
            expected[0, r, c] = np.einsum("ijc,ijc->c", padded[0, r : r + 3, c : c + 3],
                                          kernel[:, :, 0])
    np.testing.assert_allclose(models.depthwise_conv3x3(x, kernel, "shifted"), expected,
                               rtol=1e-5, atol=1e-5)


def test_bfloat16_shifted_stays_close_to_float32():
    x = jax.random.normal(jax.random.key(1), (2, 10, 10, 8))
    kernel = jax.random.normal(jax.random.key(2), (3, 3, 1, 8))
    full = models.depthwise_conv3x3(x, kernel, "native")
    half = models.depthwise_conv3x3(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16),
                                    "shifted")
    assert half.dtype == jnp.bfloat16
    np.testing.assert_allclose(half.astype(jnp.float32), full, rtol=0.05, atol=0.1)


def test_auto_picks_shifted_on_cpu_and_rejects_unknown_names():
    assert jax.default_backend() == "cpu"
    assert models.resolve_depthwise_impl("auto") == "shifted"
    assert models.resolve_depthwise_impl("native") == "native"
    with pytest.raises(ValueError, match="depthwise_impl must be auto, shifted or native"):
        models.resolve_depthwise_impl("fast")
