"""A bundle in memory: `load_bundle(dir)` -> `Predictor`, and the serving functions it runs.

What `predict`, `serve`, `evaluate` and the demo need to score faces with an exported bundle,
and nothing training or writing bundles needs: this module imports neither TensorFlow nor the
train step, so a service starts in the time it takes to read the weights.

Bundle metadata (model.json) also carries the operating point chosen at export
(`operating_point`: thresholds picked on validation data); `decision_threshold` reads it, with
the fixed 0.5 of bundles written before operating points existed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from cae_jax import config as config_lib
from cae_jax import flat_state, models
from cae_jax.ops import cpu_serving

MODEL_JSON = "model.json"
PARAMS_DIR = "params"
BUNDLE_VERSION = 1
DEFAULT_THRESHOLD = 0.5  # Bundles without an operating point.

Weights = tuple[nnx.State, nnx.State]  # (params, batch_stats)


def serving_fns(graphdef: nnx.GraphDef) -> dict[str, Callable]:
    """The two serving functions, `(weights, uint8 [N, H, W, 3]) -> outputs`.

    "classify" returns only the probability, so XLA drops the decoder; "reconstruct" also
    returns the reconstruction (float [-1, 1]) and the per-pixel error map |recon - input|
    averaged over channels (float [N, H, W], in [-1, 1] units: 0..2).
    """

    def run(weights: Weights, images: jax.Array):
        params, batch_stats = weights
        outputs, _ = models.forward(graphdef, params, batch_stats, images, train=False)
        return (jax.nn.sigmoid(outputs["logit"].astype(jnp.float32)),
                outputs["reconstruction"].astype(jnp.float32), outputs["target"])

    def classify(weights: Weights, images: jax.Array) -> dict[str, jax.Array]:
        return {"probability": run(weights, images)[0]}

    def reconstruct(weights: Weights, images: jax.Array) -> dict[str, jax.Array]:
        prob, recon, target = run(weights, images)
        error = jnp.mean(jnp.abs(recon - target), axis=-1)
        return {"probability": prob, "reconstruction": recon, "error_map": error}

    return {"classify": classify, "reconstruct": reconstruct}


def jit_serving(fn: Callable) -> Callable:
    """`jax.jit` of a serving function for this machine's devices; on the CPU with its
    serving tuning (`ops.cpu_serving`)."""
    if jax.default_backend() == "cpu":
        return cpu_serving.jit(fn)
    return jax.jit(fn)


def check_images(images, image_size: int) -> np.ndarray:
    """Raises a ValueError naming expected and given dtype/shape unless uint8 [N, S, S, 3]."""
    images = np.asarray(images)
    expected = f"uint8 [N, {image_size}, {image_size}, 3]"
    if images.dtype != np.uint8:
        raise ValueError(f"expected {expected} face crops, got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[1:] != (image_size, image_size, 3):
        raise ValueError(f"expected {expected} face crops, got shape {list(images.shape)}")
    return images


def decision_threshold(meta: dict, operating_point: str = "") -> tuple[float, str]:
    """(threshold, what it is) from a bundle's model.json: its chosen operating point (EER
    unless `operating_point` names another), or 0.5 where the bundle has none."""
    point = meta.get("operating_point")
    if not point or not point.get("thresholds"):
        if operating_point:
            reason = (point or {}).get("reason", "the bundle predates operating points")
            raise ValueError(f"--operating-point {operating_point}: the bundle has no "
                             f"operating points ({reason})")
        reason = (point or {}).get("reason", "bundle written without an operating point")
        return DEFAULT_THRESHOLD, f"0.5 (uncalibrated: {reason})"
    name = operating_point or point["default"]
    threshold = point["thresholds"].get(name)
    if threshold is None:
        raise ValueError(f"--operating-point {name}: not one of {sorted(point['thresholds'])}")
    return float(threshold), (f"{name} operating point on {point['data']} ({point['split']}, "
                              f"AUC {point['auc']:.4f}, {point['faces']} faces)")


class Predictor:
    """Scores uint8 face crops with a bundle's model, in fixed-size padded batches (one compile).

    With `buckets`, a batch of n faces is padded only to the next power of two (at most
    `batch_size`), one compile per size: a service's single requests then cost one face,
    not a full batch (`bucket_sizes` lists the sizes to compile ahead)."""

    def __init__(self, meta: dict, params: nnx.State, batch_stats: nnx.State, batch_size: int = 32,
                 *, buckets: bool = False):
        self.meta = meta
        self.image_size = int(meta["image_size"])
        self.batch_size = batch_size
        self.bucket_sizes = (sorted({min(1 << k, batch_size)
                                     for k in range(batch_size.bit_length() + 1)})
                             if buckets else [batch_size])
        graphdef, _, _ = models.abstract_model(ConfigDict(meta["model"]))
        self.params = params
        self.batch_stats = batch_stats
        self._fns = {name: jit_serving(fn) for name, fn in serving_fns(graphdef).items()}

    def _run(self, name: str, images) -> dict[str, np.ndarray]:
        images = check_images(images, self.image_size)
        outputs = []
        for start in range(0, max(len(images), 1), self.batch_size):  # One pass when empty.
            chunk = images[start : start + self.batch_size]
            size = next(b for b in self.bucket_sizes if b >= len(chunk))
            padded = np.zeros((size, *images.shape[1:]), np.uint8)
            padded[: len(chunk)] = chunk
            result = self._fns[name]((self.params, self.batch_stats), padded)
            outputs.append({k: np.asarray(v)[: len(chunk)] for k, v in result.items()})
        return {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}

    def predict_proba(self, images) -> np.ndarray:
        """uint8 [N, S, S, 3] -> float32 [N], probability of fake."""
        return self._run("classify", images)["probability"]

    def reconstruct(self, images) -> dict[str, np.ndarray]:
        """uint8 [N, S, S, 3] -> {"probability", "reconstruction", "error_map"}."""
        return self._run("reconstruct", images)


def read_meta(export_dir: str | os.PathLike) -> dict:
    """A bundle's model.json; clear errors for a wrong directory or a newer bundle."""
    root = Path(export_dir).absolute()
    meta_path = root / MODEL_JSON
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: not found; is {root} a `cae-jax export` bundle?")
    meta = json.loads(meta_path.read_text())
    if meta.get("bundle_version", 0) > BUNDLE_VERSION:
        raise ValueError(f"{meta_path}: bundle_version {meta['bundle_version']} is newer than "
                         f"this cae-jax reads ({BUNDLE_VERSION}); upgrade cae-jax to load it")
    try:  # Written by any release: fields added since take their defaults.
        meta["model"] = config_lib.from_saved(meta["model"], str(meta_path),
                                              config_lib.default_config().model).to_dict()
    except ValueError as err:
        raise ValueError(f"{meta_path}: not a model written by cae-jax export ({err})") from err
    return meta


def load_bundle(export_dir: str | os.PathLike, batch_size: int = 32, *,
                buckets: bool = False) -> Predictor:
    """Reads a bundle's model.json and parameters into a Predictor."""
    import orbax.checkpoint as ocp

    root = Path(export_dir).absolute()
    meta = read_meta(root)
    _, abstract_params, abstract_stats = models.abstract_model(ConfigDict(meta["model"]))
    params_dtype = jnp.bfloat16 if meta["dtype"] == "bfloat16" else None
    target = {
        "params": flat_state.restore_target(flat_state.flatten(abstract_params), params_dtype),
        "batch_stats": flat_state.restore_target(flat_state.flatten(abstract_stats)),
    }
    with ocp.StandardCheckpointer() as ckptr:
        loaded = ckptr.restore(root / PARAMS_DIR, target)
    try:
        params = flat_state.unflatten(abstract_params, loaded["params"])
        batch_stats = flat_state.unflatten(abstract_stats, loaded["batch_stats"])
    except ValueError as err:
        raise ValueError(f"{root / PARAMS_DIR}: {err} than {root / MODEL_JSON} describes") from err
    return Predictor(meta, params, batch_stats, batch_size, buckets=buckets)
