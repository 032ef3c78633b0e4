"""The encoders the CAE can share between its branches, by `model.encoder.name`.

Each backbone is one module that declares, once: `NAME`; `encoder_config()` (its
`model.encoder` defaults); `RULES` (checks of those fields, as `config.RULES`); `MEAN`/`STD`
(the input normalization its weights expect, on [0, 1] pixels); `latent_size(encoder,
image_size)` (the side of its feature map for an input side: its stem and stride arithmetic,
0 where nothing is left); `TIMM_ARCH` (the timm model
whose state dict `import-weights --format timm` reads) and `TIMM_CONVENTIONS` (the model
fields those weights need); and `build(model_config, layers=,
rngs=)`, an nnx.Module with `features` (the latent's width) and `stride` (its downsampling)
whose `__call__(x, train=, dropout_key=)` maps normalized images to a feature map.
A new backbone is one such module and one line in `BACKBONES`.
"""

from __future__ import annotations

import itertools
from types import ModuleType

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from cae_jax.backbones import efficientnet, xception

BACKBONES: dict[str, ModuleType] = {
    xception.NAME: xception,
    efficientnet.NAME: efficientnet,
}
# Configs written before `model.encoder.name` existed hold Xception's widths.
DEFAULT = xception.NAME


def name_of(model_config: ConfigDict) -> str:
    return model_config.encoder.get("name", DEFAULT)


def backbone(model_config: ConfigDict) -> ModuleType:
    """The module of the config's encoder; ValueError naming the choices for an unknown one."""
    name = name_of(model_config)
    if name not in BACKBONES:
        raise ValueError(f"model.encoder.name={name!r} is not one of {', '.join(BACKBONES)}")
    return BACKBONES[name]


def min_image_size(model_config: ConfigDict) -> int:
    """The smallest input side the config's encoder maps to a feature map (1x1 or more)."""
    module = backbone(model_config)
    return next(size for size in itertools.count(1)
                if module.latent_size(model_config.encoder, size) >= 1)


def encoder_input(images: jax.Array, module: ModuleType) -> jax.Array:
    """Images in [-1, 1] (the input pipeline's range and the reconstruction target), in the
    normalization `module`'s weights expect; unchanged where that is [-1, 1] itself."""
    if module.MEAN == (0.5, 0.5, 0.5) and module.STD == (0.5, 0.5, 0.5):
        return images
    mean, std = jnp.asarray(module.MEAN, images.dtype), jnp.asarray(module.STD, images.dtype)
    return ((images + 1) / 2 - mean) / std
