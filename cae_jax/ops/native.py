"""XLA's own layer ops: what GPUs and TPUs run, and the reference every CPU form matches."""

from __future__ import annotations

import jax
import jax.numpy as jnp

DIMS = ("NHWC", "HWIO", "NHWC")


def depthwise_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """3x3 depthwise convolution, stride 1, 'SAME' padding; kernel [3, 3, 1, C]."""
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=DIMS, feature_group_count=x.shape[-1])


def conv_transpose(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """Transposed convolution with "SAME" padding, as nnx.ConvTranspose; kernel [k, k, in, out]."""
    return jax.lax.conv_transpose(x, kernel, (stride, stride), "SAME", dimension_numbers=DIMS)


def max_pool3x3(x: jax.Array, stride: int, pads: tuple[tuple[int, int], ...]) -> jax.Array:
    """3x3 max-pool over NHWC with explicit spatial `pads` ((low, high) per axis)."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1),
                                 ((0, 0), *pads, (0, 0)))


def batch_norm_parts(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float):
    """(y, mean, var, 1 / std, unclipped var) of train-mode BatchNorm over all but the channel
    axis, in float32, the variance as E[x^2] - E[x]^2 clipped at 0 (flax's fast variance)."""
    axes = tuple(range(x.ndim - 1))
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=axes)
    raw_var = jnp.mean(x32 * x32, axis=axes) - mean * mean
    var = jnp.maximum(raw_var, 0.0)
    rstd = jax.lax.rsqrt(var + epsilon)
    y = ((x32 - mean) * (rstd * scale) + bias).astype(x.dtype)
    return y, mean, var, rstd, raw_var


def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(y, batch mean, batch variance) of train-mode BatchNorm, as nnx.BatchNorm computes them;
    differentiated by autodiff."""
    return batch_norm_parts(x, scale, bias, epsilon)[:3]
