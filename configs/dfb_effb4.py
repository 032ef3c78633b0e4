"""DeepfakeBench's EfficientNet-B4 recipe (their training/config/detector/efficientnetb4.yaml)
as a pure classifier: timm's `efficientnet_b4` encoder and a linear head, no decoder loss.

Data: as configs/dfb_xception.py (their FF++ c23 JSON, 32 frames per video, 256x256). Encoder:
ImageNet EfficientNet-B4, `cae-jax import-weights --format timm --arch efficientnet_b4 ...
--output weights/efficientnet_b4_timm`.

Their recipe: resolution 256, batch 32, 10 epochs, 32 frames per video, Adam (lr 2e-4, betas
0.9/0.999, eps 1e-8, weight decay 5e-4) at a constant rate, no clipping, cross-entropy over
2 classes (here: one logit and BCE, the same model), no head dropout, flip 0.5, Gaussian blur
0.5 (3-7), brightness/contrast 0.5 (+-0.1), JPEG 40-100 at 0.5, no class balancing, seed 1024:
their Xception recipe's, so this config is configs/dfb_xception.py with the encoder swapped.
Differences left: their backbone is lukemelas' `efficientnet_pytorch` B4 (TF-style "same"
padding, its stem replaced by an unpadded 3x3/2 conv) where ours is timm's layout and
weights; they feed [-1, 1] pixels (mean = std = 0.5) to ImageNet-trained weights where our
encoder applies ImageNet's mean and std; their yaml trains on FF-NT alone and rotates (+-10
degrees, p 0.5), which cae-jax does not (we train on all of FF++ as their Xception recipe
does); weight decay is AdamW's decoupled decay (theirs is Adam's L2 term); model selection
uses the validation split.
"""

from cae_jax.backbones import efficientnet
from cae_jax.config import load_config, shipped_config


def get_config():
    config = load_config(shipped_config("dfb_xception"))
    config.init_from = "weights/efficientnet_b4_timm"
    config.model.encoder = efficientnet.encoder_config()
    # efficientnet_pytorch's default drop_connect_rate for B4, scaled per block as timm's.
    config.model.encoder.drop_path_rate = 0.2
    return config
