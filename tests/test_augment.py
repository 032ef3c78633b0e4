"""Augmentations: shape, dtype and range kept; each step does exactly its documented thing."""

import cv2
import numpy as np
import pytest

from cae_jax import augment
from cae_jax import config as config_lib
from tests import datasets


def face(size=48):
    return datasets.face_crop(3, size)


def augment_config(**probs):
    cfg = config_lib.default_config().input.augment
    for key in ("resize_prob", "flip_prob", "blur_prob", "brightness_contrast_prob", "jpeg_prob"):
        cfg[key] = probs.get(key, 0.0)
    return cfg


@pytest.mark.parametrize("seed", range(20))
def test_full_recipe_keeps_shape_dtype_and_range(seed):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8) if seed % 2 else face(40)
    resized = augment.random_resize(image, 48, rng, prob=1.0)
    out = augment.augment(resized, rng, config_lib.default_config().input.augment)
    assert out.shape == (48, 48, 3) and out.dtype == np.uint8 and out.flags.c_contiguous


def test_same_generator_state_gives_the_same_image():
    cfg = config_lib.default_config().input.augment
    a = augment.augment(face(), np.random.default_rng(7), cfg)
    b = augment.augment(face(), np.random.default_rng(7), cfg)
    np.testing.assert_array_equal(a, b)


def test_zero_probabilities_are_the_identity():
    image = face()
    out = augment.augment(image, np.random.default_rng(0), augment_config())
    np.testing.assert_array_equal(out, image)


def test_flip_is_exactly_a_mirror():
    image = face()
    out = augment.augment(image, np.random.default_rng(0), augment_config(flip_prob=1.0))
    np.testing.assert_array_equal(out, image[:, ::-1])


def test_probability_sets_the_frequency():
    cfg = augment_config(flip_prob=0.3)
    rng = np.random.default_rng(0)
    image = face(16)
    flipped = [not np.array_equal(augment.augment(image, rng, cfg), image) for _ in range(2000)]
    assert abs(np.mean(flipped) - 0.3) < 0.03


def test_brightness_contrast_follows_the_formula_and_clips():
    image = np.array([[[0, 100, 255]]], np.uint8)
    out = augment.brightness_contrast(image, np.random.default_rng(3), 0.1, 0.1)
    draws = np.random.default_rng(3)
    alpha, beta = 1 + draws.uniform(-0.1, 0.1), 255 * draws.uniform(-0.1, 0.1)
    expected = np.clip(np.round(image * alpha + beta), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(out, expected)
    dark = augment.brightness_contrast(np.zeros((2, 2, 3), np.uint8), _Fixed(-1.0), 0.1, 0.1)
    np.testing.assert_array_equal(dark, 0)  # Clipped at 0, not folded back positive.


class _Fixed:
    """A generator stand-in whose uniform draws sit at the low end of the range."""

    def __init__(self, at):
        self.at = at

    def uniform(self, low, high):
        return low if self.at < 0 else high


def test_blur_uses_an_odd_kernel_from_the_range():
    image = face()
    out = augment.gaussian_blur(image, np.random.default_rng(0), (3, 7))
    candidates = [cv2.GaussianBlur(image, (k, k), 0) for k in (3, 5, 7)]
    assert any(np.array_equal(out, c) for c in candidates)
    assert not np.array_equal(out, image)


def test_jpeg_quality_orders_the_error():
    image = face(64)
    error = {q: np.abs(augment.jpeg(image, q).astype(int) - image).mean() for q in (40, 70, 100)}
    assert error[100] < error[70] < error[40]
    assert error[100] < 2.0 and error[40] < 12.0  # Re-compressed, not destroyed.


def test_isotropic_resize_keeps_aspect_and_pads_with_zeros():
    image = np.full((20, 40, 3), 200, np.uint8)
    out = augment.isotropic_resize(image, 32)
    assert out.shape == (32, 32, 3)
    np.testing.assert_array_equal(out[:8], 0)
    np.testing.assert_array_equal(out[24:], 0)
    np.testing.assert_array_equal(out[8:24], 200)


def test_isotropic_resize_at_the_target_size_is_the_identity():
    image = face(32)
    assert augment.isotropic_resize(image, 32) is image


@pytest.mark.parametrize("source_size", [100, 20])  # Down- and upscaling.
def test_random_resize_picks_among_the_three_interpolation_pairs(source_size):
    image = face(source_size)
    options = {
        augment.isotropic_resize(image, 48, p).tobytes() for p in augment.RESIZE_INTERPOLATIONS
    }
    assert len(options) == 2  # Each direction has two distinct interpolations among the pairs.
    rng = np.random.default_rng(0)
    drawn = {augment.random_resize(image, 48, rng, 1.0).tobytes() for _ in range(30)}
    assert drawn == options
    default = augment.isotropic_resize(image, 48)
    np.testing.assert_array_equal(augment.random_resize(image, 48, rng, 0.0), default)
