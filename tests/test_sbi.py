"""Self-blended images: a real face blended with a jittered self through a face mask."""

import numpy as np
import pytest

from cae_jax import sbi
from tests import datasets


@pytest.mark.parametrize("seed", range(12))
def test_blend_keeps_shape_dtype_and_range(seed):
    image = datasets.face_crop(seed, 64)
    blended, mask = sbi.self_blend(image, np.random.default_rng(seed))
    assert blended.shape == image.shape and blended.dtype == np.uint8
    assert mask.shape == (64, 64) and mask.dtype == np.float32
    assert 0.0 <= mask.min() and mask.max() <= 1.0
    assert any(np.isclose(mask.max(), r, atol=1e-6) for r in sbi.BLEND_RATIOS)
    assert not np.array_equal(blended, image)


def test_same_seed_same_fake():
    image = datasets.face_crop(1, 64)
    a = sbi.self_blend(image, np.random.default_rng(5))
    b = sbi.self_blend(image, np.random.default_rng(5))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize("seed", range(8))
def test_outside_the_mask_the_target_is_kept(seed):
    image = datasets.face_crop(seed, 64)
    blended, mask = sbi.self_blend(image, np.random.default_rng(seed))
    jitter_on_source = np.random.default_rng(seed).random() < 0.5  # self_blend's first draw.
    outside = mask == 0
    assert outside.mean() > 0.2  # Corners and borders are never blended.
    if jitter_on_source:  # The untouched original shows wherever the mask is zero...
        np.testing.assert_array_equal(blended[outside], image[outside])
        inside = mask > 0.9 * mask.max()  # ...and the jittered copy where it is high.
        assert np.abs(blended[inside].astype(int) - image[inside]).mean() > 1.0


def test_mask_is_a_face_shaped_soft_blob():
    masks = np.stack([sbi.face_mask(100, 80, np.random.default_rng(s)) for s in range(50)])
    for mask in masks:
        ys, xs = np.nonzero(mask > 0.5)
        assert abs(xs.mean() - 40) < 6 and abs(ys.mean() - 55) < 6  # Centred, a bit low.
        assert 0.2 < (mask > 0.5).mean() < 0.6
        assert mask[0, 0] == 0 and mask[-1, -1] == 0
        assert ((mask > 0.05) & (mask < 0.95)).any()  # A soft edge, not a hard cut.
    assert len({m.tobytes() for m in masks}) == 50  # No two outlines alike.


def test_rejects_non_uint8_images():
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        sbi.self_blend(np.zeros((8, 8, 3), np.float32), np.random.default_rng(0))
