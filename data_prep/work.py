"""One video's work: decode + detect + crop, kept in a per-video cache so re-runs resume.

The cache (`OUT_DIR/.work/`) holds, per video, `<key>.npz` (PNG crops, boxes, frame indices,
fps) and then `<key>.json` (its summary). The JSON is written last and marks the video
done; both are written to a temporary name and renamed, so a killed worker leaves no cache
entry that reads as finished. Files are read back without pickle. Paths are `etils.epath`
so the cache also lives on gs:// for Beam runners.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import uuid
from collections.abc import Iterator

import cv2
import numpy as np
from etils import epath

from data_prep import faces, video
from data_prep.datasets import Entry

SETTINGS_FILE = "settings.json"
MAX_ATTEMPTS = 2  # Worker deaths while processing one file before it is skipped.


class CacheSettingsError(ValueError):
    """The cache folder was made with other crop settings."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that changes the crops: a cache made with other settings is not reused."""

    frames_per_video: int = 32
    image_size: int = 299
    margin: float = 1.3
    detector: str = faces.DEFAULT_DETECTOR
    align: bool = False


def _write_atomic(path: epath.Path, data: bytes) -> None:
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    tmp.write_bytes(data)
    tmp.replace(path)


def open_cache(work_dir: str | os.PathLike, settings: Settings) -> epath.Path:
    """Creates the cache folder, or checks that an existing one was made with `settings`."""
    work_dir = epath.Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    marker = work_dir / SETTINGS_FILE
    wanted = dataclasses.asdict(settings)
    if marker.exists():
        found = json.loads(marker.read_text())
        if found != wanted:
            raise CacheSettingsError(
                f"{work_dir} holds crops made with {found}, not {wanted}: use the same "
                "settings to resume, or another --out (or delete that folder) to start over"
            )
    else:
        _write_atomic(marker, json.dumps(wanted, indent=2).encode())
    return work_dir


def cache_key(video_id: str) -> str:
    return hashlib.sha256(video_id.encode()).hexdigest()[:24]


def _summary(entry: Entry, status: str, **fields) -> dict:
    return {
        "video_id": entry.video_id,
        "split": entry.split,
        "label": entry.label,
        "method": entry.method,
        "status": status,
        **fields,
    }


def process(entry: Entry, settings: Settings, work_dir: str | os.PathLike) -> dict:
    """Crops one entry into the cache unless already there; returns its summary.

    The summary has status "ok" (with `frames`, crops kept, and `sampled`, frames decoded) or
    "skipped" (with `reason`). Every failure becomes a skip: nothing here raises. A file that
    kills its worker process (a decoder crash) leaves its attempt marker behind; after
    `MAX_ATTEMPTS` such deaths it is skipped instead of being tried again.
    """
    work_dir = epath.Path(work_dir)
    key = cache_key(entry.video_id)
    done = work_dir / f"{key}.json"
    if done.exists():
        return json.loads(done.read_text())
    if not entry.path.exists():
        # Not cached: the file may be restored before the next run.
        return _summary(entry, "skipped", reason=f"listed but missing on disk: {entry.path}")
    attempts = work_dir / f"{key}.attempts"
    started = int(attempts.read_text()) if attempts.exists() else 0
    if started >= MAX_ATTEMPTS:
        summary = _summary(
            entry, "skipped", reason=f"crashed its worker process {started} times: {entry.path}"
        )
    else:
        _write_atomic(attempts, str(started + 1).encode())
        try:
            summary = _crop_and_cache(entry, settings, work_dir / f"{key}.npz")
        except BaseException:  # Interrupted (Ctrl-C): not the file's fault.
            attempts.unlink()
            raise
    _write_atomic(done, json.dumps(summary).encode())
    if attempts.exists():
        attempts.unlink()
    return summary


def _crop_and_cache(entry: Entry, settings: Settings, crops_path: epath.Path) -> dict:
    try:
        result = _crop(entry, settings)
    except video.UnreadableMediaError as err:
        return _summary(entry, "skipped", reason=f"unreadable: {err}")
    except Exception as err:  # noqa: BLE001 - any failure of one file is recorded, not fatal.
        return _summary(
            entry, "skipped", reason=f"failed: {entry.path}: {type(err).__name__}: {err}"
        )
    if not len(result.crops):
        return _summary(
            entry, "skipped", reason=f"no face found in {result.num_sampled} sampled frames"
        )
    _write_atomic(crops_path, _encode(result))
    fields = {"frames": len(result.crops), "sampled": result.num_sampled}
    if getattr(result, "skipped_frames", ()):  # Frames of a frame-list video left out.
        fields["skipped_frames"] = list(result.skipped_frames)
    return _summary(entry, "ok", **fields)


def _crop(entry: Entry, settings: Settings) -> faces.VideoFaces:
    if entry.frames:
        from data_prep import deepfakebench

        return deepfakebench.crop_frames(
            entry, settings.frames_per_video, settings.image_size, settings.detector,
            settings.margin, settings.align,
        )
    if entry.is_image:
        image = video.read_image(entry.path)
        found = faces.detect_and_crop(
            [image],
            settings.detector,
            settings.image_size,
            settings.margin,
            track=False,
            align=settings.align,
        )
        return faces.VideoFaces(
            found.crops, found.boxes, np.zeros(len(found.kept), np.int64), 0.0, 1
        )
    return faces.extract_faces(
        entry.path,
        settings.frames_per_video,
        settings.image_size,
        settings.margin,
        settings.detector,
        align=settings.align,
    )


def _encode(result: faces.VideoFaces) -> bytes:
    pngs = [
        cv2.imencode(".png", cv2.cvtColor(c, cv2.COLOR_RGB2BGR))[1].tobytes() for c in result.crops
    ]
    buffer = io.BytesIO()
    np.savez(
        buffer,
        png=np.frombuffer(b"".join(pngs), np.uint8),
        png_ends=np.cumsum([len(p) for p in pngs]),
        boxes=result.boxes,
        frame_indices=result.frame_indices,
        fps=np.float32(result.fps),
    )
    return buffer.getvalue()


def is_cropped(entry: Entry, work_dir: str | os.PathLike) -> bool:
    """Whether the cache holds crops of this entry."""
    return (epath.Path(work_dir) / f"{cache_key(entry.video_id)}.npz").exists()


def cached_examples(entry: Entry, dataset: str, work_dir: str | os.PathLike) -> Iterator[dict]:
    """The cached crops of one finished entry as examples in the `records.features()` schema."""
    path = epath.Path(work_dir) / f"{cache_key(entry.video_id)}.npz"
    with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as data:
        png, ends = data["png"].tobytes(), data["png_ends"]
        starts = np.concatenate([[0], ends[:-1]])
        for start, end, box, index in zip(
            starts, ends, data["boxes"], data["frame_indices"], strict=True
        ):
            yield {
                "image": png[start:end],
                "label": entry.label,
                "dataset": dataset,
                "method": entry.method,
                "compression": entry.compression,
                "video_id": entry.video_id,
                "frame_index": int(index),
                "face_box": box.astype(np.float32),
                "fps": float(data["fps"]),
            }
