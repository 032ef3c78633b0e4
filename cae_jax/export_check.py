"""A bundle's artifacts checked before the bundle is renamed into place.

Each serving artifact is loaded the way its consumer loads it (the SavedModel with
TensorFlow's loader and its signatures, the `jax.export` files with `jax.export.deserialize`),
called on a few faces and compared with the model it came from. A SavedModel that TensorFlow
cannot run, or a file that does not hold the model, stops the export by name.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

CHECK_FACES = 2  # Two, not one: the batch dimension is symbolic.
# Largest |artifact - model| allowed in any output (probability, reconstruction, error map):
# the same program compiled by another XLA (TensorFlow's, or a fresh compile) may round
# differently, bfloat16 more so; a wrong or damaged artifact is off by far more.
TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2}
# What `jax.default_backend()` calls the platforms of `export.PLATFORMS`.
BACKEND_PLATFORMS = {"cpu": ("cpu",), "gpu": ("cuda", "rocm"), "tpu": ("tpu",)}


class ArtifactError(Exception):
    """An artifact that did not load, did not run, or did not give the model's outputs."""


def check_faces(image_size: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (CHECK_FACES, image_size, image_size, 3),
                                             dtype=np.uint8)


def _compare(artifact: str, got: dict, want: dict[str, np.ndarray], atol: float) -> float:
    worst = 0.0
    for key in got:
        diff = float(np.max(np.abs(np.asarray(got[key], np.float32) - want[key])))
        if not diff <= atol:  # NaN fails too.
            raise ArtifactError(f"{artifact}: output {key!r} differs from the model's by "
                                f"{diff:.3g} (tolerance {atol})")
        worst = max(worst, diff)
    return worst


def _check_saved_model(path: Path, faces: np.ndarray, want: dict, atol: float) -> float:
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(os.fspath(path))
        outputs = {name: loaded.signatures[name](images=tf.constant(faces))
                   for name in ("serving_default", "reconstruct")}
    except Exception as err:  # TensorFlow raises many kinds; each means "does not run".
        raise ArtifactError(f"{path.name}: {type(err).__name__}: {err}".splitlines()[0]) from err
    return max(_compare(f"{path.name} ({name})", {k: v.numpy() for k, v in out.items()}, want,
                        atol) for name, out in outputs.items())


def _check_jax_export(path: Path, faces: np.ndarray, want: dict, atol: float,
                      run: bool) -> float:
    try:
        exported = jax.export.deserialize(bytearray(path.read_bytes()))
        if not run:
            return 0.0
        got = jax.device_get(exported.call(faces))
    except Exception as err:  # Deserialization and XLA errors have no common base.
        raise ArtifactError(f"{path.name}: {type(err).__name__}: {err}".splitlines()[0]) from err
    return _compare(path.name, got, want, atol)


def verify(bundle: Path, reconstruct: Callable, weights, image_size: int, dtype: str,
           formats: tuple[str, ...], platforms: tuple[str, ...],
           jax_exports: dict[str, str], saved_model_dir: str) -> list[str]:
    """Checks each artifact of `formats` in `bundle` against `reconstruct(weights, faces)`;
    returns one line per artifact for the user, raises `ArtifactError` on the first failure.

    An artifact without a program for this machine's platform is only loaded, not run.
    """
    faces = check_faces(image_size)
    want = jax.device_get(jax.jit(reconstruct)(weights, faces))
    atol = TOLERANCE[dtype]
    here = set(BACKEND_PLATFORMS.get(jax.default_backend(), ())) & set(platforms)
    lines = []
    if "saved_model" in formats:
        if "cpu" in platforms:  # TensorFlow runs the SavedModel's CPU program here.
            diff = _check_saved_model(bundle / saved_model_dir, faces, want, atol)
            lines.append(f"{saved_model_dir}: serving_default and reconstruct run in TensorFlow "
                         f"(max difference {diff:.2g})")
        else:
            lines.append(f"{saved_model_dir}: not run here (no cpu program)")
    if "jax_export" in formats:
        for file_name in jax_exports.values():
            diff = _check_jax_export(bundle / file_name, faces, want, atol, run=bool(here))
            lines.append(f"{file_name}: runs in jax.export (max difference {diff:.2g})" if here
                         else f"{file_name}: deserializes; not run here (platforms "
                         f"{', '.join(platforms)})")
    return lines
