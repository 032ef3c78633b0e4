"""Training checkpoint -> inference bundle: parameters, TF SavedModel, `jax.export` artifacts.

A bundle directory holds everything serving needs and nothing training does (no optimizer or
iterator state, no training config):

  model.json         model config, export dtype, step, image size, signature description
  params/            Orbax checkpoint of {"params", "batch_stats"} as flat {"a.b.c": array}
                     (`flat_state`)
  saved_model/       TF SavedModel: "serving_default" (uint8 faces -> probability) and
                     "reconstruct" (-> probability, reconstruction, error map)
  classify.jax       `jax.export` artifact, weights inside: uint8 faces -> probability
  reconstruct.jax    `jax.export` artifact: uint8 faces -> (probability, reconstruction, error map)

The SavedModel and the `jax.export` artifacts hold programs for `DEFAULT_PLATFORMS` (cpu,
cuda, tpu) unless narrowed; model.json lists them.

`load_bundle(dir)` gives a `Predictor` for Python callers (`predict`, `evaluate`, the demo).
"""

from __future__ import annotations

import argparse
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
from cae_jax import flat_state, pixels, train_step
from cae_jax.ops import cpu_serving

MODEL_JSON = "model.json"
PARAMS_DIR = "params"
SAVED_MODEL_DIR = "saved_model"
JAX_EXPORTS = {"classify": "classify.jax", "reconstruct": "reconstruct.jax"}
DTYPES = ("float32", "bfloat16")
FORMATS = ("saved_model", "jax_export")  # Beside params/ and model.json, which are always written.
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
# Where bundles are served: each artifact holds one program per platform, each with that
# platform's layer forms (`cae_jax.ops`), so a bundle exported on a CPU serves on GPU and TPU.
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
BUNDLE_VERSION = 1

Weights = tuple[nnx.State, nnx.State]  # (params, batch_stats)
def serving_fns(graphdef: nnx.GraphDef) -> dict[str, Callable]:
    """The two serving functions, `(weights, uint8 [N, H, W, 3]) -> outputs`.

    "classify" returns only the probability, so XLA drops the decoder; "reconstruct" also
    returns the reconstruction (float [-1, 1]) and the per-pixel error map |recon - input|
    averaged over channels (float [N, H, W], in [-1, 1] units: 0..2).
    """

    def run(weights: Weights, images: jax.Array):
        params, batch_stats = weights
        x = pixels.normalize(images)
        logits, recon, _ = train_step.forward(graphdef, params, batch_stats, x, train=False)
        return jax.nn.sigmoid(logits.astype(jnp.float32)), recon.astype(jnp.float32), x

    def classify(weights: Weights, images: jax.Array) -> dict[str, jax.Array]:
        return {"probability": run(weights, images)[0]}

    def reconstruct(weights: Weights, images: jax.Array) -> dict[str, jax.Array]:
        prob, recon, x = run(weights, images)
        error = jnp.mean(jnp.abs(recon - x), axis=-1)
        return {"probability": prob, "reconstruction": recon, "error_map": error}

    return {"classify": classify, "reconstruct": reconstruct}


def jit_serving(fn: Callable) -> Callable:
    """`jax.jit` of a serving function for this machine's devices; on the CPU with its
    serving tuning (`ops.cpu_serving`)."""
    if jax.default_backend() == "cpu":
        return cpu_serving.jit(fn)
    return jax.jit(fn)


def cast_for_export(model_config: ConfigDict, params: nnx.State, dtype: str):
    """bf16 export stores parameters in bfloat16 and computes in it; fp32 is unchanged."""
    if dtype not in DTYPES:
        raise ValueError(f"export dtype must be one of {DTYPES}, got {dtype!r}")
    export_config = ConfigDict(model_config.to_dict())
    export_config.dtype = dtype
    if dtype == "bfloat16":
        params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    return export_config, params


def _write_saved_model(
    fns: dict[str, Callable], weights: Weights, size: int, platforms, out: Path
) -> None:
    """jax2tf (native serialization) with the weights as tf.Variables and a polymorphic batch."""
    import tensorflow as tf
    from jax.experimental import jax2tf

    leaves, treedef = jax.tree.flatten(weights)
    module = tf.Module()
    module.weights = [tf.Variable(np.asarray(leaf), trainable=False) for leaf in leaves]
    spec = tf.TensorSpec([None, size, size, 3], tf.uint8, name="images")

    def signature(fn: Callable) -> Callable:
        converted = jax2tf.convert(
            lambda leaves, images: fn(jax.tree.unflatten(treedef, leaves), images),
            polymorphic_shapes=[None, f"(b, {size}, {size}, 3)"],
            native_serialization_platforms=platforms,
            with_gradient=False,
        )
        return tf.function(lambda images: converted(module.weights, images),
                           input_signature=[spec], autograph=False)

    module.classify = signature(fns["classify"])
    module.reconstruct = signature(fns["reconstruct"])
    tf.saved_model.save(
        module, os.fspath(out),
        signatures={"serving_default": module.classify, "reconstruct": module.reconstruct},
    )


def _write_jax_exports(
    fns: dict[str, Callable], weights: Weights, size: int, platforms, out: Path
) -> None:
    """Self-contained artifacts: the weights are constants, the batch dimension symbolic."""
    (batch,) = jax.export.symbolic_shape("b")
    spec = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8)
    for name, file_name in JAX_EXPORTS.items():
        fn = fns[name]
        serve = jax.jit(lambda images, fn=fn: fn(weights, images))
        exported = jax.export.export(serve, platforms=platforms)(spec)
        (out / file_name).write_bytes(exported.serialize())


def export_bundle(
    config: ConfigDict,
    params: nnx.State,
    batch_stats: nnx.State,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "float32",
    formats: tuple[str, ...] = FORMATS,
    platforms: tuple[str, ...] = DEFAULT_PLATFORMS,
    step: int | None = None,
    source: str = "",
) -> Path:
    """Writes the inference bundle of a trained model's arrays into a new directory.

    `formats` picks the serving artifacts; `load_bundle` needs only params/ and model.json.
    `platforms` are those the artifacts run on, each in its own layer forms.
    Written into `OUT_DIR.tmp` and renamed at the end, so a failed export leaves no bundle
    that looks complete.
    """
    import orbax.checkpoint as ocp

    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown export formats {sorted(unknown)}; choose from {FORMATS}")
    if not platforms or not set(platforms) <= set(PLATFORMS):
        raise ValueError(f"unknown platforms in {platforms}; choose one or more of {PLATFORMS}")
    out = Path(out_dir).absolute()
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new --out directory")
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        raise FileExistsError(f"{tmp} exists (an interrupted export?); remove it first")
    export_config, params = cast_for_export(config.model, params, dtype)
    params, batch_stats = jax.device_get((params, batch_stats))
    graphdef, _, _ = train_step.abstract_model(export_config)
    tmp.mkdir(parents=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp / PARAMS_DIR, {"params": flat_state.flatten(params),
                                      "batch_stats": flat_state.flatten(batch_stats)})
    fns = serving_fns(graphdef)
    size = export_config.image_size
    if "saved_model" in formats:
        _write_saved_model(fns, (params, batch_stats), size, platforms, tmp / SAVED_MODEL_DIR)
    if "jax_export" in formats:
        _write_jax_exports(fns, (params, batch_stats), size, platforms, tmp)
    meta = {
        "bundle_version": BUNDLE_VERSION,
        "model": export_config.to_dict(),
        "dtype": dtype,
        "formats": list(formats),
        "platforms": list(platforms),
        "image_size": size,
        "step": step,
        "source": source,
        "input": f"uint8 [N, {size}, {size}, 3] RGB face crops",
        "outputs": {
            "probability": "float32 [N], probability the face is fake",
            "reconstruction": f"float32 [N, {size}, {size}, 3] in [-1, 1]",
            "error_map": f"float32 [N, {size}, {size}], mean |reconstruction - input| over RGB",
        },
    }
    (tmp / MODEL_JSON).write_text(json.dumps(meta, indent=2, default=list))
    tmp.rename(out)
    return out


def check_images(images, image_size: int) -> np.ndarray:
    """Raises a ValueError naming expected and given dtype/shape unless uint8 [N, S, S, 3]."""
    images = np.asarray(images)
    expected = f"uint8 [N, {image_size}, {image_size}, 3]"
    if images.dtype != np.uint8:
        raise ValueError(f"expected {expected} face crops, got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[1:] != (image_size, image_size, 3):
        raise ValueError(f"expected {expected} face crops, got shape {list(images.shape)}")
    return images


class Predictor:
    """Scores uint8 face crops with a bundle's model, in fixed-size padded batches (one compile)."""

    def __init__(self, meta: dict, params: nnx.State, batch_stats: nnx.State, batch_size: int = 32):
        self.meta = meta
        self.image_size = int(meta["image_size"])
        self.batch_size = batch_size
        graphdef, _, _ = train_step.abstract_model(ConfigDict(meta["model"]))
        self.params = params
        self.batch_stats = batch_stats
        self._fns = {name: jit_serving(fn) for name, fn in serving_fns(graphdef).items()}

    def _run(self, name: str, images) -> dict[str, np.ndarray]:
        images = check_images(images, self.image_size)
        outputs = []
        for start in range(0, max(len(images), 1), self.batch_size):  # One pass when empty.
            chunk = images[start : start + self.batch_size]
            padded = np.zeros((self.batch_size, *images.shape[1:]), np.uint8)
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


def load_bundle(export_dir: str | os.PathLike, batch_size: int = 32) -> Predictor:
    """Reads a bundle's model.json and parameters; clear errors for a wrong directory."""
    import orbax.checkpoint as ocp

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
    _, abstract_params, abstract_stats = train_step.abstract_model(ConfigDict(meta["model"]))
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
        raise ValueError(f"{root / PARAMS_DIR}: {err} than {meta_path} describes") from err
    return Predictor(meta, params, batch_stats, batch_size)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a checkpoint step directory of a training run")
    source.add_argument("--workdir", help="a training workdir: its best checkpoint by "
                        "validation AUC, else its latest")
    parser.add_argument("--out", required=True, help="new bundle directory")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="parameter and compute dtype of the bundle")
    parser.add_argument("--formats", default=",".join(FORMATS),
                        help="comma-separated serving artifacts to write, from: "
                        + ", ".join(FORMATS))
    parser.add_argument("--platforms", default=",".join(DEFAULT_PLATFORMS),
                        help="comma-separated platforms the artifacts run on, from: "
                        + ", ".join(PLATFORMS) + " (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from cae_jax import checkpoints, workdir_lock

    path = args.checkpoint or args.workdir
    try:
        workdir_lock.check_can_create(args.out, "--out")
    except workdir_lock.DirectoryError as err:
        raise SystemExit(f"error: {err}") from err
    try:
        config, params, batch_stats, step = checkpoints.restore_inference(path)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from err
    try:
        out = export_bundle(config, params, batch_stats, args.out, dtype=args.dtype,
                            formats=tuple(f for f in args.formats.split(",") if f),
                            platforms=tuple(p for p in args.platforms.split(",") if p),
                            step=int(step), source=os.fspath(path))
    except (FileExistsError, ValueError) as err:
        raise SystemExit(f"error: {err}") from err
    print(f"wrote {out} (step {int(step)}, {args.dtype}): "
          + ", ".join(sorted(p.name for p in out.iterdir())))
    return 0
