"""The two-branch convolutional autoencoder: Xception encoder, decoder, classifier (Flax NNX).

Layer names follow timm's `legacy_xception` (conv1, bn1, block1..block12, conv3, bn4, ...) so
imported ImageNet weights map one-to-one; see `weights.py`. Convolutions, pooling and
BatchNorm statistics come from `cae_jax.ops`, in the form `model.layer_impl` picks for the
platform the program is lowered for.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from cae_jax import ops

CONV_INIT = nnx.initializers.he_normal()


@dataclasses.dataclass(frozen=True)
class Layers:
    """How each conv and BatchNorm of the model is built: compute dtype, layer forms
    (`cae_jax.ops`, by `model.layer_impl`) and BatchNorm conventions. The model's classes take
    this and the widths they need, not the whole config."""

    dtype: str
    impl: str
    bn_momentum: float
    bn_epsilon: float
    bn_groups: int = 1  # Groups of the batch with their own BatchNorm statistics.

    @classmethod
    def from_config(cls, model_config: ConfigDict, bn_groups: int = 1) -> Layers:
        return cls(model_config.dtype, model_config.layer_impl, model_config.bn_momentum,
                   model_config.bn_epsilon, bn_groups)

    def conv(self, in_features: int, out_features: int, kernel_size: int, *, rngs: nnx.Rngs,
             stride: int = 1, padding: str = "VALID", use_bias: bool = False) -> nnx.Conv:
        """nnx.Conv whose convolution runs in the form `ops` picks for the platform."""
        return nnx.Conv(
            in_features, out_features, (kernel_size, kernel_size), strides=stride,
            padding=padding, use_bias=use_bias, dtype=jnp.dtype(self.dtype),
            kernel_init=CONV_INIT,
            conv_general_dilated=ops.conv_fn(self.impl, in_features, out_features, kernel_size,
                                             stride),
            rngs=rngs,
        )

    def batch_norm(self, features: int, *, rngs: nnx.Rngs) -> BatchNorm:
        return BatchNorm(features, layer_impl=self.impl, groups=self.bn_groups,
                         momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                         dtype=jnp.dtype(self.dtype), rngs=rngs)


class BatchNorm(nnx.BatchNorm):
    """nnx.BatchNorm over NHWC whose training statistics come from `ops.batch_norm_train`: on
    the CPU with its gradient written out. Same parameters, statistics and values.

    With `groups` > 1 the batch is cut into that many consecutive groups, each normalized by
    its own statistics (a batch sharded over the mesh: the examples of 1 or N devices), and the
    running averages take their mean."""

    def __init__(self, features: int, *, layer_impl: str, groups: int = 1, **kwargs):
        super().__init__(features, **kwargs)
        self.impl = layer_impl
        self.groups = groups

    def __call__(self, x: jax.Array, *, use_running_average: bool) -> jax.Array:
        if use_running_average:
            return super().__call__(x, use_running_average=True)
        normalize = functools.partial(ops.batch_norm_train, epsilon=self.epsilon,
                                      impl=self.impl)
        x = x.astype(self.dtype)
        if self.groups == 1:
            y, mean, var = normalize(x, self.scale[...], self.bias[...])
        else:
            grouped = x.reshape(self.groups, x.shape[0] // self.groups, *x.shape[1:])
            y, mean, var = jax.vmap(normalize, in_axes=(0, None, None))(
                grouped, self.scale[...], self.bias[...])
            y, mean, var = y.reshape(x.shape), mean.mean(axis=0), var.mean(axis=0)
        self.mean[...] = self.momentum * self.mean[...] + (1 - self.momentum) * mean
        self.var[...] = self.momentum * self.var[...] + (1 - self.momentum) * var
        return y


class SeparableConv(nnx.Module):
    """Depthwise 3x3 then pointwise 1x1, both without bias (Xception's SeparableConv2d)."""

    def __init__(self, in_features: int, out_features: int, *, layers: Layers, rngs: nnx.Rngs):
        self.impl = layers.impl
        self.dtype = jnp.dtype(layers.dtype)
        self.depthwise = nnx.Param(CONV_INIT(rngs.params(), (3, 3, 1, in_features)))
        self.pointwise = layers.conv(in_features, out_features, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.depthwise[...].astype(self.dtype)
        return self.pointwise(ops.depthwise_conv3x3(x.astype(self.dtype), kernel, self.impl))


class Block(nnx.Module):
    """Xception residual block: [ReLU, SeparableConv, BN] x len(widths), max-pool if strided.

    A 1x1 strided conv + BN forms the skip path when the width or resolution changes.
    """

    def __init__(
        self, in_features: int, widths: Sequence[int], *, stride: int, start_with_relu: bool,
        pool_padding: str, layers: Layers, rngs: nnx.Rngs,
    ):
        self.stride = stride
        self.start_with_relu = start_with_relu
        self.pool_padding = pool_padding
        self.impl = layers.impl
        if widths[-1] != in_features or stride != 1:
            self.skip = layers.conv(in_features, widths[-1], 1, stride=stride, rngs=rngs)
            self.skipbn = layers.batch_norm(widths[-1], rngs=rngs)
        else:
            self.skip = None
            self.skipbn = None
        ins = [in_features, *widths[:-1]]
        self.seps = nnx.List([SeparableConv(i, o, layers=layers, rngs=rngs)
                              for i, o in zip(ins, widths, strict=True)])
        self.bns = nnx.List([layers.batch_norm(o, rngs=rngs) for o in widths])

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        if self.skip is not None:
            residual = self.skipbn(self.skip(x), use_running_average=not train)
        else:
            residual = x
        for k, (sep, bn) in enumerate(zip(self.seps, self.bns, strict=True)):
            if k > 0 or self.start_with_relu:
                x = nnx.relu(x)
            x = bn(sep(x), use_running_average=not train)
        if self.stride != 1:
            x = ops.max_pool3x3(x, self.stride, self.pool_padding, self.impl)
        return x + residual


class Xception(nnx.Module):
    """Chollet's Xception without its classifier: 299x299x3 -> 10x10x2048 at full size.

    `widths` is `model.encoder`: stem, entry, middle and exit flows and the two head convs.
    """

    def __init__(self, widths: ConfigDict, *, pool_padding: str, layers: Layers,
                 rngs: nnx.Rngs):
        stem1, stem2 = widths.stem_features
        self.conv1 = layers.conv(3, stem1, 3, stride=2, rngs=rngs)
        self.bn1 = layers.batch_norm(stem1, rngs=rngs)
        self.conv2 = layers.conv(stem1, stem2, 3, rngs=rngs)
        self.bn2 = layers.batch_norm(stem2, rngs=rngs)
        block = functools.partial(Block, pool_padding=pool_padding, layers=layers, rngs=rngs)
        blocks = []
        width = stem2
        for k, out in enumerate(widths.entry_features):
            blocks.append(block(width, (out, out), stride=2, start_with_relu=k > 0))
            width = out
        for _ in range(widths.middle_blocks):
            blocks.append(block(width, (width,) * 3, stride=1, start_with_relu=True))
        blocks.append(block(width, tuple(widths.exit_features), stride=2, start_with_relu=True))
        self.blocks = nnx.List(blocks)
        head1, head2 = widths.head_features
        self.conv3 = SeparableConv(widths.exit_features[-1], head1, layers=layers, rngs=rngs)
        self.bn3 = layers.batch_norm(head1, rngs=rngs)
        self.conv4 = SeparableConv(head1, head2, layers=layers, rngs=rngs)
        self.bn4 = layers.batch_norm(head2, rngs=rngs)
        self.features = head2

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        running = not train  # BatchNorm: running statistics in inference.
        x = nnx.relu(self.bn1(self.conv1(x), use_running_average=running))
        x = nnx.relu(self.bn2(self.conv2(x), use_running_average=running))
        for block in self.blocks:
            x = block(x, train=train)
        x = nnx.relu(self.bn3(self.conv3(x), use_running_average=running))
        return nnx.relu(self.bn4(self.conv4(x), use_running_average=running))


class ConvTranspose(nnx.Module):
    """nnx.ConvTranspose ("SAME", no bias) in the form `ops` picks; same parameters."""

    def __init__(self, in_features: int, out_features: int, kernel_size: int, *, stride: int,
                 layers: Layers, rngs: nnx.Rngs):
        shape = (kernel_size, kernel_size, in_features, out_features)
        self.kernel = nnx.Param(CONV_INIT(rngs.params(), shape))
        self.stride = stride
        self.impl = layers.impl
        self.dtype = jnp.dtype(layers.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(self.dtype)
        return ops.conv_transpose(x.astype(self.dtype), kernel, self.stride, self.impl)


class Decoder(nnx.Module):
    """Latent -> image: ConvTranspose(stride 2) + BN + ReLU stages, a 3x3 conv to RGB, resized
    to `image_size` where the stages overshoot it, then `output_activation`."""

    def __init__(self, in_features: int, features: Sequence[int], *, kernel_size: int,
                 output_activation: str, image_size: int, layers: Layers, rngs: nnx.Rngs):
        ins = [in_features, *features[:-1]]
        self.ups = nnx.List([ConvTranspose(i, o, kernel_size, stride=2, layers=layers, rngs=rngs)
                             for i, o in zip(ins, features, strict=True)])
        self.bns = nnx.List([layers.batch_norm(o, rngs=rngs) for o in features])
        self.to_rgb = layers.conv(features[-1], 3, 3, padding="SAME", use_bias=True, rngs=rngs)
        self.output_activation = output_activation
        self.image_size = image_size

    def __call__(self, z: jax.Array, *, train: bool) -> jax.Array:
        x = z
        for up, bn in zip(self.ups, self.bns, strict=True):
            x = nnx.relu(bn(up(x), use_running_average=not train))
        x = self.to_rgb(x).astype(jnp.float32)
        if x.shape[1:3] != (self.image_size, self.image_size):
            x = resize_bilinear(x, self.image_size)
        return jnp.tanh(x) if self.output_activation == "tanh" else jax.nn.sigmoid(x)


def bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices [out, K] and weights [out, K] of `jax.image.resize`'s antialiased
    bilinear (triangle) kernel along one axis, as its `compute_weight_mat` makes them."""
    scale = out_size / in_size
    kernel_scale = max(1 / scale, 1.0)
    sample = (np.arange(out_size) + 0.5) / scale - 0.5
    weights = np.maximum(0.0, 1 - np.abs(sample[:, None] - np.arange(in_size)) / kernel_scale)
    weights /= weights.sum(axis=1, keepdims=True)
    weights[(sample < -0.5) | (sample > in_size - 0.5)] = 0.0
    nonzero = weights > 0
    starts = np.argmax(nonzero, axis=1)
    taps = int(nonzero.sum(axis=1).max())
    index = starts[:, None] + np.arange(taps)
    tap_weights = np.take_along_axis(weights, np.minimum(index, in_size - 1), axis=1)
    return np.minimum(index, in_size - 1), np.where(index < in_size, tap_weights, 0.0)


def resize_bilinear(x: jax.Array, size: int) -> jax.Array:
    """`jax.image.resize(x, [N, size, size, C], "bilinear")` of NHWC `x`, as a few gathers and
    multiply-adds per axis: jax.image makes it a HIGHEST-precision matrix product, which XLA's
    GPU compiler rejects with its default flags."""
    for axis in (1, 2):
        index, weights = bilinear_taps(x.shape[axis], size)
        shape = [1] * x.ndim
        shape[axis] = size
        x = sum(jnp.take(x, index[:, k], axis=axis)
                * jnp.asarray(weights[:, k].reshape(shape), x.dtype)
                for k in range(index.shape[1]))
    return x


class Classifier(nnx.Module):
    """Global average pooling, Dense + ReLU + Dropout layers, one logit."""

    def __init__(self, in_features: int, hidden: Sequence[int], *, dropout: float, dtype: str,
                 rngs: nnx.Rngs):
        ins = [in_features, *hidden]
        self.hidden = nnx.List([nnx.Linear(i, o, dtype=jnp.dtype(dtype), rngs=rngs)
                                for i, o in zip(ins, hidden, strict=False)])
        self.dropout = nnx.Dropout(dropout)
        self.out = nnx.Linear(ins[-1], 1, dtype=jnp.dtype(dtype), rngs=rngs)

    def __call__(self, z: jax.Array, *, train: bool, dropout_key: jax.Array | None) -> jax.Array:
        x = jnp.mean(z, axis=(1, 2))
        for layer in self.hidden:
            x = self.dropout(nnx.relu(layer(x)), deterministic=not train, rngs=dropout_key)
        return self.out(x)[:, 0].astype(jnp.float32)


class CAE(nnx.Module):
    """Shared Xception encoder feeding a reconstruction decoder and a real/fake classifier."""

    def __init__(self, model_config: ConfigDict, rngs: nnx.Rngs, bn_groups: int = 1):
        layers = Layers.from_config(model_config, bn_groups)
        decoder, classifier = model_config.decoder, model_config.classifier
        self.encoder = Xception(model_config.encoder, pool_padding=model_config.pool_padding,
                                layers=layers, rngs=rngs)
        self.decoder = Decoder(
            self.encoder.features, decoder.features, kernel_size=decoder.kernel_size,
            output_activation=decoder.output_activation, image_size=model_config.image_size,
            layers=layers, rngs=rngs)
        self.classifier = Classifier(self.encoder.features, classifier.hidden,
                                     dropout=classifier.dropout, dtype=model_config.dtype,
                                     rngs=rngs)

    def __call__(
        self, x: jax.Array, *, train: bool, dropout_key: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """x: float [N, H, W, 3] in [-1, 1] -> (logit [N], reconstruction [N, H, W, 3])."""
        z = self.encoder(x, train=train)
        logit = self.classifier(z, train=train, dropout_key=dropout_key)
        return logit, self.decoder(z, train=train)


def build_model(model_config: ConfigDict, seed: int = 0, bn_groups: int = 1) -> CAE:
    """The CAE; `bn_groups`: how many groups of the batch get their own BatchNorm statistics
    in training (`train_step.bn_groups` derives it from `model.bn_group` and the mesh)."""
    return CAE(model_config, nnx.Rngs(params=seed), bn_groups)


def abstract_model(model_config: ConfigDict, bn_groups: int = 1
                   ) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """GraphDef and shape-only (params, batch_stats) of the model: no memory, no compute."""
    model = nnx.eval_shape(lambda: build_model(model_config, bn_groups=bn_groups))
    return nnx.split(model, nnx.Param, nnx.BatchStat)
