"""Decoded frames -> face crops -> scores: the one scoring path of `predict` and `serve`.

Media come as files (`read_file`) or as uploaded bytes (`read_bytes`); either way faces are
found and cropped as `cae-jax prepare` does (same frame sampling, detector, margin; one face
tracked through a video, the largest in an image) and scored by a model function, so the
service gives the scores `predict` gives. The model function is `Predictor.reconstruct` in
`predict` and the service's request batcher in `serve`.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from data_prep import faces, video

Model = Callable[[np.ndarray], dict[str, np.ndarray]]  # uint8 crops -> probability, error_map


@dataclasses.dataclass(frozen=True)
class FaceOptions:
    """How faces are found: `detector` a name or a detector made once (`faces.make_detector`);
    `detect=False` scores whole frames (the inputs are face crops already)."""

    detector: str | faces.FaceDetector = faces.DEFAULT_DETECTOR
    margin: float = 1.3
    align: bool = False
    detect: bool = True
    frames_per_video: int = 32


@dataclasses.dataclass
class Media:
    kind: str  # "image" or "video"
    frames: list[np.ndarray]  # RGB uint8
    indices: np.ndarray  # int64 frame index of each frame in its file


@dataclasses.dataclass
class Scored:
    entry: dict  # status, score, label, frames (per face: index, score, label, box, error)
    crops: np.ndarray  # uint8 [K, S, S, 3]
    error_maps: np.ndarray  # float32 [K, S, S]


def read_file(path: Path, frames_per_video: int) -> Media:
    """An image or video file's sampled frames. Raises `video.UnreadableMediaError`."""
    if video.is_video(path):
        frames, indices, _ = video.read_video(path, frames_per_video)
        return Media("video", frames, indices)
    if video.is_image(path):
        return Media("image", [video.read_image(path)], np.zeros(1, np.int64))
    known = sorted(video.IMAGE_SUFFIXES | video.VIDEO_SUFFIXES)
    raise video.UnreadableMediaError(
        f"{path}: not an image or video (suffix {path.suffix or 'none'!r}; known: "
        f"{' '.join(known)})"
    )


def read_bytes(data: bytes, frames_per_video: int, name: str = "upload") -> Media:
    """Uploaded bytes: an image if OpenCV decodes one, else a video (OpenCV reads videos from
    files only: a temporary one). Raises `video.UnreadableMediaError` naming `name`."""
    if not data:
        raise video.UnreadableMediaError(f"{name}: empty upload")
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is not None:
        return Media("image", [cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)], np.zeros(1, np.int64))
    suffix = Path(name).suffix if video.is_video(name) else ".mp4"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"upload{suffix}"
        path.write_bytes(data)
        try:
            frames, indices, _ = video.read_video(path, frames_per_video)
        except video.UnreadableMediaError as err:
            raise video.UnreadableMediaError(
                f"{name}: neither an image nor a video this build decodes "
                f"({str(err).removeprefix(os.fspath(path) + ': ')})") from err
    return Media("video", frames, indices)


def whole_frames(frames: list[np.ndarray], image_size: int) -> faces.Faces:
    """Each frame as its own crop (`detect=False`), boxed by the full frame."""
    crops = [cv2.resize(f, (image_size, image_size), interpolation=cv2.INTER_AREA
                        if max(f.shape[:2]) > image_size else cv2.INTER_LINEAR) for f in frames]
    boxes = [[0.0, 0.0, float(f.shape[1]), float(f.shape[0])] for f in frames]
    return faces.Faces(np.stack(crops), np.asarray(boxes, np.float32),
                       np.arange(len(frames), dtype=np.int64))


def find_faces(media: Media, options: FaceOptions, image_size: int) -> faces.Faces:
    if not options.detect:
        return whole_frames(media.frames, image_size)
    return faces.detect_and_crop(media.frames, options.detector, image_size, options.margin,
                                 track=media.kind == "video", align=options.align)


def label(score: float, threshold: float) -> str:
    return "fake" if score >= threshold else "real"


def score_media(
    media: Media, model: Model, image_size: int, options: FaceOptions, threshold: float
) -> Scored:
    """Faces of `media` scored by `model`; the input's score is the mean of its faces'.

    Entry status "ok" or "no_face" (score and label None, no frames)."""
    found = find_faces(media, options, image_size)
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
        for index, s, box, err in zip(media.indices[found.kept], scores, found.boxes,
                                      out["error_map"], strict=True)
    ]
    entry.update(status="ok", score=score, label=label(score, threshold), frames=frames)
    return Scored(entry, found.crops, out["error_map"])
