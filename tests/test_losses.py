"""Each loss term against a hand computation on small arrays."""

import math

import numpy as np
import pytest

from cae_jax import config as config_lib
from cae_jax import losses

LOGITS = np.array([2.0, -1.0, 0.5], np.float32)
LABELS = np.array([1, 0, 0], np.int32)
IMAGES = np.array([0.0, 0.5, -1.0], np.float32).reshape(3, 1, 1, 1) * np.ones((3, 1, 2, 1))
RECON = np.zeros((3, 1, 2, 1), np.float32)
OUTPUTS = {"logit": LOGITS, "reconstruction": RECON, "target": IMAGES}


def bce(z, y):
    p = 1 / (1 + math.exp(-z))
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def loss_config(**kw):
    c = config_lib.default_config().loss
    c.update(kw)
    return c


def test_bce_and_mse_terms():
    total, terms = losses.joint_loss(OUTPUTS, LABELS, loss_config(recon_weight=0.5))
    want_bce = (bce(2.0, 1) + bce(-1.0, 0) + bce(0.5, 0)) / 3
    want_mse = (0.0 + 0.25 + 1.0) / 3  # Per-example means of squared errors, then the mean.
    assert float(terms["bce"]) == pytest.approx(want_bce, rel=1e-6)
    assert float(terms["recon"]) == pytest.approx(want_mse, rel=1e-6)
    assert float(total) == pytest.approx(want_bce + 0.5 * want_mse, rel=1e-6)
    assert float(terms["loss"]) == float(total)
    assert sorted(terms) == ["bce", "loss", "recon"]  # SSIM's weight is 0: not computed.


def test_each_term_is_weighted_by_its_config_weight():
    _, alone = losses.joint_loss(OUTPUTS, LABELS, loss_config())
    total, terms = losses.joint_loss(OUTPUTS, LABELS,
                                     loss_config(bce_weight=0.0, recon_weight=2.0))
    assert float(total) == pytest.approx(2.0 * float(alone["recon"]), rel=1e-6)
    assert float(terms["bce"]) == pytest.approx(float(alone["bce"]), rel=1e-6)  # Still logged.


def test_ssim_term_is_skimages_ssim():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, 16, 20, 3)).astype(np.float32)
    recon = np.clip(images + rng.normal(0, 0.3, images.shape), -1, 1).astype(np.float32)
    labels = np.array([0, 1], np.int32)
    want = [structural_similarity((a + 1) / 2, (b + 1) / 2, gaussian_weights=True, sigma=1.5,
                                  use_sample_covariance=False, data_range=1.0, channel_axis=-1)
            for a, b in zip(recon, images, strict=True)]
    np.testing.assert_allclose(losses.ssim(recon, images), want, rtol=1e-4)
    outputs = {"logit": np.zeros(2, np.float32), "reconstruction": recon, "target": images}
    total, terms = losses.joint_loss(outputs, labels,
                                     loss_config(ssim_weight=0.5, recon_real_only=True))
    assert float(terms["ssim"]) == pytest.approx(1 - want[0], rel=1e-4)  # The real face only.
    assert float(total) == pytest.approx(
        float(terms["bce"]) + float(terms["recon"]) + 0.5 * (1 - want[0]), rel=1e-4)
    same = losses.ssim(images, images)
    np.testing.assert_allclose(same, [1.0, 1.0], rtol=1e-5)


def test_l1_and_real_only():
    _, terms = losses.joint_loss(OUTPUTS, LABELS, loss_config(recon="l1"))
    assert float(terms["recon"]) == pytest.approx((0.0 + 0.5 + 1.0) / 3, rel=1e-6)
    _, terms = losses.joint_loss(OUTPUTS, LABELS, loss_config(recon_real_only=True))
    assert float(terms["recon"]) == pytest.approx((0.25 + 1.0) / 2, rel=1e-6)  # Reals: 1 and 2.


def test_real_only_reconstruction_is_zero_without_a_real_face():
    fakes = np.ones(3, np.int32)
    _, terms = losses.joint_loss(OUTPUTS, fakes, loss_config(recon_real_only=True))
    assert float(terms["recon"]) == 0.0
