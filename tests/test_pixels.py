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


def test_to_uint8_undoes_normalize_for_every_value():
    every_value = np.arange(256, dtype=np.uint8)
    back = pixels.to_uint8(np.asarray(pixels.normalize(jnp.asarray(every_value))))
    np.testing.assert_array_equal(back, every_value)
