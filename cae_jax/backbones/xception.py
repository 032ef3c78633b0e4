"""Xception (Chollet), the paper's encoder: 299x299x3 -> 10x10x2048 at full size.

Layer names follow timm's `legacy_xception` (conv1, bn1, block1..block12, conv3, bn4, ...) so
imported ImageNet weights map one-to-one (`encoder_layout`). Every layer runs in the
form `model.layer_impl` picks (`cae_jax.ops`). Input: [-1, 1], the pipeline's own range.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict

from cae_jax import config as config_lib
from cae_jax import ops
from cae_jax.layers import CONV_INIT, Layers

NAME = "xception"
TIMM_ARCH = "legacy_xception"  # The timm model whose state dict `import-weights` reads.
TIMM_CONVENTIONS = {"pool_padding": "torch", "bn_epsilon": 1e-5}  # Its weights' model fields.
# Input normalization, per channel on [0, 1] pixels: x -> (x - mean) / std = [-1, 1].
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


def encoder_config() -> ConfigDict:
    """`model.encoder` for Xception: its widths, full size by default."""
    config = ConfigDict()
    config.name = NAME
    config.stem_features = (32, 64)  # conv1 (3x3/2, valid) and conv2 (3x3, valid).
    config.entry_features = (128, 256, 728)  # Entry-flow blocks, each halves the resolution.
    config.middle_blocks = 8  # Middle-flow residual blocks of 3 separable convs at 728 channels.
    config.exit_features = (728, 1024)  # Exit block: separable convs 728 then 1024, stride 2.
    config.head_features = (1536, 2048)  # Final separable convs; the latent has the last width.
    return config


RULES = (
    ("stem_features", config_lib._widths(2, 2)),
    ("entry_features", config_lib._widths(3, 3)),
    ("middle_blocks", config_lib._integer(0)),
    ("exit_features", config_lib._widths(2, 2)),
    ("head_features", config_lib._widths(2, 2)),
)


def latent_size(encoder: ConfigDict, image_size: int) -> int:
    """Side of the encoder's output for an input side (299 -> 10): the stem's two valid 3x3
    convs (the first with stride 2), then the padded stride-2 entry blocks and exit block
    (ceil(side / 2) each). 0 where the stem leaves no rows."""
    side = (image_size - 3) // 2 + 1 - 2
    if side < 1:
        return 0
    for _ in range(len(encoder.entry_features) + 1):
        side = -(-side // 2)
    return side


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
    """Chollet's Xception without its classifier. `widths` is `model.encoder`: stem, entry,
    middle and exit flows and the two head convs. `features` is the latent's width, `stride`
    its downsampling."""

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
        self.stride = 2 ** (2 + len(widths.entry_features))  # conv1, entry blocks, exit block.

    def __call__(self, x: jax.Array, *, train: bool, dropout_key: jax.Array | None = None
                 ) -> jax.Array:
        del dropout_key  # Xception has no stochastic layers.
        running = not train  # BatchNorm: running statistics in inference.
        x = nnx.relu(self.bn1(self.conv1(x), use_running_average=running))
        x = nnx.relu(self.bn2(self.conv2(x), use_running_average=running))
        for block in self.blocks:
            x = block(x, train=train)
        x = nnx.relu(self.bn3(self.conv3(x), use_running_average=running))
        return nnx.relu(self.bn4(self.conv4(x), use_running_average=running))


@dataclasses.dataclass(frozen=True)
class Layer:
    path: str  # Our path below the encoder, "." separated.
    kind: str  # "conv", "sep" or "bn".
    timm: str  # Prefix in the timm state dict.
    keras: str  # Keras layer name; "" for the unnamed residual layers (matched by order).


def encoder_layout(model_config: ConfigDict) -> Iterator[Layer]:
    """Every weighted layer of the encoder, in forward order, with its timm and Keras names
    (which number blocks and layers otherwise than our tree): what `weights.py` imports by."""
    yield Layer("conv1", "conv", "conv1", "block1_conv1")
    yield Layer("bn1", "bn", "bn1", "block1_conv1_bn")
    yield Layer("conv2", "conv", "conv2", "block1_conv2")
    yield Layer("bn2", "bn", "bn2", "block1_conv2_bn")
    encoder = model_config.encoder
    widths = [(width, width) for width in encoder.entry_features]
    widths += [(encoder.entry_features[-1],) * 3] * encoder.middle_blocks
    widths += [tuple(encoder.exit_features)]
    in_width = encoder.stem_features[-1]
    for b, block_widths in enumerate(widths):
        ours, timm, keras = f"blocks.{b}", f"block{b + 1}", f"block{b + 2}"
        strided = b < len(encoder.entry_features) or b == len(widths) - 1
        if block_widths[-1] != in_width or strided:  # As in Block.
            yield Layer(f"{ours}.skip", "conv", f"{timm}.skip", "")
            yield Layer(f"{ours}.skipbn", "bn", f"{timm}.skipbn", "")
        first = 0 if b == 0 else 1  # timm's first block has no leading ReLU in `rep`.
        for j in range(len(block_widths)):
            yield Layer(f"{ours}.seps.{j}", "sep", f"{timm}.rep.{first + 3 * j}",
                        f"{keras}_sepconv{j + 1}")
            yield Layer(f"{ours}.bns.{j}", "bn", f"{timm}.rep.{first + 3 * j + 1}",
                        f"{keras}_sepconv{j + 1}_bn")
        in_width = block_widths[-1]
    head = f"block{len(widths) + 2}"
    yield Layer("conv3", "sep", "conv3", f"{head}_sepconv1")
    yield Layer("bn3", "bn", "bn3", f"{head}_sepconv1_bn")
    yield Layer("conv4", "sep", "conv4", f"{head}_sepconv2")
    yield Layer("bn4", "bn", "bn4", f"{head}_sepconv2_bn")


def build(model_config: ConfigDict, *, layers: Layers, rngs: nnx.Rngs) -> Xception:
    return Xception(model_config.encoder, pool_padding=model_config.pool_padding,
                    layers=layers, rngs=rngs)
