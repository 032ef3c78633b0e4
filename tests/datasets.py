"""Small prepared dataset directories for tests, in the exact layout `cae-jax prepare` writes.

Faces are crops of skimage's astronaut photo (shipped with scikit-image, no download), each
at its own position so every record's pixels are distinct.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path

import cv2
import numpy as np
from skimage import data

from data_prep import writer


@functools.cache
def _astronaut() -> np.ndarray:
    """Decoded once: a PNG read per crop made thousands of crops take seconds."""
    photo = data.astronaut()
    photo.flags.writeable = False
    return photo


def face_crop(index: int, size: int = 64) -> np.ndarray:
    """A distinct uint8 RGB crop per index, around the astronaut's face."""
    photo = _astronaut()
    y, x = 40 + (index * 7) % 120, 120 + (index * 13) % 140
    return cv2.resize(photo[y : y + 128, x : x + 128], (size, size), interpolation=cv2.INTER_AREA)


def examples(name: str, split: str, real: int, fake: int, size: int, first: int = 0):
    """`real` then `fake` records; frame_index counts from `first` (unique within a dataset)."""
    for i in range(real + fake):
        label = int(i >= real)
        index = first + i
        yield {
            "image": face_crop(index, size),
            "label": label,
            "dataset": name,
            "method": "Deepfakes" if label else "real",
            "compression": "c23",
            "video_id": f"{split}/{'fake' if label else 'real'}/{index // 4:04d}.mp4",
            "frame_index": index,
            "face_box": np.array([0, 0, size, size], np.float32),
            "fps": 25.0,
        }


def write(
    out_dir: str | Path,
    splits: Mapping[str, tuple[int, int]],
    *,
    name: str = "toy",
    num_shards: int = 3,
    size: int = 64,
) -> Path:
    """Writes a dataset dir with `splits = {split: (real, fake)}` counts; returns its path."""
    starts = np.cumsum([0] + [r + f for r, f in splits.values()])
    gens = {
        split: examples(name, split, real, fake, size, first=int(start))
        for (split, (real, fake)), start in zip(splits.items(), starts, strict=False)
    }
    return writer.write_dataset(out_dir, name, gens, num_shards=num_shards)
