"""The decomposed CPU forms of convolution, depthwise, transposed convolution and max-pooling
equal XLA's native ops, in values and gradients; the full model too."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cae_jax import config as config_lib
from cae_jax import layers as layers_lib
from cae_jax import models, ops
from cae_jax.ops import cpu, native


def assert_same_values_and_gradients(fn, args, rtol=1e-5, grad_rtol=1e-4):
    """`fn(*args, impl)` agrees across impls, and so do its gradients for a random cotangent."""
    native = fn(*args, "native")
    decomposed = fn(*args, "decomposed")
    assert decomposed.shape == native.shape and decomposed.dtype == native.dtype
    np.testing.assert_allclose(decomposed, native, rtol=rtol, atol=rtol)
    cotangent = jax.random.normal(jax.random.key(99), native.shape, native.dtype)
    grads = {
        impl: jax.grad(lambda *a, impl=impl: jnp.sum(fn(*a, impl) * cotangent),
                       argnums=tuple(range(len(args))))(*args)
        for impl in ("native", "decomposed")
    }
    for got, want in zip(grads["decomposed"], grads["native"], strict=True):
        np.testing.assert_allclose(got, want, rtol=grad_rtol, atol=grad_rtol)


@pytest.mark.parametrize("shape", [(2, 9, 9, 5), (1, 7, 12, 3), (3, 1, 1, 4), (2, 37, 37, 16)])
def test_depthwise(shape):
    x = jax.random.normal(jax.random.key(sum(shape)), shape)
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 1, shape[-1]))
    assert_same_values_and_gradients(ops.depthwise_conv3x3, (x, kernel))


def test_depthwise_matches_a_direct_numpy_loop():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 4, 5, 2)).astype(np.float32)
    kernel = rng.normal(size=(3, 3, 1, 2)).astype(np.float32)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    expected = np.zeros_like(x)
    for r in range(4):
        for c in range(5):
            expected[0, r, c] = np.einsum("ijc,ijc->c", padded[0, r : r + 3, c : c + 3],
                                          kernel[:, :, 0])
    np.testing.assert_allclose(ops.depthwise_conv3x3(x, kernel, "decomposed"), expected,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("kernel_size", "stride", "padding"),
                         [(1, 1, "VALID"), (1, 2, "VALID"), (3, 1, "VALID"), (3, 1, "SAME"),
                          (3, 2, "SAME"), (3, 2, "VALID"), (2, 1, ((1, 0), (0, 1)))])
def test_conv_as_matmul(kernel_size, stride, padding):
    x = jax.random.normal(jax.random.key(stride), (2, 11, 8, 3))
    kernel = jax.random.normal(jax.random.key(7), (kernel_size, kernel_size, 3, 4))

    def fn(x, kernel, impl):
        conv = cpu.conv_as_matmul if impl == "decomposed" else jax.lax.conv_general_dilated
        return conv(x, kernel, (stride, stride), padding, dimension_numbers=native.DIMS)

    assert_same_values_and_gradients(fn, (x, kernel))


def test_stride_1_conv_evaluates_natively_and_differentiates_as_the_im2col_product():
    """The stem's conv2: XLA's convolution in inference, the product (and its value) in
    training."""
    x = jax.random.normal(jax.random.key(2), (2, 9, 9, 4))
    kernel = jax.random.normal(jax.random.key(3), (3, 3, 4, 6))

    def conv(x, kernel):
        return cpu.conv_as_matmul(x, kernel, (1, 1), "VALID", dimension_numbers=native.DIMS)

    def loss(x, kernel):
        return jnp.sum(conv(x, kernel) ** 2)

    assert "conv_general_dilated" in str(jax.make_jaxpr(conv)(x, kernel))
    trained = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, kernel))
    assert "conv_general_dilated" not in trained and "dot_general" in trained
    product = cpu._conv_by_im2col(x, kernel, (1, 1), ((0, 0), (0, 0)))
    value, _ = jax.vjp(conv, x, kernel)
    np.testing.assert_array_equal(value, product)
    np.testing.assert_allclose(conv(x, kernel), product, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("kernel_size", "padding"),
                         [(1, "VALID"), (3, "VALID"), (3, "SAME"), (2, ((1, 0), (0, 1))),
                          (5, ((3, 1), (0, 2)))])
def test_conv_with_output_tap_grads(kernel_size, padding):
    x = jax.random.normal(jax.random.key(kernel_size), (2, 11, 8, 5))
    kernel = jax.random.normal(jax.random.key(7), (kernel_size, kernel_size, 5, 3))

    def fn(x, kernel, impl):
        conv = (cpu.conv_with_output_tap_grads if impl == "decomposed"
                else jax.lax.conv_general_dilated)
        return conv(x, kernel, (1, 1), padding, dimension_numbers=native.DIMS)

    assert_same_values_and_gradients(fn, (x, kernel))


def test_each_conv_gets_its_cpu_form():
    assert cpu.conv_fn(3, 4, 1, 1) is cpu.conv_as_matmul  # every 1x1 conv
    assert cpu.conv_fn(728, 1024, 1, 2) is cpu.conv_as_matmul
    assert cpu.conv_fn(8, 4, 1, 1) is cpu.conv_as_matmul
    assert cpu.conv_fn(3, 32, 3, 2) is cpu.conv_as_matmul  # the stem's conv1
    assert cpu.conv_fn(32, 64, 3, 1) is cpu.conv_as_matmul  # the stem's conv2
    assert cpu.conv_fn(32, 3, 3, 1) is cpu.conv_with_output_tap_grads  # the decoder's RGB conv
    assert cpu.conv_fn(32, 3, 3, 2) is jax.lax.conv_general_dilated


@pytest.mark.parametrize(("impl", "differentiated_op"),
                         [("decomposed", "dot_general"), ("native", "conv_general_dilated")])
def test_model_convs_take_the_form_of_their_layer_impl(impl, differentiated_op):
    """The conv nnx.Conv runs: the im2col product when decomposed, XLA's conv when native."""
    layers = layers_lib.Layers("float32", impl, 0.99, 1e-3)
    layer = layers.conv(3, 8, 3, stride=2, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer)
    x = jnp.ones((1, 9, 9, 3))

    def loss(params):
        return jnp.sum(nnx.merge(graphdef, params)(x) ** 2)

    program = str(jax.make_jaxpr(jax.grad(loss))(params))
    assert differentiated_op in program
    assert ("conv_general_dilated" in program) == (impl == "native")
    again = layers.conv(3, 8, 3, stride=2, rngs=nnx.Rngs(0))
    assert nnx.graphdef(again) == graphdef  # one conv function per shape: equal graphs


@pytest.mark.parametrize("conv", [cpu.conv_as_matmul, cpu.conv_with_output_tap_grads])
def test_drop_in_convs_refuse_what_they_do_not_compute(conv):
    x, kernel = jnp.zeros((1, 5, 5, 2)), jnp.zeros((3, 3, 2, 2))
    with pytest.raises(ValueError, match="undilated, ungrouped"):
        conv(x, kernel, (1, 1), "SAME", rhs_dilation=(2, 2))
    with pytest.raises(ValueError, match="undilated, ungrouped"):
        conv(x, jnp.zeros((3, 3, 1, 2)), (1, 1), "SAME", feature_group_count=2)
    if conv is cpu.conv_with_output_tap_grads:
        with pytest.raises(ValueError, match="takes stride 1"):
            conv(x, kernel, (2, 2), "SAME")


@pytest.mark.parametrize("kernel_size", [2, 3, 4, 5])
@pytest.mark.parametrize("stride", [2, 3])
@pytest.mark.parametrize("phases_from", ["convs", "tap products"])
def test_conv_transpose_matches_flax(kernel_size, stride, phases_from, monkeypatch):
    """Both forward forms of the decomposed layer (chosen by input width)."""
    monkeypatch.setattr(cpu, "TAP_PRODUCT_MIN_CHANNELS", 1 if phases_from == "tap products"
                        else 10**9)
    x = jax.random.normal(jax.random.key(kernel_size * 10 + stride), (2, 5, 7, 3))
    flax_layer = nnx.ConvTranspose(3, 4, (kernel_size, kernel_size), strides=(stride, stride),
                                   padding="SAME", use_bias=False, rngs=nnx.Rngs(0))
    kernel = flax_layer.kernel[...]
    expected = flax_layer(x)
    assert expected.shape == (2, 5 * stride, 7 * stride, 4)
    np.testing.assert_allclose(ops.conv_transpose(x, kernel, stride, "decomposed"), expected,
                               rtol=1e-5, atol=1e-5)
    assert_same_values_and_gradients(
        lambda x, k, impl: ops.conv_transpose(x, k, stride, impl), (x, kernel))


@pytest.mark.parametrize("padding", ["torch", "same"])
@pytest.mark.parametrize("side", [8, 9, 10])
def test_max_pool(padding, side):
    x = jax.random.normal(jax.random.key(side), (2, side, side + 1, 3))
    out = ops.max_pool3x3(x, 2, padding, "decomposed")
    assert out.shape[1:3] == (-(-side // 2), -(-(side + 1) // 2))
    assert_same_values_and_gradients(
        lambda x, impl: ops.max_pool3x3(x, 2, padding, impl), (x,))


def test_max_pool_ties_share_the_gradient_equally():
    """A constant 4x4 input: every pixel of each 3x3/2 window ties for the max ("same" pads
    one -inf row and column at the end), so each window's gradient splits over its pixels."""
    grad = jax.grad(lambda x: jnp.sum(ops.max_pool3x3(x, 2, "same", "decomposed")))(
        jnp.ones((1, 4, 4, 1)))
    expected = np.zeros((4, 4))
    for r in range(2):
        for c in range(2):
            window = expected[2 * r : 2 * r + 3, 2 * c : 2 * c + 3]  # clipped at the edge
            window += 1 / window.size
    np.testing.assert_allclose(grad[0, :, :, 0], expected, rtol=1e-6)


@pytest.mark.parametrize(("kernel_size", "stride"), [(3, 1), (3, 2), (3, 3), (2, 2), (3, 4)])
def test_add_at_taps_is_the_adjoint_of_tap_windows(kernel_size, stride):
    padded = jax.random.normal(jax.random.key(stride), (2, 11, 9, 3))
    windows, adjoint = jax.vjp(
        lambda p: cpu.tap_windows(p, (kernel_size, kernel_size), (stride, stride)), padded)
    values = [jax.random.normal(jax.random.key(t), w.shape) for t, w in enumerate(windows)]
    got = cpu._add_at_taps(values, padded.shape[1:3], kernel_size, stride)
    np.testing.assert_allclose(got, adjoint(values)[0], rtol=1e-6, atol=1e-6)


def test_decoder_layer_has_flax_conv_transpose_parameters():
    layers = layers_lib.Layers.from_config(config_lib.default_config().model)
    ours = models.ConvTranspose(6, 5, 4, stride=2, layers=layers, rngs=nnx.Rngs(params=3))
    theirs = nnx.ConvTranspose(6, 5, (4, 4), strides=(2, 2), padding="SAME", use_bias=False,
                               kernel_init=layers_lib.CONV_INIT, rngs=nnx.Rngs(params=3))
    np.testing.assert_array_equal(ours.kernel[...], theirs.kernel[...])
    x = jax.random.normal(jax.random.key(0), (1, 3, 4, 6))
    np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def _flax_batch_norm(x, scale, bias, epsilon):
    """flax's train-mode BatchNorm (output, batch mean, batch variance) in plain jnp, for
    autodiff to differentiate."""
    mean = jnp.mean(x, axis=(0, 1, 2))
    var = jnp.maximum(0.0, jnp.mean(x * x, axis=(0, 1, 2)) - mean * mean)
    return (x - mean) * jax.lax.rsqrt(var + epsilon) * scale + bias, mean, var


def test_batch_norm_gradient_equals_autodiff_of_flax_statistics():
    """All three outputs carry a random cotangent; one channel is constant, where the variance
    is clipped at zero."""
    x = jax.random.normal(jax.random.key(0), (3, 5, 6, 4)) * 3 + 1
    x = x.at[..., 2].set(2.0)
    scale, bias = jnp.linspace(0.5, 2.0, 4), jnp.linspace(-1.0, 1.0, 4)
    got, got_vjp = jax.vjp(lambda *a: cpu.batch_norm_train(*a, 1e-3), x, scale, bias)
    want, want_vjp = jax.vjp(lambda *a: _flax_batch_norm(*a, 1e-3), x, scale, bias)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    cotangents = tuple(jax.random.normal(jax.random.key(k), w.shape) for k, w in enumerate(want))
    for g, w in zip(got_vjp(cotangents), want_vjp(cotangents), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def test_batch_norm_layer_equals_flax_batch_norm():
    """Output, running statistics and gradients of layers.BatchNorm vs nnx.BatchNorm, in
    training and in inference."""
    x = jax.random.normal(jax.random.key(1), (2, 7, 7, 6)) * 2 - 0.5
    cotangent = jax.random.normal(jax.random.key(2), x.shape)
    results = []
    layers = [nnx.BatchNorm(6, momentum=0.9, epsilon=1e-3, rngs=nnx.Rngs(0))]
    layers += [layers_lib.BatchNorm(6, layer_impl=impl, momentum=0.9, epsilon=1e-3,
                                    rngs=nnx.Rngs(0)) for impl in config_lib.LAYER_IMPLS]
    for layer in layers:
        layer.scale[...] = jnp.linspace(0.5, 2.0, 6)
        layer.bias[...] = jnp.linspace(-1.0, 1.0, 6)
        graphdef, params, stats = nnx.split(layer, nnx.Param, nnx.BatchStat)

        def loss(params, x, stats, graphdef=graphdef):
            layer = nnx.merge(graphdef, params, stats, copy=True)
            y = layer(x, use_running_average=False)
            return jnp.sum(y * cotangent), (y, nnx.state(layer, nnx.BatchStat), layer(
                x, use_running_average=True))

        results.append(jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x, stats))
    for ours in results[1:]:
        for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(results[0]), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_whole_model_agrees_across_impls():
    """The tiny CAE, in training mode: logits, reconstructions and all parameter gradients."""
    config = config_lib.load_config("configs/tiny.py")
    models_by_impl = {}
    for impl in ("native", "decomposed"):
        config.model.layer_impl = impl
        models_by_impl[impl] = models.build_model(config.model, seed=0)
    x = jax.random.uniform(jax.random.key(0), (4, 64, 64, 3), maxval=255)  # Pixels, as fed.

    def loss_and_grads(model):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(params):
            model = nnx.merge(graphdef, params, rest, copy=True)
            outputs = model(x, train=True, dropout_key=jax.random.key(1))
            logits, recon = outputs["logit"], outputs["reconstruction"]
            return jnp.sum(logits) + jnp.sum(recon**2), (logits, recon)

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (_, (logits_n, recon_n)), grads_n = loss_and_grads(models_by_impl["native"])
    (_, (logits_d, recon_d)), grads_d = loss_and_grads(models_by_impl["decomposed"])
    np.testing.assert_allclose(logits_d, logits_n, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(recon_d, recon_n, rtol=1e-4, atol=1e-4)
    # Float32 sums in a different order through train-mode BatchNorm: compare each gradient
    # to its own scale.
    for got, want in zip(jax.tree.leaves(grads_d), jax.tree.leaves(grads_n), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * float(np.abs(want).max()))


def test_bfloat16_decomposed_stays_close_to_float32():
    x = jax.random.normal(jax.random.key(1), (2, 10, 10, 8))
    kernel = jax.random.normal(jax.random.key(2), (3, 3, 1, 8))
    full = ops.depthwise_conv3x3(x, kernel, "native")
    half = ops.depthwise_conv3x3(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16),
                                    "decomposed")
    assert half.dtype == jnp.bfloat16
    np.testing.assert_allclose(half.astype(jnp.float32), full, rtol=0.05, atol=0.1)
    grad_kernel = jax.grad(lambda k: jnp.sum(ops.depthwise_conv3x3(
        x.astype(jnp.bfloat16), k, "decomposed").astype(jnp.float32)))(kernel.astype(jnp.bfloat16))
    want = jax.grad(lambda k: jnp.sum(ops.depthwise_conv3x3(x, k, "native")))(kernel)
    assert grad_kernel.dtype == jnp.bfloat16
    np.testing.assert_allclose(grad_kernel.astype(jnp.float32), want, rtol=0.05, atol=0.5)


@pytest.mark.parametrize("sizes", [(320, 299), (64, 60), (40, 64), (7, 7)])
def test_resize_bilinear_equals_jax_image_resize(sizes):
    in_size, out_size = sizes
    x = jax.random.normal(jax.random.key(0), (2, in_size, in_size + 3, 3))
    expected = jax.image.resize(x, (2, out_size, out_size, 3), "bilinear")
    got = models.resize_bilinear(x, out_size)
    # Up to 1.2e-4 apart on unit-variance inputs (jax.image forms its weights its own way).
    np.testing.assert_allclose(got, expected, atol=5e-4, rtol=0)


def test_resize_bilinear_is_no_matrix_product():
    """XLA's GPU compiler refuses jax.image's HIGHEST-precision dot with default flags."""
    text = jax.jit(lambda x: models.resize_bilinear(x, 299)).lower(
        jax.ShapeDtypeStruct((2, 320, 320, 3), jnp.float32)).as_text()
    assert "dot_general" not in text and "precision" not in text
