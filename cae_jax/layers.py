"""How the model's convs and BatchNorms are built: the `Layers` builder every module shares.

Convolutions and BatchNorm statistics come from `cae_jax.ops`, in the form `model.layer_impl`
picks for the platform the program is lowered for. The encoders (`cae_jax/backbones`), the
decoder and the classifier (`models.py`) all take a `Layers` and the widths they need.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict

from cae_jax import ops

CONV_INIT = nnx.initializers.he_normal()


@dataclasses.dataclass(frozen=True)
class Layers:
    """How each conv and BatchNorm of the model is built: compute dtype, layer forms
    (`cae_jax.ops`, by `model.layer_impl`) and BatchNorm conventions. The model's classes take
    this and the widths they need, not the whole config."""

    dtype: str
    impl: str
    bn_momentum: float
    bn_epsilon: float
    bn_groups: int = 1  # Groups of the batch with their own BatchNorm statistics.

    @classmethod
    def from_config(cls, model_config: ConfigDict, bn_groups: int = 1) -> Layers:
        return cls(model_config.dtype, model_config.layer_impl, model_config.bn_momentum,
                   model_config.bn_epsilon, bn_groups)

    def native(self) -> Layers:
        """The same layers in XLA's native forms on every platform (for layers `ops` has no
        CPU form of, such as grouped or 5x5 strided convs)."""
        return dataclasses.replace(self, impl="native")

    def conv(self, in_features: int, out_features: int, kernel_size: int, *, rngs: nnx.Rngs,
             stride: int = 1, padding: str | Sequence[tuple[int, int]] = "VALID",
             use_bias: bool = False, groups: int = 1) -> nnx.Conv:
        """nnx.Conv whose convolution runs in the form `ops` picks for the platform; grouped
        (`groups` > 1, e.g. depthwise) convs only in the native form."""
        if groups != 1 and self.impl != "native":
            raise ValueError(f"grouped convs have native forms only; layer_impl={self.impl!r}")
        return nnx.Conv(
            in_features, out_features, (kernel_size, kernel_size), strides=stride,
            padding=padding, use_bias=use_bias, feature_group_count=groups,
            dtype=jnp.dtype(self.dtype), kernel_init=CONV_INIT,
            conv_general_dilated=ops.conv_fn(self.impl, in_features, out_features, kernel_size,
                                             stride),
            rngs=rngs,
        )

    def batch_norm(self, features: int, *, rngs: nnx.Rngs) -> BatchNorm:
        return BatchNorm(features, layer_impl=self.impl, groups=self.bn_groups,
                         momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                         dtype=jnp.dtype(self.dtype), rngs=rngs)


class BatchNorm(nnx.BatchNorm):
    """nnx.BatchNorm over NHWC whose training statistics come from `ops.batch_norm_train`: on
    the CPU with its gradient written out. Same parameters, statistics and values.

    With `groups` > 1 the batch is cut into that many consecutive groups, each normalized by
    its own statistics (a batch sharded over the mesh: the examples of 1 or N devices), and the
    running averages take their mean."""

    def __init__(self, features: int, *, layer_impl: str, groups: int = 1, **kwargs):
        super().__init__(features, **kwargs)
        self.impl = layer_impl
        self.groups = groups

    def __call__(self, x: jax.Array, *, use_running_average: bool) -> jax.Array:
        if use_running_average:
            return super().__call__(x, use_running_average=True)
        normalize = functools.partial(ops.batch_norm_train, epsilon=self.epsilon,
                                      impl=self.impl)
        x = x.astype(self.dtype)
        if self.groups == 1:
            y, mean, var = normalize(x, self.scale[...], self.bias[...])
        else:
            grouped = x.reshape(self.groups, x.shape[0] // self.groups, *x.shape[1:])
            y, mean, var = jax.vmap(normalize, in_axes=(0, None, None))(
                grouped, self.scale[...], self.bias[...])
            y, mean, var = y.reshape(x.shape), mean.mean(axis=0), var.mean(axis=0)
        self.mean[...] = self.momentum * self.mean[...] + (1 - self.momentum) * mean
        self.var[...] = self.momentum * self.var[...] + (1 - self.momentum) * var
        return y
