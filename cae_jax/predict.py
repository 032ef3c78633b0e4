"""`cae-jax predict`: score image and video files with an exported bundle.

Faces are found, cropped and scored by `scoring` (as `prepare` crops them, as `serve` scores
them); a video's score is the mean of its frames' scores, labelled fake at or above the
bundle's operating point (`--threshold` / `--operating-point` choose another; bundles without
one decide at 0.5 and say so). Every input gets an entry, scored or not (`no_face`, `error`),
so nothing is dropped silently. Without `--out`, results stream to stdout as JSON Lines (a
header line, then one line per input as it is scored); with it, `--out` is rewritten
(atomically) after each input. Either way an interrupted run (Ctrl-C, SIGTERM) keeps every
score so far and says it was interrupted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from cae_jax import atomic_file, heatmap, metrics, scoring, serving
from data_prep import faces, video


def add_decision_arguments(parser: argparse.ArgumentParser) -> None:
    """How scores become labels (`predict` and `serve`)."""
    parser.add_argument("--threshold", type=float, default=None,
                        help="score at or above which an input is labelled fake (default: "
                        "the bundle's operating point, else 0.5)")
    parser.add_argument("--operating-point", choices=sorted(metrics.OPERATING_POINTS),
                        help="which of the bundle's operating points decides (default: eer)")


def add_face_arguments(parser: argparse.ArgumentParser) -> None:
    """How faces are found (`predict` and `serve`): `face_options` reads them."""
    parser.add_argument("--frames-per-video", type=int, default=32, help="sampled uniformly")
    parser.add_argument("--margin", type=float, default=1.3, help="crop side / face box side")
    parser.add_argument("--detector", choices=sorted(faces.DETECTORS),
                        default=faces.DEFAULT_DETECTOR)
    parser.add_argument("--align", action="store_true", help="rotate crops so eyes are level")
    parser.add_argument("--no-detect", action="store_true",
                        help="inputs are face crops already: whole frames are resized, scored")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="image or video files, or folders of them")
    parser.add_argument("--model", required=True, help="bundle directory from `cae-jax export`")
    parser.add_argument("--out", help="JSON file for the predictions (default: JSON Lines on "
                        "stdout, one line per input as it is scored)")
    parser.add_argument("--heatmaps", help="folder for per-frame reconstruction-error heatmaps")
    add_decision_arguments(parser)
    add_face_arguments(parser)
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


def face_options(args: argparse.Namespace) -> faces.FaceOptions:
    return faces.FaceOptions(detector=faces.NO_DETECTION if args.no_detect else args.detector,
                             margin=args.margin, align=args.align,
                             frames_per_video=args.frames_per_video)


def score_input(
    path: Path, predictor: serving.Predictor, args: argparse.Namespace, heatmap_dir: Path | None
) -> dict:
    """The JSON entry of one input: status ok / no_face / error; heatmaps into heatmap_dir."""
    entry = {"path": os.fspath(path)}
    try:
        media = scoring.read_file(path, args.frames_per_video)
        scored = scoring.score_media(media, predictor.reconstruct, predictor.image_size,
                                     face_options(args), args.threshold)
    except video.UnreadableMediaError as err:
        return {**entry, "status": "error", "error": str(err)}
    except cv2.error as err:  # OpenCV rejects some decodable media (e.g. degenerate sizes).
        return {**entry, "status": "error", "error": f"{path}: {err.msg or err}"}
    entry.update(scored.entry)
    if heatmap_dir is not None and scored.entry["status"] == "ok":
        try:
            write_heatmaps(heatmap_dir, entry["frames"], scored.crops, scored.error_maps)
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
    """One folder per input, named after it; where names repeat, the name and the input's
    position (`astro.png.2`): a name ending in digits, which no media file's name does, so
    it meets no other input's folder."""
    names = [p.name for p in paths]
    return [root / (f"{n}.{i}" if names.count(n) > 1 else n) for i, n in enumerate(names)]


def flag_error(args: argparse.Namespace) -> str | None:
    """What is wrong with the flags, before any work; None when nothing is."""
    if args.batch_size < 1:
        return f"--batch-size must be at least 1, got {args.batch_size}"
    if args.out and not Path(args.out).absolute().parent.is_dir():
        return f"--out {args.out}: its folder does not exist"
    return face_flag_error(args)


def face_flag_error(args: argparse.Namespace) -> str | None:
    """What is wrong with the face and decision flags; None when nothing is."""
    if args.frames_per_video < 1:
        return f"--frames-per-video must be at least 1, got {args.frames_per_video}"
    if not args.margin > 0:
        return f"--margin must be positive, got {args.margin}"
    if args.threshold is not None and args.operating_point:
        return "--threshold and --operating-point both choose the threshold: give one"
    if args.threshold is not None and not math.isfinite(args.threshold):
        return f"--threshold must be a number, got {args.threshold}"
    return None


def write_report(report: dict, out: Path) -> None:
    """Replaces `out` whole (temporary file + rename): readers never see half a report."""
    atomic_file.write_text(out, json.dumps(report, indent=2) + "\n")


class Interrupted(KeyboardInterrupt):
    """SIGTERM during a run: ends it as Ctrl-C does, keeping what was scored."""


def _stop_on_sigterm(signum, frame):
    raise Interrupted


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
    try:
        predictor = serving.load_bundle(args.model, batch_size=args.batch_size)
        if args.threshold is None:
            args.threshold, decision = serving.decision_threshold(predictor.meta,
                                                                  args.operating_point or "")
        else:
            decision = "--threshold"
        header = {"model": os.fspath(args.model), "threshold": args.threshold,
                  "decision": decision, "aggregate": "mean"}
        report = {**header, "complete": False, "results": results}
        if out:
            write_report(report, out)  # An --out that cannot be written stops the run here.
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"deciding at {args.threshold:.4f}: {decision}", file=sys.stderr)
    if args.heatmaps and predictor.meta.get("decoder_trained") is False:
        print(f"--heatmaps: {args.model} holds an imported detector whose decoder was never "
              "trained; its heatmaps show no learned reconstruction", file=sys.stderr)
    if not out:
        _print_line(header)
    roots = (heatmap_folders(paths, Path(args.heatmaps)) if args.heatmaps
             else [None] * len(paths))
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        for path, root in zip(tqdm(paths, desc="predict", unit="input"), roots, strict=True):
            results.append(_score_or_error(path, predictor, args, root))
            if out:
                write_report(report, out)
            else:
                _print_line(results[-1])
        report["complete"] = True
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (`Interrupted`).
        print(f"interrupted: {len(results)} of {len(paths)} inputs scored"
              + (f", kept in {out}" if out else ""), file=sys.stderr)
        return 130
    finally:  # Whatever ends the run, what was scored is kept.
        signal.signal(signal.SIGTERM, previous)
        if out:
            write_report(report, out)
    scored = sum(r["status"] == "ok" for r in results)
    print(f"scored {scored} of {len(results)} inputs", file=sys.stderr)
    return 0 if scored else 1


def _print_line(record: dict) -> None:
    """One JSON Lines record on stdout, flushed: a reader (or a killed run) has it now."""
    print(json.dumps(record), flush=True)


def _score_or_error(
    path: Path, predictor: serving.Predictor, args: argparse.Namespace, root: Path | None
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
