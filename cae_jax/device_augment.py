"""Upscaling, flip, Gaussian blur and brightness/contrast inside the jitted train step.

With `input.augment.on_device` the host draws every choice with `augment.draw_interpolations`
and `augment.draw` (so from the record's grain generator, as in host augmentation) and sends it
with the batch; this module applies them per example, as `augment.isotropic_resize` and
`augment.apply` do on the host, in plain XLA ops (no custom calls), on uint8-valued images
before normalization. A crop smaller than the model's input travels top-left in a zero canvas
(`place`) and is upscaled here; the host keeps decoding, downscaling, self-blending (on crops it
resized itself) and the JPEG re-compression, which then comes before the device's steps.
"""

from __future__ import annotations

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from cae_jax import augment

# Batch fields carrying `place`'s resize and `augment.draw`'s choices, with their dtypes on the
# way to the device.
PARAM_DTYPES = {"height": np.int32, "width": np.int32, "resized_height": np.int32,
                "resized_width": np.int32, "cubic": np.bool_, "flip": np.bool_,
                "blur_kernel": np.int32, "alpha": np.float32, "beta": np.float32}
# OpenCV's bicubic kernel parameter (jax.image's is -0.5).
CUBIC_A = -0.75


def param_fields(params: dict) -> dict[str, np.ndarray]:
    """One example's `augment.draw` choices as the numpy fields its batch carries."""
    return {f"aug_{name}": np.asarray(params[name], dtype) for name, dtype in PARAM_DTYPES.items()}


def place(image: np.ndarray, size: int, interpolations=augment.RESIZE_INTERPOLATIONS[0]
          ) -> tuple[np.ndarray, dict]:
    """`image` (no side over `size`) top-left in a zero `size` x `size` canvas, and the choices
    that make the train step resize it as `augment.isotropic_resize` would (an image at `size`
    stays as it is). A batch needs one image size; the device upscales cheaper than the host."""
    h, w = image.shape[:2]
    resized_h, resized_w = augment.resized_shape(h, w, size)
    if (h, w) != (size, size):
        image = np.pad(image, ((0, size - h), (0, size - w), (0, 0)))
    return image, {"height": h, "width": w, "resized_height": resized_h,
                   "resized_width": resized_w, "cubic": interpolations[1] == cv2.INTER_CUBIC}


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


def _cubic_weights(t: jax.Array) -> jax.Array:
    """OpenCV's Keys weights of the taps at -1, 0, 1, 2 for a sample at fraction `t` past 0."""
    a = CUBIC_A
    w0 = ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a
    w1 = ((a + 2) * t - (a + 3)) * t * t + 1
    w2 = ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1
    return jnp.stack([w0, w1, w2, 1 - w0 - w1 - w2], -1)


def _axis_taps(size: int, length, resized, cubic) -> tuple[jax.Array, jax.Array]:
    """Source indices and weights [size, 4] along one axis: `length` valid pixels resized to
    `resized`, centred in `size`, as OpenCV samples (pixel centres aligned, indices clamped
    into the valid pixels as its replicated border); zero weights outside the resized span."""
    out = jnp.arange(size) - (size - resized) // 2
    x = (out + 0.5) * (length / resized) - 0.5
    base = jnp.floor(x)
    t = x - base
    linear = jnp.stack([jnp.zeros_like(t), 1 - t, t, jnp.zeros_like(t)], -1)
    weights = jnp.where(cubic, _cubic_weights(t), linear)
    weights = jnp.where(((out >= 0) & (out < resized))[:, None], weights, 0.0)
    indices = jnp.clip(base.astype(jnp.int32)[:, None] + jnp.arange(-1, 3), 0, length - 1)
    return indices, weights


def _resize(image: jax.Array, choices: dict) -> jax.Array:
    """The valid top-left region of one [S, S, C] float image, resized and zero-padded centred
    to S x S by `choices`' sizes, not yet rounded. Elementwise sums, not matrix products (which
    may run at reduced precision, TF32 on GPUs): an image at S passes bit for bit."""
    size = image.shape[0]
    rows, row_weights = _axis_taps(size, choices["height"], choices["resized_height"],
                                   choices["cubic"])
    cols, col_weights = _axis_taps(size, choices["width"], choices["resized_width"],
                                   choices["cubic"])
    image = sum(row_weights[:, k, None, None] * image[rows[:, k]] for k in range(4))
    return sum(col_weights[None, :, k, None] * image[:, cols[:, k]] for k in range(4))


def _augment_one(image: jax.Array, choices: dict, taps: jax.Array) -> jax.Array:
    image = jnp.clip(jnp.round(_resize(image, choices)), 0, 255)
    image = jnp.where(choices["flip"], image[:, ::-1], image)
    kernel = choices["blur_kernel"]
    blurred = jnp.clip(jnp.round(_blur(image, taps[kernel])), 0, 255)
    image = jnp.where(kernel > 0, blurred, image)
    return jnp.round(jnp.clip(image * choices["alpha"] + choices["beta"], 0, 255))


def augment_batch(batch: dict[str, jax.Array], max_kernel: int) -> jax.Array:
    """uint8 `image` [B, S, S, 3] and the `aug_*` fields -> augmented float32 [B, S, S, 3],
    integer values in [0, 255]. `max_kernel`: the largest blur size `input.augment` allows."""
    taps = jnp.asarray(blur_taps(max_kernel))
    choices = {name: batch[f"aug_{name}"] for name in PARAM_DTYPES}
    return jax.vmap(lambda image, c: _augment_one(image, c, taps))(
        batch["image"].astype(jnp.float32), choices)
