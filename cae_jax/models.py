"""The two-branch convolutional autoencoder: a shared encoder, decoder, classifier (Flax NNX).

The encoder is the backbone `model.encoder.name` picks (`cae_jax/backbones`: Xception, the
paper's, by default); the decoder and classifier take its latent's width. Layers are built by
`cae_jax.layers.Layers`, in the forms `model.layer_impl` picks for the platform.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from cae_jax import backbones, ops, pixels
from cae_jax.layers import CONV_INIT, Layers


class ConvTranspose(nnx.Module):
    """nnx.ConvTranspose ("SAME", no bias) in the form `ops` picks; same parameters."""

    def __init__(self, in_features: int, out_features: int, kernel_size: int, *, stride: int,
                 layers: Layers, rngs: nnx.Rngs):
        shape = (kernel_size, kernel_size, in_features, out_features)
        self.kernel = nnx.Param(CONV_INIT(rngs.params(), shape))
        self.stride = stride
        self.impl = layers.impl
        self.dtype = jnp.dtype(layers.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(self.dtype)
        return ops.conv_transpose(x.astype(self.dtype), kernel, self.stride, self.impl)


class Decoder(nnx.Module):
    """Latent -> image: ConvTranspose(stride 2) + BN + ReLU stages, a 3x3 conv to RGB, resized
    to `image_size` where the stages overshoot it, then `output_activation`."""

    def __init__(self, in_features: int, features: Sequence[int], *, kernel_size: int,
                 output_activation: str, image_size: int, layers: Layers, rngs: nnx.Rngs):
        ins = [in_features, *features[:-1]]
        self.ups = nnx.List([ConvTranspose(i, o, kernel_size, stride=2, layers=layers, rngs=rngs)
                             for i, o in zip(ins, features, strict=True)])
        self.bns = nnx.List([layers.batch_norm(o, rngs=rngs) for o in features])
        self.to_rgb = layers.conv(features[-1], 3, 3, padding="SAME", use_bias=True, rngs=rngs)
        self.output_activation = output_activation
        self.image_size = image_size

    def __call__(self, z: jax.Array, *, train: bool) -> jax.Array:
        x = z
        for up, bn in zip(self.ups, self.bns, strict=True):
            x = nnx.relu(bn(up(x), use_running_average=not train))
        x = self.to_rgb(x).astype(jnp.float32)
        if x.shape[1:3] != (self.image_size, self.image_size):
            x = resize_bilinear(x, self.image_size)
        return jnp.tanh(x) if self.output_activation == "tanh" else jax.nn.sigmoid(x)


def bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices [out, K] and weights [out, K] of `jax.image.resize`'s antialiased
    bilinear (triangle) kernel along one axis, as its `compute_weight_mat` makes them."""
    scale = out_size / in_size
    kernel_scale = max(1 / scale, 1.0)
    sample = (np.arange(out_size) + 0.5) / scale - 0.5
    weights = np.maximum(0.0, 1 - np.abs(sample[:, None] - np.arange(in_size)) / kernel_scale)
    weights /= weights.sum(axis=1, keepdims=True)
    weights[(sample < -0.5) | (sample > in_size - 0.5)] = 0.0
    nonzero = weights > 0
    starts = np.argmax(nonzero, axis=1)
    taps = int(nonzero.sum(axis=1).max())
    index = starts[:, None] + np.arange(taps)
    tap_weights = np.take_along_axis(weights, np.minimum(index, in_size - 1), axis=1)
    return np.minimum(index, in_size - 1), np.where(index < in_size, tap_weights, 0.0)


def resize_bilinear(x: jax.Array, size: int) -> jax.Array:
    """`jax.image.resize(x, [N, size, size, C], "bilinear")` of NHWC `x`, as a few gathers and
    multiply-adds per axis: jax.image makes it a HIGHEST-precision matrix product, which XLA's
    GPU compiler rejects with its default flags."""
    for axis in (1, 2):
        index, weights = bilinear_taps(x.shape[axis], size)
        shape = [1] * x.ndim
        shape[axis] = size
        x = sum(jnp.take(x, index[:, k], axis=axis)
                * jnp.asarray(weights[:, k].reshape(shape), x.dtype)
                for k in range(index.shape[1]))
    return x


class Classifier(nnx.Module):
    """Global average pooling, Dense + ReLU + Dropout layers, one logit."""

    def __init__(self, in_features: int, hidden: Sequence[int], *, dropout: float, dtype: str,
                 rngs: nnx.Rngs):
        ins = [in_features, *hidden]
        self.hidden = nnx.List([nnx.Linear(i, o, dtype=jnp.dtype(dtype), rngs=rngs)
                                for i, o in zip(ins, hidden, strict=False)])
        self.dropout = nnx.Dropout(dropout)
        self.out = nnx.Linear(ins[-1], 1, dtype=jnp.dtype(dtype), rngs=rngs)

    def __call__(self, z: jax.Array, *, train: bool, dropout_key: jax.Array | None) -> jax.Array:
        x = jnp.mean(z, axis=(1, 2))
        for layer in self.hidden:
            x = self.dropout(nnx.relu(layer(x)), deterministic=not train, rngs=dropout_key)
        return self.out(x)[:, 0].astype(jnp.float32)


# Folded into the dropout key for the encoder's own stochastic layers (drop-path), so the
# classifier's dropout draws what it drew before encoders had any.
ENCODER_STREAM = 1


class CAE(nnx.Module):
    """Shared encoder feeding a reconstruction decoder and a real/fake classifier."""

    def __init__(self, model_config: ConfigDict, rngs: nnx.Rngs, bn_groups: int = 1):
        layers = Layers.from_config(model_config, bn_groups)
        decoder, classifier = model_config.decoder, model_config.classifier
        self.backbone = backbones.name_of(model_config)
        self.encoder = backbones.backbone(model_config).build(model_config, layers=layers,
                                                              rngs=rngs)
        self.decoder = Decoder(
            self.encoder.features, decoder.features, kernel_size=decoder.kernel_size,
            output_activation=decoder.output_activation, image_size=model_config.image_size,
            layers=layers, rngs=rngs)
        self.classifier = Classifier(self.encoder.features, classifier.hidden,
                                     dropout=classifier.dropout, dtype=model_config.dtype,
                                     rngs=rngs)

    def __call__(
        self, images: jax.Array, *, train: bool, dropout_key: jax.Array | None = None
    ) -> dict[str, jax.Array]:
        """images: uint8 (or float) [N, H, W, 3] pixel values in [0, 255] -> {"logit" [N],
        "reconstruction" [N, H, W, 3], "target" (what the decoder reconstructs: the images in
        [-1, 1]), "latent" (the encoder's feature map)}: a mapping, so a loss on any of them
        (`losses.TERMS`) needs no other change.

        The model owns its input's normalization: the encoder sees the images in its own
        (`backbones.encoder_input`), the decoder reconstructs them in [-1, 1]
        (`pixels.normalize`), whatever the encoder."""
        target = pixels.normalize(images)
        encoder_key = (None if dropout_key is None
                       else jax.random.fold_in(dropout_key, ENCODER_STREAM))
        z = self.encoder(backbones.encoder_input(target, backbones.BACKBONES[self.backbone]),
                         train=train, dropout_key=encoder_key)
        logit = self.classifier(z, train=train, dropout_key=dropout_key)
        return {"logit": logit, "reconstruction": self.decoder(z, train=train),
                "target": target, "latent": z}


def build_model(model_config: ConfigDict, seed: int = 0, bn_groups: int = 1) -> CAE:
    """The CAE; `bn_groups`: how many groups of the batch get their own BatchNorm statistics
    in training (`train_step.bn_groups` derives it from `model.bn_group` and the mesh)."""
    return CAE(model_config, nnx.Rngs(params=seed), bn_groups)


def split_model(model: CAE) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    return graphdef, params, batch_stats


def abstract_model(model_config: ConfigDict, bn_groups: int = 1
                   ) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """GraphDef and shape-only (params, batch_stats) of the model: no memory, no compute."""
    return split_model(nnx.eval_shape(lambda: build_model(model_config, bn_groups=bn_groups)))


def forward(graphdef: nnx.GraphDef, params: nnx.State, batch_stats: nnx.State,
            images: jax.Array, *, train: bool, dropout_key: jax.Array | None = None
            ) -> tuple[dict[str, jax.Array], nnx.State]:
    """Runs the model from its arrays on uint8 (or [0, 255] float) images:
    (`CAE.__call__`'s outputs, updated batch_stats)."""
    model = nnx.merge(graphdef, params, batch_stats, copy=True)
    outputs = model(images, train=train, dropout_key=dropout_key)
    return outputs, nnx.state(model, nnx.BatchStat)
