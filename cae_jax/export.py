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

The source is a training workdir, one of its step directories, or an `import-weights`
directory holding a trained detector (DeepfakeBench's), exported at its own image size and
conventions. Where validation data is known, model.json also holds the operating point
(`calibrate`): thresholds picked on the validation faces that `predict` and `serve` decide at.

`serving.load_bundle(dir)` gives a `Predictor` for Python callers (`predict`, `serve`,
`evaluate`, the demo).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from cae_jax import export_check, flat_state, metrics, models, serving, stablehlo_target
from cae_jax.serving import BUNDLE_VERSION, MODEL_JSON, PARAMS_DIR, serving_fns

SAVED_MODEL_DIR = "saved_model"
JAX_EXPORTS = {"classify": "classify.jax", "reconstruct": "reconstruct.jax"}
DTYPES = ("float32", "bfloat16")
FORMATS = ("saved_model", "jax_export")  # Beside params/ and model.json, which are always written.
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
# Where bundles are served: each artifact holds one program per platform, each with that
# platform's layer forms (`cae_jax.ops`), so a bundle exported on a CPU serves on GPU and TPU.
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")

Weights = serving.Weights


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
    """jax2tf (native serialization) with the weights as tf.Variables and a polymorphic batch,
    its StableHLO at a version this TensorFlow reads (`stablehlo_target`)."""
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
    with stablehlo_target.for_tensorflow():  # jax2tf serializes while the signatures trace.
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


def check_out(out_dir: str | os.PathLike) -> Path:
    """The absolute bundle path, refused where it or an interrupted export's temp exists."""
    out = Path(out_dir).absolute()
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new --out directory")
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        raise FileExistsError(f"{tmp} exists (an interrupted export?); remove it first")
    return out


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
    operating_point: dict | None = None,
    decoder_trained: bool = True,
) -> Path:
    """Writes the inference bundle of a trained model's arrays into a new directory.

    `formats` picks the serving artifacts; `load_bundle` needs only params/ and model.json.
    `platforms` are those the artifacts run on, each in its own layer forms.
    Written into `OUT_DIR.tmp`, each artifact loaded and run as its consumer would
    (`export_check`; model.json lists the checks), then renamed: an export that fails removes
    what it wrote. `operating_point` (from `calibrate`) goes into model.json; None records
    that the bundle has none. `decoder_trained=False` (an imported detector) marks its
    reconstructions and heatmaps as those of an untrained decoder.
    """
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown export formats {sorted(unknown)}; choose from {FORMATS}")
    if not platforms or not set(platforms) <= set(PLATFORMS):
        raise ValueError(f"unknown platforms in {platforms}; choose one or more of {PLATFORMS}")
    out = check_out(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    export_config, params = cast_for_export(config.model, params, dtype)
    params, batch_stats = jax.device_get((params, batch_stats))
    graphdef, _, _ = models.abstract_model(export_config)
    tmp.mkdir(parents=True)
    try:
        _write_bundle(tmp, export_config, graphdef, params, batch_stats, dtype=dtype,
                      formats=formats, platforms=platforms, step=step, source=source,
                      operating_point=operating_point, decoder_trained=decoder_trained)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.rename(out)
    return out


def _write_bundle(tmp: Path, export_config: ConfigDict, graphdef: nnx.GraphDef,
                  params: nnx.State, batch_stats: nnx.State, *, dtype: str,
                  formats: tuple[str, ...], platforms: tuple[str, ...], step: int | None,
                  source: str, operating_point: dict | None, decoder_trained: bool) -> None:
    import orbax.checkpoint as ocp

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
        "operating_point": operating_point or {"reason": "no validation data given at export"},
        "decoder_trained": decoder_trained,
        "input": f"uint8 [N, {size}, {size}, 3] RGB face crops",
        "outputs": {
            "probability": "float32 [N], probability the face is fake",
            "reconstruction": f"float32 [N, {size}, {size}, 3] in [-1, 1]",
            "error_map": f"float32 [N, {size}, {size}], mean |reconstruction - input| over RGB",
        },
    }
    meta["checks"] = export_check.verify(tmp, fns["reconstruct"], (params, batch_stats), size,
                                         dtype, formats, platforms, JAX_EXPORTS, SAVED_MODEL_DIR)
    (tmp / MODEL_JSON).write_text(json.dumps(meta, indent=2, default=list))


def score_prepared(predictor: serving.Predictor, config: ConfigDict, data_dir: str,
                   split: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(labels, probabilities, number of videos) of every face of a prepared split, scored
    by the bundle's own predictor (the scores `predict` and `serve` give)."""
    from cae_jax import eval_pipeline

    labels, probs, videos = [], [], set()
    for batch in eval_pipeline.eval_batches(config, data_dir, split):
        keep = batch["mask"]
        probs.append(predictor.predict_proba(batch["image"][keep]))
        labels.append(batch["label"][keep])
        videos.update(zip(batch["dataset"][keep], batch["method"][keep],
                          batch["video_id"][keep], strict=True))
    return np.concatenate(labels), np.concatenate(probs), len(videos)


def calibrate(predictor: serving.Predictor, config: ConfigDict, data_dir: str,
              split: str) -> dict:
    """The operating point of `predictor` on one prepared split: thresholds for EER and
    FPR 1/5/10% of its faces (`metrics.operating_points`), their rates there, the AUC and
    how many faces and videos they come from. Raises ValueError where the split cannot
    place a threshold (one class only)."""
    labels, probs, videos = score_prepared(predictor, config, data_dir, split)
    if len(set(labels.tolist())) < 2:
        raise ValueError(f"{data_dir} ({split}): {len(labels)} faces of one class; an "
                         "operating point needs real and fake faces")
    thresholds = metrics.operating_points(labels, probs)
    return {
        "default": "eer", "data": os.fspath(data_dir), "split": split,
        "thresholds": thresholds,
        "rates": {name: metrics.rates_at(labels, probs, t) for name, t in thresholds.items()},
        "auc": metrics.auc(labels, probs), "faces": int(labels.size), "videos": videos,
    }


def restore_source(path: str) -> tuple[ConfigDict, nnx.State, nnx.State, int]:
    """(config, params, batch_stats, step) of a training workdir, a step directory, or an
    `import-weights` directory holding a detector (step 0: exported as imported)."""
    from cae_jax import checkpoints, sharding, train_step, weights

    if not weights.is_import(path):
        return checkpoints.restore_inference(path)
    meta = json.loads((Path(path) / weights.IMPORT_META).read_text())
    if not meta.get("classifier"):
        raise ValueError(f"{path}: {meta['format']} encoder weights only (no deepfake "
                         f"classifier): train a detector from them first (cae-jax train "
                         f"--config.init_from={path} ...), then export its workdir")
    config = weights.detector_config(path)
    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    state = train_step.create_train_state(config, train_step.abstract_state(config, mesh))
    return config, state.params, state.batch_stats, 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a checkpoint step directory of a training run, "
                        "or an `import-weights` directory holding a detector")
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
    parser.add_argument("--calibration-data", help="prepared dir whose faces set the "
                        "operating point (default: the run's input.eval_dir, else its first "
                        "train dir)")
    parser.add_argument("--calibration-split", help="its split (default: the run's "
                        "input.eval_split)")


def run(args: argparse.Namespace) -> int:
    from cae_jax import config as config_lib
    from cae_jax import dir_lock, weights

    path = args.checkpoint or args.workdir
    try:
        dir_lock.check_can_create(args.out, "--out")
        check_out(args.out)
        config, params, batch_stats, step = restore_source(path)
        data_dir = args.calibration_data or config_lib.eval_data_dir(config)
        split = args.calibration_split or config.input.eval_split
        point = None
        if data_dir:
            export_config, cast = cast_for_export(config.model, params, args.dtype)
            meta = {"model": export_config.to_dict(), "image_size": export_config.image_size}
            batch = config.input.eval_batch_size or config.train.batch_size
            predictor = serving.Predictor(meta, cast, batch_stats, batch_size=batch)
            try:
                point = calibrate(predictor, config, data_dir, split)
            except FileNotFoundError as err:
                if args.calibration_data:
                    raise
                # The run's data moved since training: the bundle is still worth writing.
                point = {"reason": f"the run's validation data is not readable here ({err})"}
                print(f"{point['reason']}: the bundle decides at 0.5; --calibration-data DIR "
                      "gives it an operating point", file=sys.stderr)
        else:
            print("no validation data (no input.eval_dir or train dir in the run's config, no "
                  "--calibration-data): the bundle decides at 0.5", file=sys.stderr)
        out = export_bundle(config, params, batch_stats, args.out, dtype=args.dtype,
                            formats=tuple(f for f in args.formats.split(",") if f),
                            platforms=tuple(p for p in args.platforms.split(",") if p),
                            step=int(step), source=os.fspath(path), operating_point=point,
                            decoder_trained=not weights.is_import(path))
    except (FileNotFoundError, FileExistsError, ValueError, dir_lock.DirectoryError) as err:
        raise SystemExit(f"error: {err}") from err
    except export_check.ArtifactError as err:
        raise SystemExit(f"error: export: {err}; no bundle written") from err
    for line in json.loads((out / MODEL_JSON).read_text())["checks"]:
        print(f"checked {line}")
    print(f"wrote {out} (step {int(step)}, {args.dtype}): "
          + ", ".join(sorted(p.name for p in out.iterdir())))
    if point and "thresholds" in point:
        print(f"operating point on {data_dir} ({split}, {point['faces']} faces, AUC "
              f"{point['auc']:.4f}): " + ", ".join(f"{k} {v:.4f}"
                                                   for k, v in point["thresholds"].items()))
    return 0
