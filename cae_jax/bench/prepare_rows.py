"""The `prepare` row: decode, detect and crop frames/s of a face clip, MTCNN beside dlib."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np

from cae_jax.bench import timing


def write_face_clip(path: Path, frames: int) -> Path:
    """An MJPG clip of a real face (skimage's astronaut) drifting across a 640x360 frame."""
    from skimage import data

    face = cv2.resize(data.astronaut()[0:240, 120:360], (160, 160))
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (640, 360))
    for i in range(frames):
        frame = np.full((360, 640, 3), 90, np.uint8)
        x = 100 + 8 * i % 380
        frame[100:260, x : x + 160] = face
        out.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    out.release()
    return path


def prepare(clip: Path, frames: int, image_size: int, repeats: int) -> dict:
    """`prepare`'s decode + detect + crop frames/s per core, per detector (dlib where installed)."""
    from data_prep import faces

    result = {}
    for detector in ("mtcnn", "dlib"):
        if detector == "dlib" and not importlib.util.find_spec("dlib"):
            result[detector] = {"note": "dlib not installed (pip install 'cae-jax[dlib]')"}
            continue
        found = []

        def run(detector=detector, found=found):
            found.append(faces.extract_faces(clip, frames, image_size, 1.3, detector))

        seconds = timing.median_seconds(run, repeats)
        result[detector] = {"frames_per_s_per_core": frames / seconds / timing.cores(),
                            "faces": len(found[-1].crops)}
    return result
