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
    elif kind == "l1":
        per_pixel = jnp.abs(diff)
    else:
        raise ValueError(f"loss.recon must be mse or l1, got {kind!r}")
    return jnp.mean(per_pixel, axis=tuple(range(1, diff.ndim)))


def _weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def joint_loss(
    logits: jax.Array,
    recon: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    loss_config: ConfigDict,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns (total, {"bce", "recon", "loss"}); `mask` [N] excludes padded examples."""
    weights = jnp.ones(logits.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    bce = optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32))
    recon_weights = weights
    if loss_config.recon_real_only:
        recon_weights = weights * (labels == 0).astype(jnp.float32)
    bce_mean = _weighted_mean(bce, weights)
    recon_mean = _weighted_mean(
        reconstruction_error(recon, images, loss_config.recon), recon_weights
    )
    total = bce_mean + loss_config.recon_weight * recon_mean
    return total, {"bce": bce_mean, "recon": recon_mean, "loss": total}
