"""Test-time perturbations of stored face crops (`evaluate --perturb KIND:S1,S2,...`).

What a platform does to a shared video, applied to the stored crop before the model's resize:
"jpeg:Q" re-encodes at quality Q, "resize:F" downscales by F (area) and upscales back (cubic),
"blur:K" is a K x K Gaussian blur, "noise:S" adds Gaussian noise of standard deviation S
(in 0-255 units). JPEG and blur are the training augmentations' own functions (augment.py),
the resize pair is their first interpolation pair. Noise draws from a generator seeded by the
face's key, so a face is perturbed the same way in every run and on every host.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import cv2
import numpy as np

from cae_jax import augment


class Perturbation(NamedTuple):
    kind: str
    severity: float

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.severity:g}"


def _check_jpeg(q: float) -> bool:
    return q == int(q) and 1 <= q <= 100


def _check_blur(k: float) -> bool:
    return k == int(k) and k >= 3 and int(k) % 2 == 1


# kind -> (valid severity?, what a valid one is).
KINDS = {
    "jpeg": (_check_jpeg, "an integer quality in 1..100"),
    "resize": (lambda f: 0 < f < 1, "a scale factor in (0, 1)"),
    "blur": (_check_blur, "an odd kernel size >= 3"),
    "noise": (lambda s: s > 0, "a standard deviation > 0 (0-255 units)"),
}


def parse(specs: list[str], flag: str = "--perturb") -> list[Perturbation]:
    """`KIND:S1,S2,...` specs -> perturbations in the given order; a bad spec is a ValueError
    naming `flag`."""
    out = []
    for spec in specs:
        kind, sep, severities = spec.partition(":")
        if kind not in KINDS or not sep or not severities:
            raise ValueError(f"{flag} {spec!r}: expected KIND:S1,S2,... with KIND one of "
                             f"{', '.join(KINDS)}")
        ok, what = KINDS[kind]
        for text in severities.split(","):
            try:
                value = float(text)
            except ValueError:
                value = float("nan")
            if not (np.isfinite(value) and ok(value)):
                raise ValueError(f"{flag} {spec!r}: {kind} severity {text!r} must be {what}")
            p = Perturbation(kind, value)
            if p in out:
                raise ValueError(f"{flag} {spec!r}: {p.name} is given twice")
            out.append(p)
    return out


def face_seed(record: dict, perturbation: Perturbation) -> int:
    """A seed from the face's identity and the perturbation: the same on every run."""
    key = "/".join(str(record[k]) for k in ("dataset", "method", "video_id", "frame_index"))
    digest = hashlib.sha256(f"{key}/{perturbation.name}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def rescale(image: np.ndarray, factor: float) -> np.ndarray:
    """Downscale by `factor` and back to the original size (the training resize's pair)."""
    h, w = image.shape[:2]
    down_interpolation, up_interpolation = augment.RESIZE_INTERPOLATIONS[0]
    small = cv2.resize(image, (max(1, round(w * factor)), max(1, round(h * factor))),
                       interpolation=down_interpolation)
    return cv2.resize(small, (w, h), interpolation=up_interpolation)


def gaussian_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    noisy = image.astype(np.float32) + rng.normal(0.0, sigma, image.shape).astype(np.float32)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def apply(image: np.ndarray, perturbation: Perturbation, record: dict) -> np.ndarray:
    """`image` (uint8 HxWx3, the stored crop) under `perturbation`; `record` names the face."""
    kind, severity = perturbation
    if kind == "jpeg":
        return augment.jpeg(image, int(severity))
    if kind == "resize":
        return rescale(image, severity)
    if kind == "blur":
        return augment.blur(image, int(severity))
    rng = np.random.default_rng(face_seed(record, perturbation))
    return gaussian_noise(image, severity, rng)
