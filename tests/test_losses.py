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


def bce(z, y):
    p = 1 / (1 + math.exp(-z))
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def loss_config(**kw):
    c = config_lib.default_config().loss
    c.update(kw)
    return c


def test_bce_and_mse_terms():
    total, terms = losses.joint_loss(LOGITS, RECON, IMAGES, LABELS, loss_config(recon_weight=0.5))
    want_bce = (bce(2.0, 1) + bce(-1.0, 0) + bce(0.5, 0)) / 3
    want_mse = (0.0 + 0.25 + 1.0) / 3  # Per-example means of squared errors, then the mean.
    assert float(terms["bce"]) == pytest.approx(want_bce, rel=1e-6)
    assert float(terms["recon"]) == pytest.approx(want_mse, rel=1e-6)
    assert float(total) == pytest.approx(want_bce + 0.5 * want_mse, rel=1e-6)
    assert float(terms["loss"]) == float(total)


def test_l1_and_real_only():
    _, terms = losses.joint_loss(LOGITS, RECON, IMAGES, LABELS, loss_config(recon="l1"))
    assert float(terms["recon"]) == pytest.approx((0.0 + 0.5 + 1.0) / 3, rel=1e-6)
    _, terms = losses.joint_loss(LOGITS, RECON, IMAGES, LABELS, loss_config(recon_real_only=True))
    assert float(terms["recon"]) == pytest.approx((0.25 + 1.0) / 2, rel=1e-6)  # Reals: 1 and 2.


def test_real_only_reconstruction_is_zero_without_a_real_face():
    fakes = np.ones(3, np.int32)
    _, terms = losses.joint_loss(LOGITS, RECON, IMAGES, fakes, loss_config(recon_real_only=True))
    assert float(terms["recon"]) == 0.0
