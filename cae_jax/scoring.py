"""Decoded frames -> face crops -> scores: the one scoring path of `predict` and `serve`.

Media come as files (`read_file`) or as uploaded bytes (`read_bytes`); either way faces are
found and cropped by `faces.crop_media`, the function `cae-jax prepare` crops with (same frame
sampling, detector, margin; one face tracked through a video, the largest in an image), and
scored by a model function, so the service gives the scores `predict` gives. The model
function is `Predictor.reconstruct` in `predict` and the service's request batcher in `serve`.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from data_prep import faces, video

Model = Callable[[np.ndarray], dict[str, np.ndarray]]  # uint8 crops -> probability, error_map


@dataclasses.dataclass
class Scored:
    entry: dict  # status, score, label, frames (per face: index, score, label, box, error)
    crops: np.ndarray  # uint8 [K, S, S, 3]
    error_maps: np.ndarray  # float32 [K, S, S]


def read_file(path: Path, frames_per_video: int) -> video.Media:
    """An image or video file's sampled frames. Raises `video.UnreadableMediaError`."""
    if video.is_video(path) or video.is_image(path):
        return video.read_media(path, frames_per_video)
    known = sorted(video.IMAGE_SUFFIXES | video.VIDEO_SUFFIXES)
    raise video.UnreadableMediaError(
        f"{path}: not an image or video (suffix {path.suffix or 'none'!r}; known: "
        f"{' '.join(known)})"
    )


def read_bytes(data: bytes, frames_per_video: int, name: str = "upload") -> video.Media:
    """Uploaded bytes: an image if OpenCV decodes one, else a video (OpenCV reads videos from
    files only: a temporary one). Raises `video.UnreadableMediaError` naming `name`."""
    if not data:
        raise video.UnreadableMediaError(f"{name}: empty upload")
    image = video.decode_image(np.frombuffer(data, np.uint8))
    if image is not None:
        return video.Media("image", [image], np.zeros(1, np.int64))
    suffix = Path(name).suffix if video.is_video(name) else ".mp4"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"upload{suffix}"
        path.write_bytes(data)
        try:
            return video.Media("video", *video.read_video(path, frames_per_video))
        except video.UnreadableMediaError as err:
            raise video.UnreadableMediaError(
                f"{name}: neither an image nor a video this build decodes "
                f"({str(err).removeprefix(os.fspath(path) + ': ')})") from err


def label(score: float, threshold: float) -> str:
    return "fake" if score >= threshold else "real"


def score_media(
    media: video.Media, model: Model, image_size: int, options: faces.FaceOptions,
    threshold: float
) -> Scored:
    """Faces of `media` (`faces.crop_media`, as `prepare` crops) scored by `model`; the
    input's score is the mean of its faces'.

    Entry status "ok" or "no_face" (score and label None, no frames)."""
    found = faces.crop_media(media, image_size, options)
    entry = {"kind": media.kind, "num_sampled": len(media.frames)}
    if len(found.crops) == 0:
        empty = np.zeros((0, image_size, image_size), np.float32)
        return Scored({**entry, "status": "no_face", "score": None, "label": None,
                       "frames": []}, found.crops, empty)
    out = model(found.crops)
    scores = out["probability"]
    score = float(np.mean(scores))
    frames = [
        {"frame_index": int(index), "score": float(s), "label": label(float(s), threshold),
         "box": [float(v) for v in box], "recon_error": float(np.mean(err))}
        for index, s, box, err in zip(found.frame_indices, scores, found.boxes,
                                      out["error_map"], strict=True)
    ]
    entry.update(status="ok", score=score, label=label(score, threshold), frames=frames)
    return Scored(entry, found.crops, out["error_map"])
