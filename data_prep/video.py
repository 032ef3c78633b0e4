"""Reading frames: N frames sampled uniformly over a whole video, or a still image."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
from etils import epath

VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"})
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})


class UnreadableMediaError(Exception):
    """A video or image that cannot be decoded; the message says which file and why."""


@dataclasses.dataclass
class Media:
    """The frames faces are looked for in: a still image's one frame, a video's sampled frames,
    or a video given as frame files (DeepfakeBench's). What `prepare`, `predict` and `serve`
    read, and `faces.crop_media` crops."""

    kind: str  # "image", "video" or "frames".
    frames: list[np.ndarray]  # RGB uint8.
    indices: np.ndarray  # int64: each frame's number in its video (0 for an image).
    fps: float = 0.0  # A video's frame rate; 0 for images and frame files.


def is_video(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def is_image(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


@contextlib.contextmanager
def local_copy(path: str | os.PathLike) -> Iterator[Path]:
    """OpenCV reads only local files: a remote one (gs://...) is copied to a temporary file."""
    text = os.fspath(path)
    if "://" not in text:
        yield Path(text)
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / epath.Path(text).name
        local.write_bytes(epath.Path(text).read_bytes())
        yield local


def read_media(
    path: str | os.PathLike, frames_per_video: int, image: bool | None = None
) -> Media:
    """A still image as its one frame, any other file as a video's sampled frames; `image`
    says which (by default the file's suffix). Raises `UnreadableMediaError`."""
    if is_image(path) if image is None else image:
        return Media("image", [read_image(path)], np.zeros(1, np.int64))
    return Media("video", *read_video(path, frames_per_video))


def sample_indices(num_frames: int, frames_per_video: int) -> np.ndarray:
    """`frames_per_video` indices spread evenly over [0, num_frames), each interval's middle."""
    n = min(num_frames, frames_per_video)
    return np.unique(((np.arange(n) + 0.5) * num_frames / n).astype(np.int64))


def read_video(
    path: str | os.PathLike, frames_per_video: int
) -> tuple[list[np.ndarray], np.ndarray, float]:
    """Returns (RGB frames, their frame indices, fps) for frames sampled over the whole video.

    Frames are grabbed sequentially (exact on every codec, unlike seeking) and decoded only
    where sampled. A video that ends before its header's frame count (truncated) keeps the
    frames it has.
    """
    with local_copy(path) as local:
        return _read_local_video(local, frames_per_video, name=os.fspath(path))


def _read_local_video(
    path: Path, frames_per_video: int, name: str
) -> tuple[list[np.ndarray], np.ndarray, float]:
    if not path.is_file():
        raise UnreadableMediaError(f"{name}: file not found")
    if path.stat().st_size == 0:
        raise UnreadableMediaError(f"{name}: zero-length file")
    # OpenCV says "cannot open" alike for media it cannot decode (the file's own: a re-run
    # skips it) and a file it may not read (a permission or I/O error, which a re-run retries):
    # reading a byte raises the latter as the OSError it is.
    with open(path, "rb") as probe:
        probe.read(1)
    capture = cv2.VideoCapture(os.fspath(path))
    try:
        if not capture.isOpened():
            raise UnreadableMediaError(f"{name}: cannot open as a video")
        fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
        num_frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        if num_frames <= 0:
            raise UnreadableMediaError(f"{name}: video reports no frames")
        wanted = sample_indices(num_frames, frames_per_video)
        frames, indices = [], []
        position = 0
        for index in wanted:
            while position <= index:
                if not capture.grab():
                    break
                position += 1
            else:
                ok, bgr = capture.retrieve()
                if ok and bgr is not None:
                    frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
                    indices.append(int(index))
                continue
            break  # The stream ended early (truncated file).
    finally:
        capture.release()
    if not frames:
        raise UnreadableMediaError(f"{name}: no frame could be decoded (corrupt or truncated)")
    return frames, np.asarray(indices, np.int64), fps


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An RGB uint8 image; grey and RGBA images are converted."""
    with local_copy(path) as local:
        if not local.is_file():
            raise UnreadableMediaError(f"{path}: file not found")
        image = decode_image(np.fromfile(local, np.uint8))
    if image is None:
        raise UnreadableMediaError(f"{path}: cannot decode as an image")
    return image


def decode_image(data: np.ndarray) -> np.ndarray | None:
    """An encoded image's bytes (uint8) -> RGB uint8, or None where OpenCV decodes no image."""
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
