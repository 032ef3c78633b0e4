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


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """The (height, width) that `isotropic_resize` scales an image to: longer side `size`."""
    scale = size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def isotropic_resize(image: np.ndarray, size: int, interpolations=RESIZE_INTERPOLATIONS[0]):
    """Scales the longer side to `size` keeping the aspect ratio, then zero-pads to a square.

    A stretched face would teach the detector a distortion that test faces do not have.
    """
    h, w = image.shape[:2]
    if (h, w) != (size, size):
        new_h, new_w = resized_shape(h, w, size)
        interpolation = interpolations[0] if max(h, w) > size else interpolations[1]
        image = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
        top, left = (size - new_h) // 2, (size - new_w) // 2
        image = cv2.copyMakeBorder(
            image, top, size - new_h - top, left, size - new_w - left, cv2.BORDER_CONSTANT, value=0
        )
    return image


def draw_interpolations(rng: np.random.Generator, prob: float) -> tuple[int, int]:
    """`random_resize`'s interpolation pair: with probability `prob` a random one of the three."""
    if rng.random() < prob:
        return RESIZE_INTERPOLATIONS[rng.integers(3)]
    return RESIZE_INTERPOLATIONS[0]


def random_resize(image: np.ndarray, size: int, rng: np.random.Generator, prob: float):
    """`isotropic_resize`, with probability `prob` by a randomly chosen interpolation pair."""
    return isotropic_resize(image, size, draw_interpolations(rng, prob))


def blur_sizes(kernel_range: tuple[int, int]) -> list[int]:
    """The odd kernel sizes `gaussian_blur` draws from."""
    return list(range(kernel_range[0] | 1, kernel_range[1] + 1, 2))


def blur(image: np.ndarray, kernel: int) -> np.ndarray:
    """OpenCV's Gaussian blur with a `kernel` x `kernel` window; sigma follows from the size."""
    return cv2.GaussianBlur(image, (kernel, kernel), 0)


def gaussian_blur(image: np.ndarray, rng: np.random.Generator, kernel_range: tuple[int, int]):
    """Blur with an odd kernel size drawn from `kernel_range`."""
    return blur(image, int(rng.choice(blur_sizes(kernel_range))))


def scale_shift(image: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """round(clip(x * alpha + beta, 0, 255)) through a lookup table."""
    lut = np.clip(np.arange(256) * alpha + beta, 0, 255).round().astype(np.uint8)
    return cv2.LUT(image, lut)


def brightness_contrast(
    image: np.ndarray, rng: np.random.Generator, brightness_limit: float, contrast_limit: float
):
    """x * (1 + c) + 255 * b with c, b uniform in +-limit (albumentations' convention)."""
    alpha = 1.0 + rng.uniform(-contrast_limit, contrast_limit)
    beta = 255.0 * rng.uniform(-brightness_limit, brightness_limit)
    return scale_shift(image, alpha, beta)


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """Re-encodes as JPEG at `quality`: the compression artifacts deepfakes are shared under."""
    ok, encoded = cv2.imencode(
        ".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    )
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for an image of shape {image.shape}")
    return cv2.cvtColor(cv2.imdecode(encoded, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def draw(rng: np.random.Generator, augment_config) -> dict:
    """The random choices of `augment` for one image, drawn in its order from `rng`.

    `augment_config`: `config.input.augment`, or any object with its fields as attributes.

    {"flip": bool, "blur_kernel": odd size or 0 (none), "alpha", "beta": the brightness/
    contrast scale and shift (1, 0: none), "jpeg_quality": int or 0 (none)}. With
    `input.augment.on_device` the host draws them so and the train step applies all but the
    JPEG: the same rng stream gives the same choices wherever they are applied.
    """
    params = {"flip": bool(rng.random() < augment_config.flip_prob), "blur_kernel": 0,
              "alpha": 1.0, "beta": 0.0, "jpeg_quality": 0}
    if rng.random() < augment_config.blur_prob:
        params["blur_kernel"] = int(rng.choice(blur_sizes(augment_config.blur_kernel)))
    if rng.random() < augment_config.brightness_contrast_prob:
        contrast, brightness = augment_config.contrast_limit, augment_config.brightness_limit
        params["alpha"] = 1.0 + rng.uniform(-contrast, contrast)
        params["beta"] = 255.0 * rng.uniform(-brightness, brightness)
    if rng.random() < augment_config.jpeg_prob:
        low, high = augment_config.jpeg_quality
        params["jpeg_quality"] = int(rng.integers(low, high + 1))
    return params


def apply(image: np.ndarray, params: dict, *, geometric_and_colour: bool = True) -> np.ndarray:
    """Applies `draw`'s choices: flip, blur, brightness/contrast (unless the device does them
    after the host, `geometric_and_colour=False`), then JPEG."""
    if geometric_and_colour:
        if params["flip"]:
            image = cv2.flip(image, 1)
        if params["blur_kernel"]:
            image = blur(image, params["blur_kernel"])
        if params["alpha"] != 1.0 or params["beta"] != 0.0:
            image = scale_shift(image, params["alpha"], params["beta"])
    if params["jpeg_quality"]:
        image = jpeg(image, params["jpeg_quality"])
    return image


def augment(image: np.ndarray, rng: np.random.Generator, augment_config: ConfigDict) -> np.ndarray:
    """Flip, blur, brightness/contrast and JPEG, each applied with its probability in
    `augment_config` (`config.input.augment`). The input is already at its final size (the
    resize runs first so every later step costs the same per image).
    """
    return apply(image, draw(rng, augment_config))


def on_device(augment_config: ConfigDict, backend: str) -> bool:
    """Whether upscaling, flip, blur and brightness/contrast run in the train step
    (`on_device`: "auto" = on GPU and TPU, where host cores are the scarce resource; "on";
    "off")."""
    choice = augment_config.on_device  # One of config.RULES' choices.
    return choice == "on" or (choice == "auto" and backend in ("gpu", "tpu"))
