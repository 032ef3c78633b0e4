"""CPU only: how a bundle's serving functions run on XLA:CPU (`serving.jit_serving`, the Predictor
of `predict`, `evaluate` and the demo). GPUs and TPUs run them as plain `jax.jit`; exported
artifacts hold neither tuning (any batch in one go).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

# On the CPU, inference compiles its matrix products to XLA's own GEMM instead of YNNPACK,
# which runs classify's products slower at large batches. Training keeps YNNPACK, whose
# reductions its BatchNorm gradients need: without them the train step is far slower.
# Numbers: docs/benchmarks.md#measurements-behind-the-cpu-choices.
SERVING_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}

# On the CPU a batch runs through the model this many faces at a time (`lax.map` in one
# program): XLA's memory-bound passes (depthwise sums, BatchNorm, padding) then work on
# activations that stay in cache instead of streaming a whole batch's through memory.
CHUNK = 8


def _in_chunks(fn: Callable, chunk: int, weights, images: jax.Array):
    """fn(weights, images) computed `chunk` images at a time, the last chunk zero-padded."""
    count = images.shape[0]
    if count <= chunk:
        return fn(weights, images)
    chunks = -(-count // chunk)
    padded = jnp.pad(images, ((0, chunks * chunk - count), (0, 0), (0, 0), (0, 0)))
    out = jax.lax.map(lambda part: fn(weights, part),
                      padded.reshape(chunks, chunk, *images.shape[1:]))
    return jax.tree.map(lambda a: a.reshape(chunks * chunk, *a.shape[2:])[:count], out)


def jit(fn: Callable) -> Callable:
    """`jax.jit` of `fn(weights, images)` with `SERVING_OPTIONS`, in chunks of `CHUNK` faces."""
    return jax.jit(functools.partial(_in_chunks, fn, CHUNK), compiler_options=SERVING_OPTIONS)
