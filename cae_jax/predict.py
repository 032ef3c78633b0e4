"""`cae-jax predict`: score image and video files with an exported bundle.

Faces are found and cropped as `cae-jax prepare` does (same frame sampling, detector, margin),
each crop is scored, and a video's score is the mean of its frames' scores. Every input gets an
entry in the JSON, scored or not (`no_face`, `error`), so nothing is dropped silently: any
failure of one input becomes its entry, and `--out` is rewritten (atomically) after each input,
so an interrupted run keeps every score so far (`"complete": false`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from cae_jax import atomic_file, export, heatmap
from data_prep import faces, video


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="image or video files, or folders of them")
    parser.add_argument("--model", required=True, help="bundle directory from `cae-jax export`")
    parser.add_argument("--out", help="JSON file for the predictions (default: stdout)")
    parser.add_argument("--heatmaps", help="folder for per-frame reconstruction-error heatmaps")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="score at or above which an input is labelled fake")
    parser.add_argument("--frames-per-video", type=int, default=32, help="sampled uniformly")
    parser.add_argument("--margin", type=float, default=1.3, help="crop side / face box side")
    parser.add_argument("--detector", choices=sorted(faces.DETECTORS),
                        default=faces.DEFAULT_DETECTOR)
    parser.add_argument("--align", action="store_true", help="rotate crops so eyes are level")
    parser.add_argument("--no-detect", action="store_true",
                        help="inputs are face crops already: whole frames are resized, scored")
    parser.add_argument("--batch-size", type=int, default=32, help="face crops per model call")


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files as given; a folder becomes its image and video files, sorted."""
    paths = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths += sorted(p for p in path.iterdir()
                            if p.is_file() and (video.is_image(p) or video.is_video(p)))
        else:
            paths.append(path)
    return paths


def whole_frames(frames: list[np.ndarray], image_size: int) -> faces.Faces:
    """Each frame as its own crop (`--no-detect`), boxed by the full frame."""
    crops = [cv2.resize(f, (image_size, image_size), interpolation=cv2.INTER_AREA
                        if max(f.shape[:2]) > image_size else cv2.INTER_LINEAR) for f in frames]
    boxes = [[0.0, 0.0, float(f.shape[1]), float(f.shape[0])] for f in frames]
    return faces.Faces(np.stack(crops), np.asarray(boxes, np.float32),
                       np.arange(len(frames), dtype=np.int64))


def find_faces(path: Path, args: argparse.Namespace, image_size: int) -> dict:
    """Crops, boxes and frame indices of one input. Raises `video.UnreadableMediaError`."""
    if not (video.is_video(path) or video.is_image(path)):
        known = sorted(video.IMAGE_SUFFIXES | video.VIDEO_SUFFIXES)
        raise video.UnreadableMediaError(
            f"{path}: not an image or video (suffix {path.suffix or 'none'!r}; known: "
            f"{' '.join(known)})"
        )
    kind = "video" if video.is_video(path) else "image"
    if kind == "video":
        frames, indices, _ = video.read_video(path, args.frames_per_video)
    else:
        frames, indices = [video.read_image(path)], np.zeros(1, np.int64)
    if args.no_detect:
        found = whole_frames(frames, image_size)
    else:  # As `prepare` does: one face tracked through a video, the largest in an image.
        found = faces.detect_and_crop(frames, args.detector, image_size, args.margin,
                                      track=kind == "video", align=args.align)
    return {"kind": kind, "crops": found.crops, "boxes": found.boxes,
            "frame_indices": indices[found.kept], "num_sampled": len(frames)}


def score_input(
    path: Path, predictor: export.Predictor, args: argparse.Namespace, heatmap_dir: Path | None
) -> dict:
    """The JSON entry of one input: status ok / no_face / error; heatmaps into heatmap_dir."""
    entry = {"path": os.fspath(path)}
    try:
        found = find_faces(path, args, predictor.image_size)
    except video.UnreadableMediaError as err:
        return {**entry, "status": "error", "error": str(err)}
    except cv2.error as err:  # OpenCV rejects some decodable media (e.g. degenerate sizes).
        return {**entry, "status": "error", "error": f"{path}: {err.msg or err}"}
    entry.update(kind=found["kind"], num_sampled=found["num_sampled"])
    if len(found["crops"]) == 0:
        return {**entry, "status": "no_face", "score": None, "label": None, "frames": []}
    out = predictor.reconstruct(found["crops"])
    scores = out["probability"]
    score = float(np.mean(scores))
    frames = [
        {"frame_index": int(index), "score": float(s), "box": [float(v) for v in box],
         "recon_error": float(np.mean(err))}
        for index, s, box, err in zip(found["frame_indices"], scores, found["boxes"],
                                      out["error_map"], strict=True)
    ]
    entry.update(status="ok", score=score, label="fake" if score >= args.threshold else "real",
                 frames=frames)
    if heatmap_dir is not None:
        try:
            write_heatmaps(heatmap_dir, frames, found["crops"], out["error_map"])
        except (OSError, cv2.error) as err:  # The scores stand without their pictures.
            entry["heatmap_error"] = f"{heatmap_dir}: {type(err).__name__}: {err}"
    return entry


def write_heatmaps(folder: Path, frames: list[dict], crops: np.ndarray, errors: np.ndarray):
    """One overlay PNG per frame; each frame's entry gets its file's path once written."""
    folder.mkdir(parents=True, exist_ok=True)
    scale = heatmap.error_scale(errors)
    for frame, crop, err in zip(frames, crops, errors, strict=True):
        png = folder / f"frame_{frame['frame_index']:06d}.png"
        heatmap.write_png(png, heatmap.overlay(crop, err, scale))
        frame["heatmap"] = os.fspath(png)


def heatmap_folders(paths: list[Path], root: Path) -> list[Path]:
    """One folder per input, named after it; a numeric prefix only where names repeat."""
    names = [p.name for p in paths]
    return [root / (f"{i:04d}_{n}" if names.count(n) > 1 else n) for i, n in enumerate(names)]


def flag_error(args: argparse.Namespace) -> str | None:
    """What is wrong with the flags, before any work; None when nothing is."""
    if args.batch_size < 1:
        return f"--batch-size must be at least 1, got {args.batch_size}"
    if args.frames_per_video < 1:
        return f"--frames-per-video must be at least 1, got {args.frames_per_video}"
    if not args.margin > 0:
        return f"--margin must be positive, got {args.margin}"
    if not math.isfinite(args.threshold):
        return f"--threshold must be a number, got {args.threshold}"
    if args.out and not Path(args.out).absolute().parent.is_dir():
        return f"--out {args.out}: its folder does not exist"
    return None


def write_report(report: dict, out: Path) -> None:
    """Replaces `out` whole (temporary file + rename): readers never see half a report."""
    atomic_file.write_text(out, json.dumps(report, indent=2) + "\n")


def run(args: argparse.Namespace) -> int:
    problem = flag_error(args)
    if problem is None:
        try:
            paths = expand_inputs(args.inputs)
        except OSError as err:
            problem = f"cannot list {err.filename}: {err.strerror or err}"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else None
    results = []
    report = {"model": os.fspath(args.model), "threshold": args.threshold,
              "aggregate": "mean", "complete": False, "results": results}
    try:
        predictor = export.load_bundle(args.model, batch_size=args.batch_size)
        if out:
            write_report(report, out)  # An --out that cannot be written stops the run here.
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    roots = (heatmap_folders(paths, Path(args.heatmaps)) if args.heatmaps
             else [None] * len(paths))
    try:
        for path, root in zip(tqdm(paths, desc="predict", unit="input"), roots, strict=True):
            results.append(_score_or_error(path, predictor, args, root))
            if out:
                write_report(report, out)
        report["complete"] = True
    finally:  # Whatever ends the run, what was scored is kept.
        if out:
            write_report(report, out)
        else:
            print(json.dumps(report, indent=2))
    scored = sum(r["status"] == "ok" for r in results)
    print(f"scored {scored} of {len(results)} inputs", file=sys.stderr)
    return 0 if scored else 1


def _score_or_error(
    path: Path, predictor: export.Predictor, args: argparse.Namespace, root: Path | None
) -> dict:
    try:
        result = score_input(path, predictor, args, root)
    except Exception as err:  # noqa: BLE001 - one input's failure is its entry, not the run's.
        result = {"path": os.fspath(path), "status": "error",
                  "error": f"{path}: {type(err).__name__}: {err}"}
    if result["status"] != "ok":
        print(result.get("error") or f"{path}: no face found", file=sys.stderr)
    if "heatmap_error" in result:
        print(f"{path}: heatmaps not written: {result['heatmap_error']}", file=sys.stderr)
    return result
