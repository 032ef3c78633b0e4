"""The paper's CAE on EfficientNet-B4: FaceForensics++ c23, all four methods, 299x299 faces.

configs/ffpp_c23.py (same prepared data, schedule and loss) with timm's `efficientnet_b4`
as the shared encoder (380x380 native; at 299 its latent is 10x10x1792, the decoder's five
stride-2 stages reach 320 and resize to 299 as for Xception). ImageNet weights: save timm's
`efficientnet_b4` state dict as safetensors, then `cae-jax import-weights --format timm --arch
efficientnet_b4 --input efficientnet_b4.safetensors --output weights/efficientnet_b4` and pass
`--config.init_from=weights/efficientnet_b4` (random init when empty). The encoder normalizes
its input with ImageNet's mean and std, as timm's weights expect (`backbones.efficientnet`).
"""

from cae_jax.backbones import efficientnet
from cae_jax.config import load_config, shipped_config


def get_config():
    config = load_config(shipped_config("ffpp_c23"))
    config.model.encoder = efficientnet.encoder_config()
    config.model.bn_epsilon = 1e-5  # timm's BatchNorm2d, which its weights were trained with.
    return config
