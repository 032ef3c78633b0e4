"""Face-crop augmentations of DeepfakeBench's Xception recipe, on uint8 RGB numpy arrays.

Every function takes and returns uint8 HxWx3 arrays (values stay in [0, 255]) and draws its
randomness from the `np.random.Generator` it is given, so grain's per-record generators make
them reproducible and resumable. They run in grain's reader threads: OpenCV releases the GIL.
"""

from __future__ import annotations

import cv2
import numpy as np
from ml_collections import ConfigDict

# (downscale, upscale) interpolations of DeepfakeBench's three IsotropicResize variants.
RESIZE_INTERPOLATIONS = (
    (cv2.INTER_AREA, cv2.INTER_CUBIC),
    (cv2.INTER_AREA, cv2.INTER_LINEAR),
    (cv2.INTER_LINEAR, cv2.INTER_LINEAR),
)


def isotropic_resize(image: np.ndarray, size: int, interpolations=RESIZE_INTERPOLATIONS[0]):
    """Scales the longer side to `size` keeping the aspect ratio, then zero-pads to a square.

    A stretched face would teach the detector a distortion that test faces do not have.
    """
    h, w = image.shape[:2]
    if (h, w) != (size, size):
        scale = size / max(h, w)
        new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
        interpolation = interpolations[0] if scale < 1 else interpolations[1]
        image = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
        top, left = (size - new_h) // 2, (size - new_w) // 2
        image = cv2.copyMakeBorder(
            image, top, size - new_h - top, left, size - new_w - left, cv2.BORDER_CONSTANT, value=0
        )
    return image


def random_resize(image: np.ndarray, size: int, rng: np.random.Generator, prob: float):
    """`isotropic_resize`, with probability `prob` by a randomly chosen interpolation pair."""
    if rng.random() < prob:
        return isotropic_resize(image, size, RESIZE_INTERPOLATIONS[rng.integers(3)])
    return isotropic_resize(image, size)


def gaussian_blur(image: np.ndarray, rng: np.random.Generator, kernel_range: tuple[int, int]):
    """Blur with an odd kernel size drawn from `kernel_range`; sigma follows from the size."""
    sizes = list(range(kernel_range[0] | 1, kernel_range[1] + 1, 2))
    k = int(rng.choice(sizes))
    return cv2.GaussianBlur(image, (k, k), 0)


def brightness_contrast(
    image: np.ndarray, rng: np.random.Generator, brightness_limit: float, contrast_limit: float
):
    """x * (1 + c) + 255 * b with c, b uniform in +-limit (albumentations' convention)."""
    alpha = 1.0 + rng.uniform(-contrast_limit, contrast_limit)
    beta = 255.0 * rng.uniform(-brightness_limit, brightness_limit)
    lut = np.clip(np.arange(256) * alpha + beta, 0, 255).round().astype(np.uint8)
    return cv2.LUT(image, lut)


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """Re-encodes as JPEG at `quality`: the compression artifacts deepfakes are shared under."""
    ok, encoded = cv2.imencode(
        ".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    )
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for an image of shape {image.shape}")
    return cv2.cvtColor(cv2.imdecode(encoded, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def augment(image: np.ndarray, rng: np.random.Generator, cfg: ConfigDict) -> np.ndarray:
    """Flip, blur, brightness/contrast and JPEG, each applied with its probability in `cfg`.

    `cfg` is `config.input.augment`. The input is already at its final size (the resize runs
    first so every later step costs the same per image).
    """
    if rng.random() < cfg.flip_prob:
        image = cv2.flip(image, 1)
    if rng.random() < cfg.blur_prob:
        image = gaussian_blur(image, rng, cfg.blur_kernel)
    if rng.random() < cfg.brightness_contrast_prob:
        image = brightness_contrast(image, rng, cfg.brightness_limit, cfg.contrast_limit)
    if rng.random() < cfg.jpeg_prob:
        low, high = cfg.jpeg_quality
        image = jpeg(image, rng.integers(low, high + 1))
    return image
