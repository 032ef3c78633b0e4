"""Layer forms that XLA:CPU runs fast: what `model.layer_impl` "auto" lowers for the CPU.

XLA:CPU's own convolution, grouped convolution, transposed convolution, select-and-scatter and
their gradients are several times slower than the same math as matrix products and shifted
slices. Each form here gives the values of its native op in `native.py` (tests/test_ops.py
holds each one against it) with a hand-written gradient where autodiff's is slow. Two
gradients call compiled kernels (`cpu_kernels`, XLA FFI) when lowered for the CPU.

Numbers: docs/benchmarks.md#measurements-behind-the-cpu-choices.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from cae_jax.ops import cpu_kernels, native
from cae_jax.ops.native import DIMS


def tap_windows(padded: jax.Array, kernel_size: tuple[int, int], strides: tuple[int, int]
                ) -> list[jax.Array]:
    """The pixels each kernel tap (i, j) reads from a padded NHWC input, taps in row-major
    order: one strided slice per tap, shaped like the layer's output."""
    (kh, kw), (sh, sw) = kernel_size, strides
    oh, ow = (padded.shape[1] - kh) // sh + 1, (padded.shape[2] - kw) // sw + 1
    return [padded[:, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw, :]
            for i in range(kh) for j in range(kw)]


def _explicit_pads(name: str, lhs: jax.Array, rhs: jax.Array, window_strides, padding,
                   options: dict) -> tuple[tuple[int, int], ...]:
    """`padding` as ((lo, hi), (lo, hi)) for the drop-in convs below, which take undilated,
    ungrouped convs only."""
    dilated = any(options.get(key) not in (None, 1, (1, 1)) for key in ("lhs_dilation",
                                                                        "rhs_dilation"))
    if dilated or options.get("feature_group_count", 1) != 1:
        raise ValueError(f"{name} takes undilated, ungrouped convs, got {options}")
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def conv_as_matmul(lhs: jax.Array, rhs: jax.Array, window_strides, padding, **options
                   ) -> jax.Array:
    """k x k convolution (NHWC x HWIO) as one matrix product over the im2col matrix.

    A drop-in `conv_general_dilated` for nnx.Conv. Row p of the im2col matrix holds the k*k
    input windows of output pixel p side by side ([pixels, k*k*in], a 1x1 conv's is its input);
    XLA:CPU runs the product and its gradients on its GEMM library, several times faster than
    its convolution. Keeping the product 2-D matters: on a 4-D product XLA:CPU first copies the
    output gradient into channel-major layout for the weight gradient, an extra pass over it.
    Stride-1 k x k convs (the stem's conv2) take the product only when differentiated.
    """
    pads = _explicit_pads("conv_as_matmul", lhs, rhs, window_strides, padding, options)
    strides = tuple(window_strides)
    if strides == (1, 1) and rhs.shape[:2] != (1, 1):
        return _native_unless_differentiated(lhs, rhs, pads)
    return _conv_by_im2col(lhs, rhs, strides, pads)


def _conv_by_im2col(lhs: jax.Array, rhs: jax.Array, strides: tuple[int, int], pads
                    ) -> jax.Array:
    kh, kw, cin, features = rhs.shape
    cols = im2col(lhs, (kh, kw), strides, pads)  # taps row-major, as in rhs
    out = cols.reshape(-1, kh * kw * cin) @ rhs.reshape(kh * kw * cin, features)
    return out.reshape(*cols.shape[:-1], features)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _native_unless_differentiated(lhs: jax.Array, rhs: jax.Array, pads) -> jax.Array:
    """Evaluated (inference), XLA's convolution: on its own GEMM (the CPU serving options) a
    stride-1 3x3 conv blocks its windows in cache instead of writing out the k*k-times-wider
    im2col matrix. Differentiated, the im2col product and its gradients, several times faster
    than the convolution's."""
    return jax.lax.conv_general_dilated(lhs, rhs, (1, 1), pads, dimension_numbers=DIMS)


def _native_unless_differentiated_fwd(lhs, rhs, pads):
    return jax.vjp(functools.partial(_conv_by_im2col, strides=(1, 1), pads=pads), lhs, rhs)


def _native_unless_differentiated_bwd(pads, product_vjp, grad):
    return product_vjp(grad)


_native_unless_differentiated.defvjp(_native_unless_differentiated_fwd,
                                     _native_unless_differentiated_bwd)


def im2col(x: jax.Array, kernel_size: tuple[int, int], strides: tuple[int, int],
           pads: tuple[tuple[int, int], ...]) -> jax.Array:
    """[N, OH, OW, kh * kw * C]: each output pixel's input windows side by side, taps in
    row-major order, x zero-padded by `pads` ((low, high) per spatial axis; negative crops).

    Evaluated, XLA's strided copy per tap and concatenation: inference programs stay plain
    XLA, so exported artifacts run anywhere. Differentiated (training), `_im2col_fastest`.
    """
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    return _im2col(x, tuple(kernel_size), tuple(strides), pads, x.shape)


def _im2col_by_slices(x: jax.Array, kernel_size, strides, pads) -> jax.Array:
    padded = jax.lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), *((lo, hi, 0) for lo, hi in pads),
                                                     (0, 0, 0)))
    return jnp.concatenate(tap_windows(padded, kernel_size, strides), axis=-1)


def _im2col_fastest(x: jax.Array, kernel_size, strides, pads) -> jax.Array:
    """`im2col`, on CPU in float32 as one pass of a compiled kernel (`cpu_kernels`): XLA makes
    one strided copy per tap, each recomputing the elementwise op that produces x, and then
    concatenates them. A 1x1 window is one slice at most: XLA's."""
    slices = functools.partial(_im2col_by_slices, kernel_size=kernel_size, strides=strides,
                               pads=pads)
    if kernel_size[0] * kernel_size[1] == 1 or not _cpu_kernels_take(x):
        return slices(x)
    out_size = [(size + lo + hi - k) // s + 1
                for size, (lo, hi), k, s in zip(x.shape[1:3], pads, kernel_size, strides,
                                                strict=True)]
    kernel = functools.partial(cpu_kernels.im2col, kernel_size=kernel_size, strides=strides,
                               pads_low=(pads[0][0], pads[1][0]), out_size=out_size)
    return _on_cpu(kernel, slices, x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _im2col(x, kernel_size, strides, pads, in_shape):
    return _im2col_by_slices(x, kernel_size, strides, pads)


def _im2col_fwd(x, kernel_size, strides, pads, in_shape):
    return _im2col_fastest(x, kernel_size, strides, pads), None


def _im2col_bwd(kernel_size, strides, pads, in_shape, _, grad):
    """The adjoint of the copies: XLA's transpose of the slicing form."""
    transpose = jax.linear_transpose(
        functools.partial(_im2col_by_slices, kernel_size=kernel_size, strides=strides,
                          pads=pads), jax.ShapeDtypeStruct(in_shape, grad.dtype))
    return transpose(grad)


_im2col.defvjp(_im2col_fwd, _im2col_bwd)


def _cpu_kernels_take(*arrays: jax.Array) -> bool:
    """Whether `cpu_kernels` can run an op on these arrays: float32, library built. Callers
    still go through `_on_cpu`, so a program lowered for another platform never holds one."""
    return all(a.dtype == jnp.float32 for a in arrays) and cpu_kernels.available()


def _on_cpu(kernel_form: Callable, xla_form: Callable, *args: jax.Array) -> jax.Array:
    """`kernel_form` (an FFI call of `cpu_kernels`) where the program is lowered for the CPU,
    `xla_form` elsewhere: the kernels exist for the CPU only."""
    return jax.lax.platform_dependent(*args, cpu=kernel_form, default=xla_form)


def conv_with_output_tap_grads(lhs: jax.Array, rhs: jax.Array, window_strides, padding,
                               **options) -> jax.Array:
    """Stride-1 convolution (NHWC x HWIO), a drop-in `conv_general_dilated` for nnx.Conv:
    XLA's convolution forward, both gradients as matrix products (`_output_tap_grads`).

    For the decoder's RGB conv, whose gradient XLA:CPU takes several times longer: it
    transposes both operands for the kernel gradient of its convolution.
    """
    pads = _explicit_pads("conv_with_output_tap_grads", lhs, rhs, window_strides, padding,
                          options)
    if tuple(window_strides) != (1, 1):
        raise ValueError(f"conv_with_output_tap_grads takes stride 1, got {window_strides}")
    return _conv_tap_grads(lhs, rhs, pads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_tap_grads(x: jax.Array, kernel: jax.Array, pads) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), pads, dimension_numbers=DIMS)


def _conv_tap_grads_fwd(x, kernel, pads):
    return _conv_tap_grads(x, kernel, pads), (x, kernel)


def _conv_tap_grads_bwd(pads, residuals, grad):
    x, kernel = residuals
    return _output_tap_grads(x, kernel, grad, 1, (pads[0][0], pads[1][0]))


_conv_tap_grads.defvjp(_conv_tap_grads_fwd, _conv_tap_grads_bwd)


def _output_tap_grads(x: jax.Array, kernel: jax.Array, grad: jax.Array, stride: int,
                      pads_low: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
    """Input and kernel gradients of a stride-1 conv or a transposed conv of `stride`, from
    one matrix of the output gradient's kernel taps.

    Both layers add x[r] @ kernel[t] to y[stride * r + low - t] (low: the conv's low padding).
    With cols[r, t] = grad[stride * r + low - t] (zero outside y), grad_x = cols @ kernel^T
    and grad_kernel = x^T @ cols: two wide products, no transposed copies of the activations.
    """
    kh, kw, cin, cout = kernel.shape
    low = (kh - 1 - pads_low[0], kw - 1 - pads_low[1])
    high = [stride * (x.shape[d] - 1) + k - grad.shape[d] - lo
            for d, k, lo in ((1, kh, low[0]), (2, kw, low[1]))]
    cols = _im2col_fastest(grad, (kh, kw), (stride, stride), tuple(zip(low, high, strict=True)))
    cols = cols.reshape(-1, kh * kw * cout)
    # Window (i, j) of the padded gradient meets kernel tap (kh - 1 - i, kw - 1 - j). The
    # kernel as [in, taps * out] (whole rows of `out` moved; a transpose of the two channel
    # axes would move single elements, far slower on XLA:CPU), contracted on its second axis.
    flipped = kernel[::-1, ::-1].transpose(2, 0, 1, 3).reshape(cin, kh * kw * cout)
    grad_x = jax.lax.dot_general(cols, flipped, (((1,), (1,)), ((), ())))
    grad_kernel = (x.reshape(-1, cin).T @ cols).reshape(cin, kh, kw, cout)
    return (grad_x.reshape(x.shape),
            grad_kernel.transpose(1, 2, 0, 3)[::-1, ::-1].astype(kernel.dtype))


def depthwise_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """3x3 depthwise convolution, stride 1, 'SAME' padding; kernel [3, 3, 1, C]: nine shifted
    multiply-adds, which XLA:CPU fuses into one pass; its grouped convolution is many times
    slower."""
    return _depthwise_shifted(x, kernel)


def _shifted_windows(x: jax.Array) -> list[jax.Array]:
    """The nine 3x3 taps' views of x, zero-padded by one: window (i, j) at index 3 * i + j."""
    return tap_windows(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), (3, 3), (1, 1))


def _shifted_sum(x: jax.Array, kernel: jax.Array) -> jax.Array:
    taps = kernel.reshape(9, -1)
    terms = [window * tap for window, tap in zip(_shifted_windows(x), taps, strict=True)]
    return sum(terms[1:], terms[0])


@jax.custom_vjp
def _depthwise_shifted(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return _shifted_sum(x, kernel)


def _depthwise_shifted_fwd(x, kernel):
    return _shifted_sum(x, kernel), (x, kernel)


def _depthwise_shifted_bwd(residuals, grad):
    """The gradient written out: the input gradient is the same shifted sum with the kernel
    flipped; the kernel gradient sums each tap's window times the gradient.

    Autodiff of the forward instead pads each tap's product back to full size and adds nine
    of them: nine full-size writes per layer, where the two gradients here take one pass each.
    """
    x, kernel = residuals
    grad_x = _shifted_sum(grad, kernel[::-1, ::-1])
    return grad_x, depthwise_kernel_grad(x, grad).astype(kernel.dtype)


_depthwise_shifted.defvjp(_depthwise_shifted_fwd, _depthwise_shifted_bwd)


def depthwise_kernel_grad(x: jax.Array, grad: jax.Array) -> jax.Array:
    """Kernel gradient [3, 3, 1, C] of the 3x3 'SAME' depthwise conv of x.

    On CPU in float32, one pass of a compiled kernel (`cpu_kernels`) over x and grad; XLA's
    nine windowed reductions, which stay as the fallback (no compiler, other dtypes), read
    both nine times.
    """
    if _cpu_kernels_take(x, grad):
        return _on_cpu(cpu_kernels.depthwise_kernel_grad, _kernel_grad_by_reductions, x, grad)
    return _kernel_grad_by_reductions(x, grad)


def _kernel_grad_by_reductions(x: jax.Array, grad: jax.Array) -> jax.Array:
    """One multiply-reduce per tap over its shifted window of x."""
    return jnp.stack([jnp.sum(window * grad, axis=(0, 1, 2))
                      for window in _shifted_windows(x)]).reshape(3, 3, 1, x.shape[-1])


def _transpose_pad(kernel_size: int, stride: int) -> int:
    """The low padding of lax.conv_transpose's "SAME" mode: it computes
    y[o] = sum_t k[t] * x[(o + t - pad) / s] over the t where o + t - pad is a multiple of s."""
    return kernel_size - 1 if stride > kernel_size - 1 else -(-(kernel_size + stride - 2) // 2)


def _phase_taps(kernel_size: int, stride: int, phase: int) -> tuple[list[int], list[int]]:
    """Kernel taps that reach output phase `phase`, and the input offset each one reads:
    for o = s*i + phase, x[(o + t - pad) / s] is x[i + offset(t)]."""
    pad = _transpose_pad(kernel_size, stride)
    taps = [t for t in range(kernel_size) if (phase + t - pad) % stride == 0]
    return taps, [(phase + t - pad) // stride for t in taps]


def conv_transpose(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """Transposed convolution with "SAME" padding, as nnx.ConvTranspose; kernel [k, k, in, out].

    Each of the stride**2 output phases (sub-pixel convolution) comes from the undilated
    input and they are interleaved (`_conv_transpose_phases`); the gradients are two matrix
    products (`_output_tap_grads`). The native form convolves the zero-dilated input, mostly
    multiplying zeros, and XLA:CPU's gradient of that is over an order of magnitude slower; its
    gradient of the phase convolutions transposes both operands for the kernel gradient,
    slower than the products.
    """
    return _conv_transpose_phases(x, kernel, stride)


# From this many input channels a transposed conv's phases come from one product over all
# taps (`_phase_sums_of_tap_products`); below it, from one small convolution each. A wide
# input makes that one product a large GEMM, faster on XLA:CPU than the phase convolutions;
# on narrow inputs computing and shifting every tap's product costs more than it saves.
TAP_PRODUCT_MIN_CHANNELS = 512


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_transpose_phases(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    n, h, w, _ = x.shape
    taps = [_phase_taps(kernel.shape[0], stride, p) for p in range(stride)]
    if x.shape[-1] >= TAP_PRODUCT_MIN_CHANNELS:
        phase_fn = _phase_sums_of_tap_products(x, kernel, stride)
    else:
        phase_fn = functools.partial(_phase_conv, x, kernel, stride)
    phases = []
    for row in taps:
        phases.append([])
        for col in taps:
            if not row[0] or not col[0]:  # stride > kernel: no tap reaches this phase.
                phases[-1].append(jnp.zeros((n, h, w, kernel.shape[-1]), x.dtype))
            else:
                phases[-1].append(phase_fn(row, col))
    return _interleave(phases)


def _phase_conv(x: jax.Array, kernel: jax.Array, stride: int, row, col) -> jax.Array:
    """One output phase as an ordinary convolution of x with that phase's taps; `row` and
    `col` are its (taps, input offsets) per axis (`_phase_taps`)."""
    (row_taps, row_offsets), (col_taps, col_offsets) = row, col
    pads = ((-row_offsets[0], row_offsets[-1]), (-col_offsets[0], col_offsets[-1]))
    # A phase's taps are every stride-th one: a strided slice of the kernel.
    phase_kernel = kernel[row_taps[0] :: stride, col_taps[0] :: stride]
    return jax.lax.conv_general_dilated(x, phase_kernel, (1, 1), pads, dimension_numbers=DIMS)


def _phase_sums_of_tap_products(x: jax.Array, kernel: jax.Array, stride: int):
    """x times every kernel tap in one matrix product ([pixels, in] x [in, k * k * out]);
    returns the function that sums one phase's taps from it, each shifted by its offset."""
    n, h, w, cin = x.shape
    k, cout = kernel.shape[0], kernel.shape[-1]
    products = x.reshape(-1, cin) @ kernel.transpose(2, 0, 1, 3).reshape(cin, k * k * cout)
    offsets = [o for p in range(stride) for o in _phase_taps(k, stride, p)[1]]
    low, high = max(0, -min(offsets)), max(0, max(offsets))
    products = jnp.pad(products.reshape(n, h, w, k, k, cout),
                       ((0, 0), (low, high), (low, high), (0, 0), (0, 0), (0, 0)))

    def phase_sum(row, col) -> jax.Array:
        terms = [products[:, low + dr : low + dr + h, low + dc : low + dc + w, a, b]
                 for a, dr in zip(*row, strict=True) for b, dc in zip(*col, strict=True)]
        return sum(terms[1:], terms[0])

    return phase_sum


def _interleave(phases: list[list[jax.Array]]) -> jax.Array:
    """phases[pr][pc] ([n, h, w, c] each) -> [n, s*h, s*w, c] holding phases[pr][pc][r, c] at
    (s*r + pr, s*c + pc), s = len(phases)."""
    n, h, w, channels = phases[0][0].shape
    stride = len(phases)
    rows = [jnp.stack(row, axis=3) for row in phases]  # [n, h, w, phase_col, c] each
    return jnp.stack(rows, axis=2).reshape(n, h * stride, w * stride, channels)


def _conv_transpose_phases_fwd(x, kernel, stride):
    return _conv_transpose_phases(x, kernel, stride), (x, kernel)


def _conv_transpose_phases_bwd(stride, residuals, grad):
    x, kernel = residuals
    pad = _transpose_pad(kernel.shape[0], stride)
    return _output_tap_grads(x, kernel, grad, stride, (pad, pad))


_conv_transpose_phases.defvjp(_conv_transpose_phases_fwd, _conv_transpose_phases_bwd)


def max_pool3x3(x: jax.Array, stride: int, pads: tuple[tuple[int, int], ...]) -> jax.Array:
    """3x3 max-pool: the max of nine strided slices, its gradient written out
    (`_max_of_windows`); XLA:CPU's native select-and-scatter is several times slower. Exact ties
    in a window share the gradient equally instead of giving it to one element; after
    BatchNorm they are rare.
    """
    return _max_of_windows(jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=-jnp.inf), stride)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_of_windows(padded: jax.Array, stride: int) -> jax.Array:
    return functools.reduce(jnp.maximum, tap_windows(padded, (3, 3), (stride, stride)))


def _max_of_windows_fwd(padded, stride):
    out = _max_of_windows(padded, stride)
    return out, (padded, out)


def _max_of_windows_bwd(stride, residuals, grad):
    """Each window's gradient goes to its maxima, split equally, and is added back by output
    phase (`_add_at_taps`). Autodiff of the max chain instead pads every tap's share to the
    full input size: nine full-size writes per pool, a large part of a stride-2 block's
    backward."""
    padded, out = residuals
    maxima = [window == out for window in tap_windows(padded, (3, 3), (stride, stride))]
    share = grad / jnp.maximum(sum(m.astype(grad.dtype) for m in maxima), 1)
    return (_add_at_taps([jnp.where(m, share, 0) for m in maxima], padded.shape[1:3], 3,
                         stride),)


_max_of_windows.defvjp(_max_of_windows_fwd, _max_of_windows_bwd)


def _add_at_taps(values: list[jax.Array], size: tuple[int, int], kernel_size: int,
                 stride: int) -> jax.Array:
    """The adjoint of `tap_windows`: an array of spatial `size` with values[t][r, c] added at
    (stride * r + i, stride * c + j) for tap t = (i, j), taps in row-major order.

    Built one phase of the result (row % stride, column % stride) at a time from shifted,
    unstrided pads of the taps that land there, then interleaved: no tap is padded to the full
    size.
    """
    n, oh, ow, channels = values[0].shape
    rows, cols = -(-size[0] // stride), -(-size[1] // stride)  # phase extents, padded up
    phases = []
    for pr in range(stride):
        phases.append([])
        for pc in range(stride):
            total = jnp.zeros((n, rows, cols, channels), values[0].dtype)
            for i in range(pr, kernel_size, stride):
                for j in range(pc, kernel_size, stride):
                    di, dj = i // stride, j // stride
                    total += jnp.pad(values[i * kernel_size + j],
                                     ((0, 0), (di, rows - oh - di), (dj, cols - ow - dj), (0, 0)))
            phases[-1].append(total)
    return _interleave(phases)[:, : size[0], : size[1]]

@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`native.batch_norm_train` with its gradient written out (`_batch_norm_train_bwd`).

    Autodiff of flax's batch statistics takes more passes over the activations than the two
    sums the gradient needs, and on XLA:CPU the layer's time is its passes over memory.
    """
    return _batch_norm_train_fwd(x, scale, bias, epsilon)[0]


def _batch_norm_train_fwd(x, scale, bias, epsilon):
    y, mean, var, rstd, raw_var = native.batch_norm_parts(x, scale, bias, epsilon)
    return (y, mean, var), (x, scale, mean, rstd, raw_var > 0)


def _batch_norm_train_bwd(epsilon, residuals, cotangents):
    """From the two channel sums of the output gradient g, sum(g) and sum(g * x):
    dx = a * g + b * (x - mean) + c, with per-channel a, b, c; the mean and variance
    outputs' cotangents enter b and c (the variance's only where it was not clipped)."""
    x, scale, mean, rstd, unclipped = residuals
    grad_y, grad_mean, grad_var = cotangents
    axes = tuple(range(x.ndim - 1))
    count = float(x.size // x.shape[-1])  # A float: past 2**31 elements an int is no int32.
    g, x32 = grad_y.astype(jnp.float32), x.astype(jnp.float32)
    sum_g = jnp.sum(g, axis=axes)
    grad_scale = rstd * (jnp.sum(g * x32, axis=axes) - mean * sum_g)  # sum(g * x_hat)
    a = scale * rstd
    var_grad = jnp.where(unclipped, -0.5 * a * rstd * grad_scale + grad_var, 0.0)
    b = 2.0 * var_grad / count
    c = (grad_mean - a * sum_g) / count
    grad_x = (a * g + b * (x32 - mean) + c).astype(x.dtype)
    return grad_x, grad_scale.astype(scale.dtype), sum_g.astype(scale.dtype)


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


def conv_fn(in_features: int, out_features: int, kernel_size: int, stride: int) -> Callable:
    """The `conv_general_dilated` an nnx.Conv of this shape runs on the CPU.

    Convs as wide in as out, and every 1x1 conv, run as one product over their im2col matrix
    (`conv_as_matmul`): that is every encoder conv. Narrowing stride-1 convs (the decoder's
    RGB conv, 32 -> 3 channels, whose im2col matrix would be 9x its 320x320 input) keep XLA's
    forward and take their gradients as products (`conv_with_output_tap_grads`).
    """
    if kernel_size == 1 or out_features >= in_features:
        return conv_as_matmul
    if stride == 1:
        return conv_with_output_tap_grads
    return jax.lax.conv_general_dilated
