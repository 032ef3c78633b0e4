"""The pixel convention both ways: uint8 -> [-1, 1] -> uint8."""

import jax.numpy as jnp
import numpy as np

from cae_jax import pixels


def test_normalize_maps_the_uint8_range_onto_minus_one_one():
    x = jnp.asarray(np.array([0, 51, 255], np.uint8))
    np.testing.assert_array_equal(np.asarray(pixels.normalize(x)), np.float32([-1.0, -0.6, 1.0]))


def test_to_uint8_clips_out_of_range_values():
    np.testing.assert_array_equal(pixels.to_uint8(np.float32([-1.5, -1.0, 1.0, 1.5])),
                                  [0, 0, 255, 255])
