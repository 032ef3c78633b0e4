"""The joint objective L = BCE(logit, label) + lambda * recon(x_hat, x), each term reported."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict


def reconstruction_error(recon: jax.Array, images: jax.Array, kind: str) -> jax.Array:
    """Per-example mean squared ("mse") or absolute ("l1") pixel error, shape [N]."""
    diff = recon.astype(jnp.float32) - images.astype(jnp.float32)
    if kind == "mse":
        per_pixel = jnp.square(diff)
    else:  # "l1"; config.RULES admits no other.
        per_pixel = jnp.abs(diff)
    return jnp.mean(per_pixel, axis=tuple(range(1, diff.ndim)))


def joint_loss(
    logits: jax.Array,
    recon: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    loss_config: ConfigDict,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns (total, {"bce", "recon", "loss"}), each a mean over the batch.

    With `loss.recon_real_only` the reconstruction term averages over real faces only (0 in a
    batch without one), the autoencoder then modelling real faces alone.
    """
    bce_mean = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32)))
    recon_error = reconstruction_error(recon, images, loss_config.recon)
    if loss_config.recon_real_only:
        real = (labels == 0).astype(jnp.float32)
        recon_mean = jnp.sum(recon_error * real) / jnp.maximum(jnp.sum(real), 1.0)
    else:
        recon_mean = jnp.mean(recon_error)
    total = bce_mean + loss_config.recon_weight * recon_mean
    return total, {"bce": bce_mean, "recon": recon_mean, "loss": total}
