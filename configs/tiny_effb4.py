"""configs/tiny.py (64x64 input, tiny training) on EfficientNet-B4's layout, narrow and
shallow: for tests."""

from cae_jax.backbones import efficientnet
from cae_jax.config import load_config, shipped_config


def get_config():
    config = load_config(shipped_config("tiny"))
    config.model.bn_epsilon = 1e-5  # timm's.
    config.model.encoder = efficientnet.encoder_config()
    config.model.encoder.width_multiplier = 0.25
    config.model.encoder.depth_multiplier = 0.3
    return config
