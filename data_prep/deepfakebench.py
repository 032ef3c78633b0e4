"""DeepfakeBench's preprocessed data (SCLBD/DeepfakeBench) -> entries of frame lists.

DeepfakeBench's `preprocess.py` writes face crops as PNG frames and its `rearrange.py` indexes
them in one JSON per dataset:

    {DATASET: {LABEL: {SPLIT: {VIDEO: {"label": LABEL, "frames": [path, ...]}}}}}

with SPLIT in train/val/test and, for the FaceForensics++ family, one more level between SPLIT
and VIDEO: the compression (c23, c40, raw). LABEL names the method ("FF-DF", "FF-real",
"CelebDFv2_fake", ...); its class comes from their `label_dict` (`LABELS`). Frame paths are
relative to their `rgb_dir` (`--root`), with `/` or `\\` separators, or absolute.

Their video-level metric groups frames by the name of the folder they sit in, which merges
FF++'s "000_003" of four methods into one video; here a video's id is "LABEL/COMP/VIDEO",
unique across methods. A video listed under several splits (their Celeb-DF JSON copies test
into val, and every test video is also under train; DFD lists each video in all three) is kept
once: in test where listed there, else in validation, else train.
"""

from __future__ import annotations

import json
import re

import cv2
import numpy as np
from etils.epath import Path

from data_prep import video
from data_prep.entries import REAL, DatasetLayoutError, Entry, Options

# DeepfakeBench's training/config/test_config.yaml `label_dict`: 0 real, 1 fake.
LABELS = {
    "DFD_fake": 1, "DFD_real": 0,
    "FF-SH": 1, "FF-F2F": 1, "FF-DF": 1, "FF-FS": 1, "FF-NT": 1, "FF-FH": 1, "FF-real": 0,
    "CelebDFv1_real": 0, "CelebDFv1_fake": 1, "CelebDFv2_real": 0, "CelebDFv2_fake": 1,
    "DFDCP_Real": 0, "DFDCP_FakeA": 1, "DFDCP_FakeB": 1,
    "DFDC_Fake": 1, "DFDC_Real": 0,
    "DF_fake": 1, "DF_real": 0,
    "UADFV_Fake": 1, "UADFV_Real": 0,
    "roop_Real": 0, "roop_Fake": 1,
}
SPLITS = {"test": "test", "val": "validation", "train": "train"}  # Precedence order.
COMPRESSION_KEYS = {"c0": "raw", "c23": "c23", "c40": "c40"}  # Ours -> their folder name.
# Frames taken as they are (`faces.NO_DETECTION`) are resized as their loader does.
FRAME_INTERPOLATION = cv2.INTER_CUBIC


def label_of(name: str, json_path: Path) -> str:
    if name in LABELS:
        return "fake" if LABELS[name] else REAL
    raise DatasetLayoutError(
        f"{json_path}: label {name!r} is not in DeepfakeBench's label_dict ({sorted(LABELS)})"
    )


def frame_order(path: str) -> tuple:
    """Their loader's order: by the number in the file name (non-numeric names after, by name)."""
    stem = path.rsplit("/", 1)[-1].split(".")[0]
    return (0, int(stem), "") if stem.isdigit() else (1, 0, stem)


def resolve_frame(root: Path, frame: str) -> str:
    """A JSON frame path -> a path: relative ones below `root` (their rgb_dir)."""
    text = frame.replace("\\", "/")
    if text.startswith("/") or re.match(r"^[a-z]+://", text):
        return text
    return str(root / text.removeprefix("./"))


def _videos(split_info: dict, compression: str, json_path: Path, where: str,
            levels: set[str]) -> dict:
    """The {video: info} dict of one label's split, picking the compression level if nested
    (levels found are added to `levels`)."""
    if not isinstance(split_info, dict):
        raise DatasetLayoutError(f"{json_path}: {where} is not an object")
    nested = split_info and all(
        isinstance(v, dict) and "frames" not in v for v in split_info.values()
    )
    if not nested:
        return split_info
    levels.update(split_info)
    return split_info.get(COMPRESSION_KEYS[compression], {})


def entries(root: Path, opts: Options) -> list[Entry]:
    """Every video of the dataset `opts.dfb_name` in `opts.dfb_json` (a folder or the file)."""
    if not opts.dfb_json:
        raise DatasetLayoutError("deepfakebench needs --json (their dataset_json folder or file)")
    json_path = Path(opts.dfb_json)
    if json_path.is_dir():
        if not opts.dfb_name:
            raise DatasetLayoutError(f"{json_path}: a JSON folder needs --name (the dataset)")
        json_path = json_path / f"{opts.dfb_name}.json"
    if not json_path.is_file():
        raise DatasetLayoutError(f"{json_path}: DeepfakeBench dataset JSON not found")
    try:
        table = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetLayoutError(f"{json_path}: not valid JSON ({err})") from err
    name = opts.dfb_name or (next(iter(table)) if len(table) == 1 else "")
    if name not in table:
        raise DatasetLayoutError(f"{json_path}: no dataset {name!r} (has {sorted(table)}); --name")
    chosen: dict[str, Entry] = {}
    levels: set[str] = set()
    for label_name, by_split in sorted(table[name].items()):
        label = label_of(label_name, json_path)
        for their_split, split in SPLITS.items():
            where = f"{name}/{label_name}/{their_split}"
            videos = _videos(by_split.get(their_split, {}), opts.compression, json_path, where,
                             levels)
            for video_name, info in sorted(videos.items()):
                frames = info.get("frames") if isinstance(info, dict) else None
                if not isinstance(frames, list):
                    raise DatasetLayoutError(f"{json_path}: {where}/{video_name} has no frames")
                if info.get("label", label_name) != label_name:
                    raise DatasetLayoutError(
                        f"{json_path}: {where}/{video_name} has label {info['label']!r}"
                    )
                video_id = f"{label_name}/{opts.compression}/{video_name}"
                if video_id in chosen:
                    continue  # Listed in a split of higher precedence already.
                paths = tuple(resolve_frame(root, f) for f in sorted(frames, key=frame_order))
                folder = Path(paths[0]).parent if paths else root / label_name / video_name
                chosen[video_id] = Entry(
                    folder, video_id, label, label_name, split, opts.compression, frames=paths
                )
    if not chosen:
        at = f" at compression {COMPRESSION_KEYS[opts.compression]!r} (it has {sorted(levels)}:" \
            " choose with --compression)" if levels else ""
        raise DatasetLayoutError(f"{json_path}: dataset {name!r} lists no videos{at}")
    return list(chosen.values())


def read_frames(entry: Entry, frames_per_video: int) -> tuple[video.Media, tuple[dict, ...]]:
    """The first `frames_per_video` listed frames (DeepfakeBench's own choice of frames), each
    numbered by its file name (else its place in the list), and the frames that could not be
    read, with why: missing or undecodable frames are listed, not fatal."""
    images, indices, skipped = [], [], []
    for position, path in enumerate(entry.frames[:frames_per_video]):
        try:
            images.append(video.read_image(path))
        except video.UnreadableMediaError as err:
            missing = not Path(path).exists()
            reason = f"listed but missing on disk: {path}" if missing else f"unreadable: {err}"
            skipped.append({"frame": path, "reason": reason})
            continue
        stem = Path(path).stem
        indices.append(int(stem) if stem.isdigit() else position)
    if not images:
        first = skipped[0]["reason"] if skipped else "the JSON lists no frames"
        raise video.UnreadableMediaError(f"{entry.path}: no frame could be read ({first})")
    return video.Media("frames", images, np.asarray(indices, np.int64)), tuple(skipped)


def skipped_frames(summaries: list[dict]) -> list[dict]:
    """The manifest's list of frames left out of videos that were kept, with reasons."""
    return [{"video_id": s["video_id"], "split": s["split"], **f}
            for s in summaries for f in s.get("skipped_frames", ())]
