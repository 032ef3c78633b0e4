"""The model's pixel convention, both ways: uint8 [0, 255] in, float [-1, 1] out and back.

`models.CAE` normalizes its uint8 input to [-1, 1], the range its decoder reconstructs (and
Xception's own input); reconstructions go back to uint8 to be shown beside the inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


@jax.jit
def normalize(images: jax.Array) -> jax.Array:
    """uint8 [0, 255] -> float32 [-1, 1].

    Written as (x - 127.5) / 127.5 so 0 and 255 land exactly on -1 and 1.
    """
    return (images.astype(jnp.float32) - 127.5) / 127.5


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float [-1, 1] -> uint8 [0, 255] for display, rounded so that it undoes `normalize`
    exactly; values outside the range are clipped."""
    return np.rint(np.clip((images + 1.0) * 127.5, 0, 255)).astype(np.uint8)
