"""Micro-benchmarks: the machine's matmul peak, and single CAE layers in each `layer_impl`."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from cae_jax import ops
from cae_jax.bench import timing


def matmul_peak(n: int, repeats: int) -> dict:
    """GFLOP/s of an n x n float32 matmul: the machine's practical peak for the ratios below."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    seconds = timing.median_seconds(lambda: matmul(a, a).block_until_ready(), repeats)
    return {"size": n, "seconds": seconds, "gflops_per_s": 2 * n**3 / seconds / 1e9}


def conv_by_impl(x: jax.Array, kernel: jax.Array, impl: str) -> jax.Array:
    """A stride-1 "VALID" conv in the form an nnx.Conv of its shape runs."""
    size, _, in_features, out_features = kernel.shape
    conv = ops.conv_fn(impl, in_features, out_features, size, 1)
    return conv(x, kernel, (1, 1), "VALID", dimension_numbers=ops.native.DIMS)


def layer_cases(scale: int) -> list[tuple[str, list[tuple[int, ...]], Callable]]:
    """Layers of the full-size CAE at batch 8: (name, argument shapes, fn(*args, impl)).

    `scale` divides spatial sizes and widths (smoke runs).
    """
    c32, c64, c128, c256, c512, c728, c2048 = (
        c // scale for c in (32, 64, 128, 256, 512, 728, 2048))
    s10, s37, s74, s147, s149 = (max(s // scale, 1) for s in (10, 37, 74, 147, 149))
    return [
        ("depthwise 3x3", [(8, s37, s37, c728), (3, 3, 1, c728)], ops.depthwise_conv3x3),
        ("pointwise 1x1 conv", [(8, s74, s74, c128), (1, 1, c128, c256)], conv_by_impl),
        ("3x3 conv (stem conv2)", [(8, s149, s149, c32), (3, 3, c32, c64)], conv_by_impl),
        ("transposed conv 4x4/2", [(8, s10, s10, c2048), (4, 4, c2048, c512)],
         lambda x, k, impl: ops.conv_transpose(x, k, 2, impl)),
        ("max-pool 3x3/2", [(8, s147, s147, c128)],
         lambda x, impl: ops.max_pool3x3(x, 2, "torch", impl)),
    ]


def layer_impls(scale: int, repeats: int) -> list[dict]:
    """Forward and gradient (all inputs) seconds per layer, native vs decomposed."""
    results = []
    for name, shapes, fn in layer_cases(scale):
        args = [jax.random.normal(jax.random.key(i), s) * 0.05 for i, s in enumerate(shapes)]
        result = {"layer": name, "shapes": [list(s) for s in shapes]}
        for impl in ("native", "decomposed"):
            fwd = jax.jit(lambda *a, impl=impl, fn=fn: fn(*a, impl))
            grad = jax.jit(jax.grad(lambda *a, impl=impl, fn=fn: jnp.sum(fn(*a, impl) ** 2),
                                    argnums=tuple(range(len(args)))))
            result[impl] = {
                "forward_s": timing.median_seconds(
                    lambda f=fwd, a=args: jax.block_until_ready(f(*a)), repeats),
                "gradient_s": timing.median_seconds(
                    lambda g=grad, a=args: jax.block_until_ready(g(*a)), repeats),
            }
        results.append(result)
    return results
