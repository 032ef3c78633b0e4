"""One video's work: decode + detect + crop, kept in a per-video cache so re-runs resume.

The cache (`OUT_DIR/.work/`) holds, per video, `<key>.npz` (PNG crops, boxes, frame indices,
fps) and then `<key>.json` (its summary). The JSON is written last and marks the video
done; both are written to a temporary name and renamed, so a killed worker leaves no cache
entry that reads as finished. The summary records the source the crops were made from (its
path, size and modification time): an entry of the same id from another file, or from the
same file since edited, is cropped again; the crop settings are checked once for the whole
folder (`open_cache`). Only outcomes that a re-run would repeat (crops, no face, media
that cannot be decoded) are cached; other failures (I/O errors, a full disk) are retried by
the next run. Files are read back without pickle. Paths are `etils.epath` so the cache also
lives on gs:// for Beam runners.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import signal
import uuid
import zipfile
from collections.abc import Iterator

import cv2
import numpy as np
from etils import epath

from cae_jax import atomic_file
from data_prep import faces, video
from data_prep.entries import Entry

SETTINGS_FILE = "settings.json"
MAX_ATTEMPTS = 2  # Worker deaths while processing one file before it is skipped.


class CacheSettingsError(ValueError):
    """The cache folder was made with other crop settings."""


class CacheWriteError(OSError):
    """The cache cannot be written (e.g. the disk is full): the run stops, finished videos
    stay cached."""


class CorruptCacheError(ValueError):
    """A cached `.npz` of crops is missing or unreadable."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that changes the crops: a cache made with other settings is not reused."""

    frames_per_video: int = 32
    image_size: int = 299
    margin: float = 1.3
    detector: str = faces.DEFAULT_DETECTOR
    align: bool = False


def _write_atomic(path: epath.Path, data: bytes, video_id: str = "") -> None:
    """`atomic_file.write_bytes`; a failure raises `CacheWriteError`."""
    try:
        atomic_file.write_bytes(path, data)
    except OSError as err:
        of = f" (for {video_id})" if video_id else ""
        raise CacheWriteError(
            f"cannot write {path}{of}: {err.strerror or err}; free space (or fix the folder) "
            "and re-run: finished videos stay cached"
        ) from err


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


def source_of(entry: Entry) -> dict:
    """What an entry's crops are made from: its path, and the size and modification time of
    its file (or of its frame files together), to tell a cached entry from another file."""
    size, mtime = 0, 0
    for path in [epath.Path(f) for f in entry.frames] or [entry.path]:
        try:
            file_size, file_mtime = _size_and_mtime(path)
        except FileNotFoundError:  # A listed frame that is missing: left out of the crops.
            continue
        size, mtime = size + file_size, max(mtime, file_mtime)
    path = os.fspath(entry.path)
    return {"path": path if "://" in path else os.path.abspath(path), "size": size, "mtime": mtime}


def _size_and_mtime(path: epath.Path) -> tuple[int, int | float]:
    if "://" in os.fspath(path):  # Object stores: whole seconds.
        stat = path.stat()
        return stat.length, stat.mtime
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


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
    """Crops one entry into the cache unless already there, from the same source; returns its
    summary, with `cache` (not stored) saying "reused", "cropped", or "recropped" (the cached
    crops were of another source, and are replaced).

    The summary has status "ok" (with `frames`, crops kept, and `sampled`, frames decoded) or
    "skipped" (with `reason`; and `retry: True` when the failure is not the file's, e.g. an
    I/O error, so it is not cached and the next run tries again). A failure of one file never
    raises; only `CacheWriteError` (the cache itself cannot be written) does. A file whose
    process dies on it (a decoder crash) leaves an attempt marker behind; after
    `MAX_ATTEMPTS` such deaths it is skipped instead of being tried again. A cached summary
    whose crops are missing or corrupt is logged, naming the video, and redone.
    """
    work_dir = epath.Path(work_dir)
    key = cache_key(entry.video_id)
    done = work_dir / f"{key}.json"
    if not entry.path.exists():
        # Not cached: the file may be restored before the next run.
        return _summary(entry, "skipped", reason=f"listed but missing on disk: {entry.path}",
                        cache="cropped")
    source, cache = source_of(entry), "cropped"
    if done.exists():
        summary = json.loads(done.read_text())
        if summary.get("source") != source:
            if "source" in summary:  # Else cached by a release that did not record it.
                logging.warning("%s: cached crops made from %s, not %s: cropping it again",
                                entry.video_id, summary["source"], source)
            cache = "recropped"
        elif summary["status"] != "ok" or _crops_readable(entry, work_dir):
            return {**summary, "cache": "reused"}
        done.unlink()
        (work_dir / f"{key}.npz").unlink(missing_ok=True)
    crashes = list(work_dir.glob(f"{key}.attempt-*"))
    if len(crashes) >= MAX_ATTEMPTS:
        summary = _summary(
            entry,
            "skipped",
            reason=f"crashed its worker process {len(crashes)} times: {entry.path}",
        )
    else:
        summary = _attempt(entry, settings, work_dir, key)
        if summary.get("retry"):
            return {**summary, "cache": cache}
    summary["source"] = source
    _write_atomic(done, json.dumps(summary).encode(), entry.video_id)
    for marker in crashes:
        marker.unlink(missing_ok=True)
    return {**summary, "cache": cache}


_in_flight: epath.Path | None = None  # The attempt marker of the file this process works on.


def init_pool_worker() -> None:
    """Sets up a `prepare` pool worker (here, not in `prepare`, so that a spawned worker
    imports this module's light dependencies and not TensorFlow).

    One thread per worker (OpenCV, and TensorFlow for mtcnn): the pool is the parallelism.
    SIGTERM (the pool stopping healthy workers after another one died) removes this
    process's attempt marker before exiting, so a file's attempts count only deaths of the
    process working on that very file.
    """
    os.environ.update(TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1", OMP_NUM_THREADS="1")
    cv2.setNumThreads(1)
    signal.signal(signal.SIGTERM, _withdraw_and_exit)


def _withdraw_and_exit(signum: int, frame) -> None:
    if _in_flight is not None:
        _in_flight.unlink(missing_ok=True)
    os._exit(128 + signum)


def _attempt(entry: Entry, settings: Settings, work_dir: epath.Path, key: str) -> dict:
    """`_crop_and_cache` under an attempt marker that stays only if this process dies."""
    global _in_flight
    marker = work_dir / f"{key}.attempt-{uuid.uuid4().hex[:12]}"
    _write_atomic(marker, str(os.getpid()).encode(), entry.video_id)
    _in_flight = marker
    try:
        return _crop_and_cache(entry, settings, work_dir / f"{key}.npz")
    finally:  # Returned or raised (e.g. Ctrl-C): not a crash.
        marker.unlink(missing_ok=True)
        _in_flight = None


def _crop_and_cache(entry: Entry, settings: Settings, crops_path: epath.Path) -> dict:
    try:
        result, skipped_frames = _crop(entry, settings)
    except (video.UnreadableMediaError, cv2.error) as err:  # The file's own: it stays so.
        return _summary(entry, "skipped", reason=f"unreadable: {err}")
    except Exception as err:  # noqa: BLE001 - one file's failure is reported, not fatal.
        return _summary(
            entry,
            "skipped",
            reason=f"failed (retried on the next run): {entry.path}: {type(err).__name__}: {err}",
            retry=True,
        )
    if not len(result.crops):
        return _summary(
            entry, "skipped", reason=f"no face found in {result.num_sampled} sampled frames"
        )
    _write_atomic(crops_path, _encode(result), entry.video_id)
    fields = {"frames": len(result.crops), "sampled": result.num_sampled}
    if skipped_frames:
        fields["skipped_frames"] = list(skipped_frames)
    return _summary(entry, "ok", **fields)


def _crop(entry: Entry, settings: Settings) -> tuple[faces.VideoFaces, tuple[dict, ...]]:
    """An entry's face crops (`faces.crop_media`, as `predict` and `serve` crop), and the
    frames of a frame-list video left out."""
    if not entry.frames:
        return faces.extract_faces(entry.path, settings.frames_per_video, settings.image_size,
                                   settings.margin, settings.detector, align=settings.align,
                                   image=entry.is_image), ()
    from data_prep import deepfakebench

    media, skipped = deepfakebench.read_frames(entry, settings.frames_per_video)
    options = faces.FaceOptions(settings.detector, settings.margin, settings.align,
                                settings.frames_per_video, deepfakebench.FRAME_INTERPOLATION)
    return faces.crop_media(media, settings.image_size, options), skipped


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


_CROP_ARRAYS = ("png", "png_ends", "boxes", "frame_indices", "fps")


def _load_crops(entry: Entry, work_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of one entry's cached `.npz`; `CorruptCacheError` names the video."""
    path = epath.Path(work_dir) / f"{cache_key(entry.video_id)}.npz"
    try:
        with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as data:
            arrays = {name: data[name] for name in _CROP_ARRAYS}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise CorruptCacheError(
            f"cached crops of {entry.video_id} ({path}) are missing or corrupt: "
            f"{type(err).__name__}: {err}"
        ) from err
    if not len(arrays["png_ends"]) == len(arrays["boxes"]) == len(arrays["frame_indices"]):
        raise CorruptCacheError(f"cached crops of {entry.video_id} ({path}) disagree in length")
    return arrays


def _crops_readable(entry: Entry, work_dir: epath.Path) -> bool:
    try:
        _load_crops(entry, work_dir)
    except CorruptCacheError as err:
        logging.warning("%s: redoing it", err)
        return False
    return True


def cached_examples(entry: Entry, dataset: str, work_dir: str | os.PathLike) -> Iterator[dict]:
    """The cached crops of one finished entry as examples in the `records.features()` schema."""
    data = _load_crops(entry, work_dir)
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
