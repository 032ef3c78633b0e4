"""The two-branch convolutional autoencoder: Xception encoder, decoder, classifier (Flax NNX).

Layer names follow timm's `legacy_xception` (conv1, bn1, block1..block12, conv3, bn4, ...) so
imported ImageNet weights map one-to-one; see `weights.py`. Convolutions, pooling and
BatchNorm statistics come from `cae_jax.ops`, in the form `model.layer_impl` picks for the
platform the program is lowered for.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict

from cae_jax import ops

CONV_INIT = nnx.initializers.he_normal()


@jax.jit
def normalize(images: jax.Array) -> jax.Array:
    """uint8 [0, 255] -> float32 [-1, 1], Xception's input convention.

    Written as (x - 127.5) / 127.5 so 0 and 255 land exactly on -1 and 1.
    """
    return (images.astype(jnp.float32) - 127.5) / 127.5


def conv(in_features: int, out_features: int, kernel_size: int, *, mc: ConfigDict,
         rngs: nnx.Rngs, stride: int = 1, padding: str = "VALID", use_bias: bool = False
         ) -> nnx.Conv:
    """nnx.Conv whose convolution runs in the form `ops` picks for the platform."""
    return nnx.Conv(
        in_features, out_features, (kernel_size, kernel_size), strides=stride, padding=padding,
        use_bias=use_bias, dtype=jnp.dtype(mc.dtype), kernel_init=CONV_INIT,
        conv_general_dilated=ops.conv_fn(mc.layer_impl, in_features, out_features, kernel_size,
                                         stride),
        rngs=rngs,
    )


class SeparableConv(nnx.Module):
    """Depthwise 3x3 then pointwise 1x1, both without bias (Xception's SeparableConv2d)."""

    def __init__(self, in_features: int, out_features: int, *, mc: ConfigDict, rngs: nnx.Rngs):
        self.impl = mc.layer_impl
        self.dtype = jnp.dtype(mc.dtype)
        self.depthwise = nnx.Param(CONV_INIT(rngs.params(), (3, 3, 1, in_features)))
        self.pointwise = conv(in_features, out_features, 1, mc=mc, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.depthwise[...].astype(self.dtype)
        return self.pointwise(ops.depthwise_conv3x3(x.astype(self.dtype), kernel, self.impl))


class Block(nnx.Module):
    """Xception residual block: [ReLU, SeparableConv, BN] x len(widths), max-pool if strided.

    A 1x1 strided conv + BN forms the skip path when the width or resolution changes.
    """

    def __init__(
        self, in_features: int, widths: Sequence[int], *, stride: int, start_with_relu: bool,
        model_config: ConfigDict, rngs: nnx.Rngs,
    ):
        mc = model_config
        self.stride = stride
        self.start_with_relu = start_with_relu
        self.pool_padding = mc.pool_padding
        self.impl = mc.layer_impl
        if widths[-1] != in_features or stride != 1:
            self.skip = conv(in_features, widths[-1], 1, stride=stride, mc=mc, rngs=rngs)
            self.skipbn = batch_norm(widths[-1], mc, rngs)
        else:
            self.skip = None
            self.skipbn = None
        ins = [in_features, *widths[:-1]]
        self.seps = nnx.List(
            [SeparableConv(i, o, mc=mc, rngs=rngs) for i, o in zip(ins, widths, strict=True)]
        )
        self.bns = nnx.List([batch_norm(o, mc, rngs) for o in widths])

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


class BatchNorm(nnx.BatchNorm):
    """nnx.BatchNorm over NHWC whose training statistics come from `ops.batch_norm_train`: on
    the CPU with its gradient written out. Same parameters, statistics and values."""

    def __init__(self, features: int, *, layer_impl: str, **kwargs):
        super().__init__(features, **kwargs)
        self.impl = layer_impl

    def __call__(self, x: jax.Array, *, use_running_average: bool) -> jax.Array:
        if use_running_average:
            return super().__call__(x, use_running_average=True)
        y, mean, var = ops.batch_norm_train(x.astype(self.dtype), self.scale[...],
                                            self.bias[...], self.epsilon, self.impl)
        self.mean[...] = self.momentum * self.mean[...] + (1 - self.momentum) * mean
        self.var[...] = self.momentum * self.var[...] + (1 - self.momentum) * var
        return y


def batch_norm(features: int, mc: ConfigDict, rngs: nnx.Rngs) -> BatchNorm:
    return BatchNorm(
        features, layer_impl=mc.layer_impl, momentum=mc.bn_momentum, epsilon=mc.bn_epsilon,
        dtype=jnp.dtype(mc.dtype), rngs=rngs,
    )


class Xception(nnx.Module):
    """Chollet's Xception without its classifier: 299x299x3 -> 10x10x2048 at full size."""

    def __init__(self, mc: ConfigDict, rngs: nnx.Rngs):
        ec = mc.encoder
        stem1, stem2 = ec.stem_features
        self.conv1 = conv(3, stem1, 3, stride=2, mc=mc, rngs=rngs)
        self.bn1 = batch_norm(stem1, mc, rngs)
        self.conv2 = conv(stem1, stem2, 3, mc=mc, rngs=rngs)
        self.bn2 = batch_norm(stem2, mc, rngs)
        blocks = []
        width = stem2
        for k, out in enumerate(ec.entry_features):
            blocks.append(Block(width, (out, out), stride=2, start_with_relu=k > 0,
                                model_config=mc, rngs=rngs))
            width = out
        for _ in range(ec.middle_blocks):
            blocks.append(Block(width, (width,) * 3, stride=1, start_with_relu=True,
                                model_config=mc, rngs=rngs))
        blocks.append(Block(width, tuple(ec.exit_features), stride=2, start_with_relu=True,
                            model_config=mc, rngs=rngs))
        self.blocks = nnx.List(blocks)
        head1, head2 = ec.head_features
        self.conv3 = SeparableConv(ec.exit_features[-1], head1, mc=mc, rngs=rngs)
        self.bn3 = batch_norm(head1, mc, rngs)
        self.conv4 = SeparableConv(head1, head2, mc=mc, rngs=rngs)
        self.bn4 = batch_norm(head2, mc, rngs)
        self.features = head2

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        ura = not train
        x = nnx.relu(self.bn1(self.conv1(x), use_running_average=ura))
        x = nnx.relu(self.bn2(self.conv2(x), use_running_average=ura))
        for block in self.blocks:
            x = block(x, train=train)
        x = nnx.relu(self.bn3(self.conv3(x), use_running_average=ura))
        return nnx.relu(self.bn4(self.conv4(x), use_running_average=ura))


class ConvTranspose(nnx.Module):
    """nnx.ConvTranspose ("SAME", no bias) with a selectable implementation; same parameters."""

    def __init__(self, in_features: int, out_features: int, kernel_size: int, *, stride: int,
                 mc: ConfigDict, rngs: nnx.Rngs):
        shape = (kernel_size, kernel_size, in_features, out_features)
        self.kernel = nnx.Param(CONV_INIT(rngs.params(), shape))
        self.stride = stride
        self.impl = mc.layer_impl
        self.dtype = jnp.dtype(mc.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(self.dtype)
        return ops.conv_transpose(x.astype(self.dtype), kernel, self.stride, self.impl)


class Decoder(nnx.Module):
    """Latent -> image: ConvTranspose(stride 2) + BN + ReLU stages, a 3x3 conv to RGB."""

    def __init__(self, in_features: int, mc: ConfigDict, rngs: nnx.Rngs):
        dc = mc.decoder
        ins = [in_features, *dc.features[:-1]]
        self.ups = nnx.List([
            ConvTranspose(i, o, dc.kernel_size, stride=2, mc=mc, rngs=rngs)
            for i, o in zip(ins, dc.features, strict=True)
        ])
        self.bns = nnx.List([batch_norm(o, mc, rngs) for o in dc.features])
        self.to_rgb = conv(dc.features[-1], 3, 3, padding="SAME", use_bias=True, mc=mc, rngs=rngs)
        self.output_activation = dc.output_activation
        self.image_size = mc.image_size

    def __call__(self, z: jax.Array, *, train: bool) -> jax.Array:
        x = z
        for up, bn in zip(self.ups, self.bns, strict=True):
            x = nnx.relu(bn(up(x), use_running_average=not train))
        x = self.to_rgb(x).astype(jnp.float32)
        if x.shape[1:3] != (self.image_size, self.image_size):
            x = jax.image.resize(x, (x.shape[0], self.image_size, self.image_size, 3), "bilinear")
        if self.output_activation == "tanh":
            return jnp.tanh(x)
        if self.output_activation == "sigmoid":
            return jax.nn.sigmoid(x)
        raise ValueError(f"decoder.output_activation must be tanh or sigmoid, "
                         f"got {self.output_activation!r}")


class Classifier(nnx.Module):
    """Global average pooling, Dense + ReLU + Dropout layers, one logit."""

    def __init__(self, in_features: int, mc: ConfigDict, rngs: nnx.Rngs):
        kc = mc.classifier
        dtype = jnp.dtype(mc.dtype)
        ins = [in_features, *kc.hidden]
        self.hidden = nnx.List([nnx.Linear(i, o, dtype=dtype, rngs=rngs)
                                for i, o in zip(ins, kc.hidden, strict=False)])
        self.dropout = nnx.Dropout(kc.dropout)
        self.out = nnx.Linear(ins[-1], 1, dtype=dtype, rngs=rngs)

    def __call__(self, z: jax.Array, *, train: bool, dropout_key: jax.Array | None) -> jax.Array:
        x = jnp.mean(z, axis=(1, 2))
        for layer in self.hidden:
            x = self.dropout(nnx.relu(layer(x)), deterministic=not train, rngs=dropout_key)
        return self.out(x)[:, 0].astype(jnp.float32)


class CAE(nnx.Module):
    """Shared Xception encoder feeding a reconstruction decoder and a real/fake classifier."""

    def __init__(self, mc: ConfigDict, rngs: nnx.Rngs):
        self.encoder = Xception(mc, rngs)
        self.decoder = Decoder(self.encoder.features, mc, rngs)
        self.classifier = Classifier(self.encoder.features, mc, rngs)

    def __call__(
        self, x: jax.Array, *, train: bool, dropout_key: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """x: float [N, H, W, 3] in [-1, 1] -> (logit [N], reconstruction [N, H, W, 3])."""
        z = self.encoder(x, train=train)
        logit = self.classifier(z, train=train, dropout_key=dropout_key)
        return logit, self.decoder(z, train=train)


def build_model(model_config: ConfigDict, seed: int = 0) -> CAE:
    return CAE(model_config, nnx.Rngs(params=seed))

