"""EfficientNet-B4 (Tan & Le), as timm's `efficientnet_b4`: 380x380x3 -> 12x12x1792.

The layout, channel rounding, depth scaling, squeeze-excitation widths, SiLU activations,
symmetric padding and drop-path schedule are those of timm's `_gen_efficientnet` and
`EfficientNetBuilder`, and the module tree carries timm's names (conv_stem, bn1,
blocks.<stage>.<block>.conv_dw, ..., conv_head, bn2), so timm's state dict maps onto it by
name alone (`weights.from_timm_tree`). Usable at any input size (299 and 256 too).

Every layer runs in XLA's native form on every platform (`Layers.native`): `cae_jax.ops` has
no CPU forms of grouped or 5x5 strided convs, so `model.layer_impl` does not apply here (it
still picks the decoder's forms).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict

from cae_jax import config as config_lib
from cae_jax.layers import Layers

NAME = "efficientnet_b4"
TIMM_ARCH = "efficientnet_b4"
TIMM_CONVENTIONS = {"bn_epsilon": 1e-5}  # Its weights' model fields (BatchNorm2d's epsilon).
# ImageNet mean and std on [0, 1] pixels, timm's convention for its EfficientNet weights.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

# timm's EfficientNet arch_def, one block definition per stage:
# (block type, repeats, kernel, stride, expansion ratio, output channels before rounding).
# "ds": depthwise-separable block; "ir": inverted residual (MBConv). SE ratio 0.25 everywhere.
STAGES = (
    ("ds", 1, 3, 1, 1, 16),
    ("ir", 2, 3, 2, 6, 24),
    ("ir", 2, 5, 2, 6, 40),
    ("ir", 3, 3, 2, 6, 80),
    ("ir", 3, 5, 1, 6, 112),
    ("ir", 4, 5, 2, 6, 192),
    ("ir", 1, 3, 1, 6, 320),
)
SE_RATIO = 0.25
STEM_FEATURES = 32
HEAD_FEATURES = 1280
# The stem and each stage's first block halve the side where their stride is 2.
STRIDE = 2 * 2 ** sum(stride == 2 for *_, stride, _, _ in STAGES)


def encoder_config() -> ConfigDict:
    """`model.encoder` for EfficientNet-B4; smaller multipliers give narrower, shallower
    variants of the same layout (tests use them)."""
    config = ConfigDict()
    config.name = NAME
    config.width_multiplier = 1.4  # B4's channel multiplier.
    config.depth_multiplier = 1.8  # B4's repeat multiplier (ceil per stage).
    # Stochastic depth: block i of n drops its residual branch with rate * i / n (timm
    # trains B4 with 0.2).
    config.drop_path_rate = 0.2
    return config


RULES = (
    ("width_multiplier", config_lib._number(0.0, open_low=True)),
    ("depth_multiplier", config_lib._number(0.0, open_low=True)),
    ("drop_path_rate", config_lib._number(0.0, 1.0, open_high=True)),
)


def latent_size(encoder: ConfigDict, image_size: int) -> int:
    """Side of the encoder's output for an input side (380 -> 12, 299 -> 10, 256 -> 8): each
    strided conv pads (kernel - 1) // 2 a side, so each gives ceil(side / 2)."""
    del encoder  # The multipliers change widths and depths, not strides.
    return -(-image_size // STRIDE)


def make_divisible(value: float, divisor: int = 8) -> int:
    """timm's channel rounding: the nearest multiple of `divisor`, never below 90% of value."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def padding(kernel_size: int, stride: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """timm's symmetric padding for `pad_type=''`."""
    pad = ((stride - 1) + (kernel_size - 1)) // 2
    return ((pad, pad), (pad, pad))


class SqueezeExcite(nnx.Module):
    """x * sigmoid(expand(silu(reduce(mean over H, W of x)))), 1x1 convs with bias."""

    def __init__(self, features: int, reduced: int, *, layers: Layers, rngs: nnx.Rngs):
        self.conv_reduce = layers.conv(features, reduced, 1, use_bias=True, rngs=rngs)
        self.conv_expand = layers.conv(reduced, features, 1, use_bias=True, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.conv_expand(nnx.silu(self.conv_reduce(jnp.mean(x, (1, 2), keepdims=True))))
        return x * nnx.sigmoid(scale)


def drop_path(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Drops whole samples of a residual branch with probability `rate`, scaling the rest."""
    if key is None:
        raise ValueError("drop_path_rate > 0 needs a dropout key in training")
    keep = jax.random.bernoulli(key, 1.0 - rate, (x.shape[0], 1, 1, 1))
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class Block(nnx.Module):
    """timm's DepthwiseSeparableConv ("ds": dw, BN+SiLU, SE, pw, BN) or InvertedResidual ("ir":
    pw expansion, BN+SiLU, dw, BN+SiLU, SE, pw projection "pwl", BN), with the input added
    (through drop-path) where width and resolution stay."""

    def __init__(self, kind: str, in_features: int, out_features: int, *, kernel_size: int,
                 stride: int, expansion: int, drop_path_rate: float, layers: Layers,
                 rngs: nnx.Rngs):
        self.kind = kind
        self.has_skip = stride == 1 and in_features == out_features
        self.drop_path_rate = drop_path_rate
        mid = in_features if kind == "ds" else make_divisible(in_features * expansion)
        if kind == "ir":
            self.conv_pw = layers.conv(in_features, mid, 1, rngs=rngs)
            self.bn1 = layers.batch_norm(mid, rngs=rngs)
        self.conv_dw = layers.conv(mid, mid, kernel_size, stride=stride, groups=mid,
                                   padding=padding(kernel_size, stride), rngs=rngs)
        bn_dw = layers.batch_norm(mid, rngs=rngs)
        # timm's se_from_exp=False: the SE ratio applies to the block's input width.
        self.se = SqueezeExcite(mid, round(mid * (SE_RATIO / expansion)), layers=layers,
                                rngs=rngs)
        if kind == "ds":
            self.bn1 = bn_dw
            self.conv_pw = layers.conv(mid, out_features, 1, rngs=rngs)
            self.bn2 = layers.batch_norm(out_features, rngs=rngs)
        else:
            self.bn2 = bn_dw
            self.conv_pwl = layers.conv(mid, out_features, 1, rngs=rngs)
            self.bn3 = layers.batch_norm(out_features, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool, dropout_key: jax.Array | None
                 ) -> jax.Array:
        running = not train
        shortcut = x
        if self.kind == "ds":
            y = nnx.silu(self.bn1(self.conv_dw(x), use_running_average=running))
            y = self.bn2(self.conv_pw(self.se(y)), use_running_average=running)
        else:
            y = nnx.silu(self.bn1(self.conv_pw(x), use_running_average=running))
            y = nnx.silu(self.bn2(self.conv_dw(y), use_running_average=running))
            y = self.bn3(self.conv_pwl(self.se(y)), use_running_average=running)
        if not self.has_skip:
            return y
        if train and self.drop_path_rate > 0:
            y = drop_path(y, self.drop_path_rate, dropout_key)
        return y + shortcut


class EfficientNet(nnx.Module):
    """timm's EfficientNet `forward_features` (stem, stages, 1x1 head conv) of the B4 layout at
    the given multipliers. `features` is the latent's width, `stride` its downsampling."""

    def __init__(self, encoder: ConfigDict, *, layers: Layers, rngs: nnx.Rngs):
        layers = layers.native()

        def width(channels: int) -> int:
            return make_divisible(channels * encoder.width_multiplier)

        stem = width(STEM_FEATURES)
        self.conv_stem = layers.conv(3, stem, 3, stride=2, padding=padding(3, 2), rngs=rngs)
        self.bn1 = layers.batch_norm(stem, rngs=rngs)
        plan = [(kind, math.ceil(repeats * encoder.depth_multiplier), *rest)
                for kind, repeats, *rest in STAGES]
        total = sum(repeats for _, repeats, *_ in plan)
        stages, in_features, index = [], stem, 0
        for kind, repeats, kernel_size, stride, expansion, out in plan:
            blocks = []
            for k in range(repeats):
                blocks.append(Block(
                    kind, in_features, width(out), kernel_size=kernel_size,
                    stride=stride if k == 0 else 1, expansion=expansion,
                    drop_path_rate=encoder.drop_path_rate * index / total, layers=layers,
                    rngs=rngs))
                in_features, index = width(out), index + 1
            stages.append(nnx.List(blocks))
        self.blocks = nnx.List(stages)
        self.features = width(HEAD_FEATURES)
        self.conv_head = layers.conv(in_features, self.features, 1, rngs=rngs)
        self.bn2 = layers.batch_norm(self.features, rngs=rngs)
        self.stride = STRIDE

    def __call__(self, x: jax.Array, *, train: bool, dropout_key: jax.Array | None = None
                 ) -> jax.Array:
        running = not train
        x = nnx.silu(self.bn1(self.conv_stem(x), use_running_average=running))
        index = 0
        for stage in self.blocks:
            for block in stage:
                key = None if dropout_key is None else jax.random.fold_in(dropout_key, index)
                x = block(x, train=train, dropout_key=key)
                index += 1
        return nnx.silu(self.bn2(self.conv_head(x), use_running_average=running))


def build(model_config: ConfigDict, *, layers: Layers, rngs: nnx.Rngs) -> EfficientNet:
    return EfficientNet(model_config.encoder, layers=layers, rngs=rngs)
