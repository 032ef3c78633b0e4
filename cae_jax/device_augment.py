"""Flip, Gaussian blur and brightness/contrast inside the jitted train step (on the accelerator).

With `input.augment.on_device` the host draws every choice with `augment.draw` (so from the
record's grain generator, as in host augmentation) and sends it with the batch; this module
applies them per example, as `augment.apply` does on the host, in plain XLA ops (no custom
calls), on uint8-valued images before normalization. The host keeps decoding, resizing,
self-blending and the JPEG re-compression, which then comes before the device's steps.
"""

from __future__ import annotations

import cv2
import jax
import jax.numpy as jnp
import numpy as np

# Batch fields carrying `augment.draw`'s choices, with their dtypes on the way to the device.
PARAM_DTYPES = {"flip": np.bool_, "blur_kernel": np.int32, "alpha": np.float32,
                "beta": np.float32}


def param_fields(params: dict) -> dict[str, np.ndarray]:
    """One example's `augment.draw` choices as the numpy fields its batch carries."""
    return {f"aug_{name}": np.asarray(params[name], dtype) for name, dtype in PARAM_DTYPES.items()}


def blur_taps(max_kernel: int) -> np.ndarray:
    """Row k: OpenCV's 1-D Gaussian of size k (sigma from the size), centred in `max_kernel`
    taps; rows of even k and row 0 are the identity."""
    width = max(max_kernel, 1) | 1
    taps = np.zeros((width + 1, width), np.float32)
    taps[:, width // 2] = 1.0
    for k in range(3, width + 1, 2):
        taps[k] = 0.0
        start = (width - k) // 2
        taps[k, start : start + k] = cv2.getGaussianKernel(k, 0).ravel()
    return taps


def _blur(image: jax.Array, taps: jax.Array) -> jax.Array:
    """Separable blur of one [H, W, C] float image, borders reflected as OpenCV's default."""
    r = taps.shape[0] // 2
    h, w = image.shape[:2]
    padded = jnp.pad(image, ((r, r), (r, r), (0, 0)), mode="reflect")
    rows = sum(taps[t] * padded[t : t + h] for t in range(taps.shape[0]))
    return sum(taps[t] * rows[:, t : t + w] for t in range(taps.shape[0]))


def _augment_one(image, flip, blur_kernel, alpha, beta, taps):
    image = jnp.where(flip, image[:, ::-1], image)
    blurred = jnp.clip(jnp.round(_blur(image, taps[blur_kernel])), 0, 255)
    image = jnp.where(blur_kernel > 0, blurred, image)
    return jnp.round(jnp.clip(image * alpha + beta, 0, 255))


def augment_batch(batch: dict[str, jax.Array], max_kernel: int) -> jax.Array:
    """uint8 `image` [B, H, W, 3] and the `aug_*` fields -> augmented float32 [B, H, W, 3],
    integer values in [0, 255]. `max_kernel`: the largest blur size `input.augment` allows."""
    taps = jnp.asarray(blur_taps(max_kernel))
    return jax.vmap(lambda *args: _augment_one(*args, taps))(
        batch["image"].astype(jnp.float32), batch["aug_flip"], batch["aug_blur_kernel"],
        batch["aug_alpha"], batch["aug_beta"])
