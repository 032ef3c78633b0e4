"""The joint objective: a weighted sum of named terms, L = sum_t loss.<t>_weight * t, each
term a mean over the batch and each reported.

`TERMS` maps each name to its function of the model's outputs (`CAE.__call__`: logit,
reconstruction, target, latent; the target is the model's input in [-1, 1], whatever the
encoder's own normalization) and the labels. A new term is one
function here, one entry in `TERMS` and its `loss.<name>_weight` in config.py. A term whose
weight is 0 is not computed, except the CAE's own two (bce, recon), which are always reported.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict

ALWAYS_REPORTED = ("bce", "recon")
# SSIM (Wang et al. 2004): 11x11 Gaussian window of sigma 1.5, on [0, 1] pixels.
SSIM_WINDOW, SSIM_SIGMA, SSIM_C1, SSIM_C2 = 11, 1.5, 0.01**2, 0.03**2


def reconstruction_error(recon: jax.Array, target: jax.Array, kind: str) -> jax.Array:
    """Per-example mean squared ("mse") or absolute ("l1") pixel error, shape [N]."""
    diff = recon.astype(jnp.float32) - target.astype(jnp.float32)
    if kind == "mse":
        per_pixel = jnp.square(diff)
    else:  # "l1"; config.RULES admits no other.
        per_pixel = jnp.abs(diff)
    return jnp.mean(per_pixel, axis=tuple(range(1, diff.ndim)))


def ssim(x: jax.Array, y: jax.Array) -> jax.Array:
    """Per-example mean SSIM of images in [-1, 1] ([N, H, W, C], H and W >= 11), over the
    positions where the window fits and over channels, as skimage's `structural_similarity`
    (gaussian_weights, sigma 1.5, population covariance, data range 1) on [0, 1] pixels."""
    x = (x.astype(jnp.float32) + 1) / 2
    y = (y.astype(jnp.float32) + 1) / 2
    taps = jnp.arange(SSIM_WINDOW, dtype=jnp.float32) - SSIM_WINDOW // 2
    g = jnp.exp(-0.5 * jnp.square(taps / SSIM_SIGMA))
    g = g / jnp.sum(g)
    channels = x.shape[-1]

    def blur(a: jax.Array) -> jax.Array:
        for kernel in (g[:, None], g[None, :]):  # Separable: rows, then columns.
            kernel = jnp.tile(kernel[:, :, None, None], (1, 1, 1, channels))
            a = jax.lax.conv_general_dilated(a, kernel, (1, 1), "VALID",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                             feature_group_count=channels)
        return a

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x * mu_x
    var_y = blur(y * y) - mu_y * mu_y
    cov = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + SSIM_C1) * (2 * cov + SSIM_C2)
                / ((mu_x * mu_x + mu_y * mu_y + SSIM_C1) * (var_x + var_y + SSIM_C2)))
    return jnp.mean(ssim_map, axis=(1, 2, 3))


def _batch_mean(per_example: jax.Array, labels: jax.Array, loss_config: ConfigDict
                ) -> jax.Array:
    """Mean over the batch, or over its real faces with `loss.recon_real_only` (0 in a batch
    without one): the reconstruction terms' average."""
    if not loss_config.recon_real_only:
        return jnp.mean(per_example)
    real = (labels == 0).astype(jnp.float32)
    return jnp.sum(per_example * real) / jnp.maximum(jnp.sum(real), 1.0)


def bce(outputs: dict, labels: jax.Array, loss_config: ConfigDict) -> jax.Array:
    del loss_config
    return jnp.mean(optax.sigmoid_binary_cross_entropy(outputs["logit"],
                                                       labels.astype(jnp.float32)))


def recon(outputs: dict, labels: jax.Array, loss_config: ConfigDict) -> jax.Array:
    """Pixel reconstruction error (`loss.recon`), real faces only with `recon_real_only`."""
    error = reconstruction_error(outputs["reconstruction"], outputs["target"], loss_config.recon)
    return _batch_mean(error, labels, loss_config)


def ssim_term(outputs: dict, labels: jax.Array, loss_config: ConfigDict) -> jax.Array:
    """1 - SSIM of the reconstruction, averaged as the pixel reconstruction term."""
    return _batch_mean(1.0 - ssim(outputs["reconstruction"], outputs["target"]), labels,
                       loss_config)


Term = Callable[[dict, jax.Array, ConfigDict], jax.Array]
TERMS: dict[str, Term] = {"bce": bce, "recon": recon, "ssim": ssim_term}


def joint_loss(
    outputs: dict[str, jax.Array],
    labels: jax.Array,
    loss_config: ConfigDict,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns (total, {term name: value, ..., "loss": total})."""
    terms = {}
    total = jnp.zeros((), jnp.float32)
    for name, term in TERMS.items():
        weight = loss_config[f"{name}_weight"]
        if weight == 0 and name not in ALWAYS_REPORTED:
            continue
        terms[name] = term(outputs, labels, loss_config)
        total = total + weight * terms[name]
    return total, {**terms, "loss": total}
