"""Self-blended images (Shiohara and Yamasaki, CVPR 2022): fakes made from real faces.

A real face crop is blended with a jittered copy of itself (colour, sharpness, a small shift
and scale) through a soft face-shaped mask. The result carries the traces every face swap
leaves (a blending boundary, colour and frequency mismatch) without any one method's
fingerprint, which is what makes detectors trained on it generalize across datasets.

Records store no landmarks, so the mask is not the landmark convex hull of the paper: it is
an ellipse placed where the face sits in a `cae-jax prepare` crop (centred, slightly below
the middle), with a randomly deformed outline, a random extent, and a random blur, scaled by
one of the paper's blend ratios. The documented choice trades the exact hull for no
landmark model at training time.
"""

from __future__ import annotations

import cv2
import numpy as np

BLEND_RATIOS = (0.25, 0.5, 0.75, 1.0, 1.0, 1.0)  # The paper's list: full blends twice as often.


def face_mask(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Soft face-shaped mask, float32 [height, width] in [0, 1], peak 1 before blend ratio."""
    cx = width * (0.5 + rng.uniform(-0.03, 0.03))
    cy = height * (0.55 + rng.uniform(-0.03, 0.03))
    ax = width * rng.uniform(0.26, 0.36)
    ay = height * rng.uniform(0.34, 0.44)
    tilt = np.deg2rad(rng.uniform(-10, 10))
    theta = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    # Low-frequency wobble of the outline: no two masks share a boundary.
    radius = np.ones_like(theta)
    for freq in (2, 3, 5):
        radius += rng.uniform(-0.05, 0.05) * np.cos(freq * theta + rng.uniform(0, 2 * np.pi))
    x, y = ax * radius * np.cos(theta), ay * radius * np.sin(theta)
    points = np.stack(
        [cx + x * np.cos(tilt) - y * np.sin(tilt), cy + x * np.sin(tilt) + y * np.cos(tilt)], -1
    )
    mask = np.zeros((height, width), np.float32)
    cv2.fillPoly(mask, [np.round(points).astype(np.int32)], 1.0)
    # Two blurs of random width, as in the paper, soften the edge by a random amount.
    for _ in range(2):
        k = 2 * int(rng.integers(max(1, height // 40), max(2, height // 12))) + 1
        mask = cv2.GaussianBlur(mask, (k, k), 0)
    return mask / max(float(mask.max()), 1e-6)


def _jitter_colour(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """RGB shift, HSV shift and brightness/contrast, the paper's source colour transforms."""
    x = image.astype(np.float32)
    if rng.random() < 0.3:
        x = x + rng.uniform(-20, 20, size=3).astype(np.float32)
    hsv = cv2.cvtColor(np.clip(x, 0, 255).astype(np.uint8), cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-0.3, 0.3) * 18) % 180
    hsv[..., 1:] *= 1 + rng.uniform(-0.3, 0.3, size=2).astype(np.float32)
    x = cv2.cvtColor(np.clip(hsv, 0, 255).astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
    x = x * (1 + rng.uniform(-0.1, 0.1)) + 255 * rng.uniform(-0.1, 0.1)
    return np.clip(x, 0, 255).astype(np.uint8)


def _jitter_frequency(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Either a down-and-up scaling (blur) or an unsharp mask (sharpen)."""
    h, w = image.shape[:2]
    if rng.random() < 0.5:
        factor = rng.choice([2, 4])
        small_size = (max(1, w // factor), max(1, h // factor))
        small = cv2.resize(image, small_size, interpolation=cv2.INTER_AREA)
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    amount = rng.uniform(0.2, 0.5)
    blurred = cv2.GaussianBlur(image, (0, 0), 1.0)
    return cv2.addWeighted(image, 1 + amount, blurred, -amount, 0)


def _jitter_geometry(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Shift by up to 3% and scale by 0.95..1.05 around the centre; edges replicate."""
    h, w = image.shape[:2]
    scale = rng.uniform(0.95, 1 / 0.95)
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), 0.0, scale)
    matrix[:, 2] += rng.uniform(-0.03, 0.03, size=2) * (w, h)
    return cv2.warpAffine(image, matrix, (w, h), borderMode=cv2.BORDER_REPLICATE)


def self_blend(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A self-blended fake of the real face `image` (uint8 HxWx3 RGB).

    Returns (blended uint8 HxWx3, mask float32 HxW in [0, 1]): pixel = source * mask +
    image * (1 - mask), where source is the jittered copy. As in the paper, the colour
    jitter goes to the source or to the target at random, so the blended region is not
    always the odd one out.
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"self_blend takes uint8 HxWx3 images, got {image.dtype} {image.shape}")
    source, target = image, image
    if rng.random() < 0.5:
        source = _jitter_colour(source, rng)
    else:
        target = _jitter_colour(target, rng)
    source = _jitter_geometry(_jitter_frequency(source, rng), rng)
    mask = face_mask(*image.shape[:2], rng) * rng.choice(BLEND_RATIOS)
    m = mask[..., None]
    blended = source.astype(np.float32) * m + target.astype(np.float32) * (1 - m)
    return np.clip(blended.round(), 0, 255).astype(np.uint8), mask.astype(np.float32)
