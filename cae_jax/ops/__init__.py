"""The layer ops the model asks for, each in the form that runs fast where its program runs.

`model.layer_impl` picks the form of conv, depthwise conv, transposed conv, max-pool and
BatchNorm's training statistics:

  "auto"        chosen when the program is lowered (`jax.lax.platform_dependent`): the forms
                of `cpu.py` for the CPU, XLA's native ops (`native.py`) for GPUs and TPUs. A
                program lowered for several platforms at once (an exported bundle) holds each
                platform's own form, and nothing of the CPU's reaches the others.
  "decomposed"  the CPU forms on every platform (their compiled kernels only on the CPU).
  "native"      XLA's ops on every platform.

All three give the same values from the same parameters.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax

from cae_jax.ops import cpu, native


def _by_platform(impl: str, cpu_form: Callable, native_form: Callable, *args: jax.Array):
    if impl == "auto":  # config.RULES holds the choices (model.layer_impl).
        return jax.lax.platform_dependent(*args, cpu=cpu_form, default=native_form)
    return (cpu_form if impl == "decomposed" else native_form)(*args)


@functools.cache
def conv_fn(impl: str, in_features: int, out_features: int, kernel_size: int, stride: int
            ) -> Callable:
    """A `conv_general_dilated` for an nnx.Conv of this shape (one function per shape, so
    models built twice have equal graphs)."""
    cpu_conv = cpu.conv_fn(in_features, out_features, kernel_size, stride)

    def conv_general_dilated(lhs, rhs, window_strides, padding, **options):
        forms = [functools.partial(f, window_strides=window_strides, padding=padding, **options)
                 for f in (cpu_conv, jax.lax.conv_general_dilated)]
        return _by_platform(impl, *forms, lhs, rhs)

    return conv_general_dilated


def depthwise_conv3x3(x: jax.Array, kernel: jax.Array, impl: str) -> jax.Array:
    """3x3 depthwise convolution, stride 1, 'SAME' padding; kernel [3, 3, 1, C]."""
    return _by_platform(impl, cpu.depthwise_conv3x3, native.depthwise_conv3x3, x, kernel)


def conv_transpose(x: jax.Array, kernel: jax.Array, stride: int, impl: str) -> jax.Array:
    """Transposed convolution with "SAME" padding, as nnx.ConvTranspose; kernel [k, k, in, out]."""
    return _by_platform(impl, functools.partial(cpu.conv_transpose, stride=stride),
                        functools.partial(native.conv_transpose, stride=stride), x, kernel)


def max_pool3x3(x: jax.Array, stride: int, padding: str, impl: str) -> jax.Array:
    """3x3 max-pool; "torch" pads 1 on every side, "same" pads as TF (extra pad at the end)."""
    if padding == "torch":
        pads = ((1, 1), (1, 1))
    else:  # "same"; config.RULES admits no other.
        pads = tuple(jax.lax.padtype_to_pads(x.shape[1:3], (3, 3), (stride, stride), "SAME"))
    return _by_platform(impl, functools.partial(cpu.max_pool3x3, stride=stride, pads=pads),
                        functools.partial(native.max_pool3x3, stride=stride, pads=pads), x)


def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, impl: str
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(y, batch mean, batch variance) of train-mode BatchNorm over all but the channel axis."""
    return _by_platform(impl, functools.partial(cpu.batch_norm_train, epsilon=epsilon),
                        functools.partial(native.batch_norm_train, epsilon=epsilon),
                        x, scale, bias)
