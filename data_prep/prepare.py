"""`cae-jax prepare DATASET --root RAW --out OUT`: raw videos/images -> face-crop TFRecords.

Videos are cropped in parallel (a local process pool, or an Apache Beam pipeline with
`--runner beam`) into a per-video cache under OUT/.work, so a re-run only does what is not
done yet; the cache is then written into the TFDS dataset directory OUT.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures.process import BrokenProcessPool

import cv2
import numpy as np
import tqdm
from etils import epath

from cae_jax import dir_lock
from data_prep import datasets, deepfakebench, faces, preview, work, writer
from data_prep.entries import (
    COMPRESSIONS,
    FFPP_METHODS,
    REAL,
    DatasetLayoutError,
    Entry,
    Options,
    unit_hash,
)

WORK_DIR = ".work"
PREVIEW = "preview.png"
PREVIEW_PER_SPLIT = 8  # Videos shown per split (half real, half fake where there are both).
PREVIEW_SIZE = 128  # Side of each crop in the preview.
DFB_IMAGE_SIZE = 256  # DeepfakeBench's resolution: its frames are 256x256 crops.


def int_at_least(low: int):
    """An argparse type: an integer >= `low`, else a usage error naming the flag."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return value

    return parse


def number_where(accept: Callable[[float], bool], wanted: str):
    """An argparse type: a float that `accept`s, else a usage error naming the flag."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
        return value

    return parse


# A margin of 0, nan or below gives flat or upside-down crops; fractions are of identities.
positive_number = number_where(lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
fraction = number_where(lambda v: 0 <= v <= 1, "a number in [0, 1]")


def flag_error(args: argparse.Namespace) -> str | None:
    """What the flags' own types cannot check, each alone: how they go together."""
    if args.val_fraction + args.test_fraction > 1:
        return (f"--val-fraction {args.val_fraction} and --test-fraction {args.test_fraction} "
                "add up to more than 1: no video would be left to train on")
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    positive, natural = int_at_least(1), int_at_least(0)
    parser.add_argument("dataset", choices=sorted(datasets.BUILDERS), help="raw dataset layout")
    parser.add_argument("--root", required=True, help="raw dataset folder (folder: or a CSV)")
    parser.add_argument("--out", required=True, help="output TFDS dataset directory")
    parser.add_argument("--frames-per-video", type=positive, default=32, help="sampled uniformly")
    parser.add_argument("--image-size", type=positive, default=None,
                        help="side of the square crops (299; deepfakebench: 256, theirs)")
    parser.add_argument("--margin", type=positive_number, default=1.3,
                        help="crop side / face box side")
    parser.add_argument(
        "--detector", choices=sorted(faces.DETECTORS), default=faces.DEFAULT_DETECTOR
    )
    parser.add_argument("--align", action="store_true", help="rotate crops so eyes are level")
    parser.add_argument("--workers", type=positive, default=os.cpu_count(), help="local processes")
    parser.add_argument("--limit-videos", type=natural, default=0, help="a seeded subset (0: all)")
    parser.add_argument("--compression", choices=COMPRESSIONS, default="c23")
    parser.add_argument(
        "--methods",
        default=",".join(FFPP_METHODS),
        help="comma-separated FF++ manipulations",
    )
    parser.add_argument("--json", default="", help="deepfakebench: dataset JSON or its folder")
    parser.add_argument("--name", default="", help="deepfakebench: dataset name, e.g. Celeb-DF-v2")
    parser.add_argument("--detect", action="store_true",
                        help="deepfakebench: re-centre frames on the detected face (else as is)")
    parser.add_argument("--val-fraction", type=fraction, default=0.1, help="see docs/prepare.md")
    parser.add_argument("--test-fraction", type=fraction, default=0.1, help="see docs/prepare.md")
    parser.add_argument("--seed", type=int, default=0, help="seed of carved splits and subsets")
    parser.add_argument("--examples-per-shard", type=positive, default=1024)
    parser.add_argument("--runner", choices=("local", "beam"), default="local")
    parser.add_argument(
        "--beam-options",
        default="--runner=DirectRunner",
        help="Beam pipeline options, e.g. '--runner=DataflowRunner --project=P --region=R'",
    )


def run(args: argparse.Namespace) -> int:
    problem = flag_error(args)
    if problem:
        print(f"cae-jax prepare: {problem}", file=sys.stderr)
        return 2
    dfb = args.dataset == "deepfakebench"
    settings = work.Settings(
        frames_per_video=args.frames_per_video,
        image_size=args.image_size or (DFB_IMAGE_SIZE if dfb else 299),
        margin=args.margin,
        detector=args.detector if args.detect or not dfb else faces.NO_DETECTION,
        align=args.align,
    )
    options = Options(
        compression=args.compression,
        methods=tuple(m for m in args.methods.split(",") if m),
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        seed=args.seed,
        dfb_json=args.json,
        dfb_name=args.name,
    )
    try:
        entries = datasets.list_entries(args.dataset, epath.Path(args.root), options)
        out = prepare(
            subset(entries, args.limit_videos, args.seed),
            args.dataset,
            args.out,
            settings,
            workers=args.workers,
            examples_per_shard=args.examples_per_shard,
            runner=args.runner,
            beam_options=args.beam_options.split(),
        )
    except (
        DatasetLayoutError,
        work.CacheSettingsError,
        work.CacheWriteError,
        work.CorruptCacheError,
        writer.NothingToWriteError,
        writer.OutputError,
        dir_lock.DirectoryError,
    ) as err:
        print(f"cae-jax prepare: {err}", file=sys.stderr)
        return 2
    manifest = json.loads((epath.Path(out) / writer.MANIFEST).read_text())
    if dfb:  # Which of their datasets this is: `evaluate --protocol deepfakebench` reads it.
        source = {"name": options.dfb_name, "compression": options.compression}
        manifest["deepfakebench"] = source
        writer.write_json_atomic(epath.Path(out) / writer.MANIFEST, manifest)
    for split, counts in manifest["splits"].items():
        print(f"{split}: {counts['videos']} videos, {counts['frames']} frames")
    print(f"skipped: {len(manifest['skipped'])} (reasons in {out}/{writer.MANIFEST})")
    retry = sum(bool(s.get("retry")) for s in manifest["skipped"])
    if retry:
        print(f"{retry} of them failed for a reason not their own: re-run to retry them")
    return 0


def subset(entries: list[Entry], limit: int, seed: int) -> list[Entry]:
    """A seeded sample of `limit` entries (all when 0), mixing splits, labels and methods."""
    if not limit or limit >= len(entries):
        return entries
    ranked = sorted(entries, key=lambda e: unit_hash(seed, "subset", e.video_id))
    return sorted(ranked[:limit], key=lambda e: e.video_id)


def prepare(
    entries: Sequence[Entry],
    name: str,
    out_dir: str | os.PathLike,
    settings: work.Settings,
    *,
    workers: int = 1,
    examples_per_shard: int = 1024,
    runner: str = "local",
    beam_options: Sequence[str] = (),
) -> epath.Path:
    """Crops every entry (resuming from OUT/.work) and writes the dataset; returns OUT."""
    if not entries:
        raise writer.NothingToWriteError("no videos or images found in the dataset root")
    out_dir = epath.Path(out_dir)
    with contextlib.ExitStack() as stack:
        _hold(out_dir, stack)
        work_dir = work.open_cache(out_dir / WORK_DIR, settings)
        if runner == "beam":
            from data_prep import beam_pipeline

            out, summaries = beam_pipeline.run(
                entries, name, out_dir, work_dir, settings, examples_per_shard, beam_options
            )
        else:
            summaries = crop_all(entries, settings, work_dir, workers)
            out = write_from_cache(
                entries, summaries, name, out_dir, work_dir, settings, examples_per_shard
            )
        print(cache_note(summaries.values(), work_dir), file=sys.stderr)
        write_preview(out / PREVIEW, entries, name, work_dir)
    return out


def _hold(out_dir: epath.Path, stack: contextlib.ExitStack) -> None:
    """Creates OUT and holds its lock until `stack` closes: two runs into one OUT would delete
    each other's temporary shards. An OUT that cannot be written is one error naming it."""
    dir_lock.make_directory(out_dir, "--out")
    stack.enter_context(dir_lock.hold(out_dir, "cae-jax prepare"))


def cache_note(summaries: Iterable[dict], work_dir: epath.Path) -> str:
    """One line on what the run took from the crop cache and what it cropped."""
    how = collections.Counter(s["cache"] for s in summaries)
    note = (f"faces: {how['reused']} videos reused from {work_dir} (same file, size and "
            f"modification time), {how['cropped'] + how['recropped']} cropped")
    if how["recropped"]:
        note += (f" ({how['recropped']} of them again: cached from another source, or by a "
                 "release that did not record it)")
    return note


def crop_all(
    entries: Sequence[Entry],
    settings: work.Settings,
    work_dir: epath.Path,
    workers: int,
) -> dict[str, dict]:
    """Runs `work.process` over entries with a progress bar; returns video_id -> summary."""
    bar = tqdm.tqdm(total=len(entries), unit="video", desc="faces", dynamic_ncols=True)
    summaries = {}
    with bar:
        if workers <= 1:
            for entry in entries:
                summaries[entry.video_id] = work.process(entry, settings, work_dir)
                bar.update()
            return summaries
        stalled_rounds = 0
        while len(summaries) < len(entries):
            pending = [e for e in entries if e.video_id not in summaries]
            before = len(summaries)
            try:
                _crop_in_pool(pending, settings, work_dir, workers, summaries, bar)
            except BrokenProcessPool:
                # A file crashed its worker (work.process skips it after repeated deaths).
                stalled_rounds = 0 if len(summaries) > before else stalled_rounds + 1
                if stalled_rounds > work.MAX_ATTEMPTS:
                    raise
                bar.write("a worker process died; restarting the pool")
    return summaries


def _crop_in_pool(
    entries: Sequence[Entry],
    settings: work.Settings,
    work_dir: epath.Path,
    workers: int,
    summaries: dict[str, dict],
    bar: tqdm.tqdm,
) -> None:
    context = multiprocessing.get_context("spawn")  # Never fork a process holding TF.
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=context, initializer=work.init_pool_worker
    ) as pool:
        # Every worker started and idle before the work goes out. The pool spawns workers as
        # work is submitted, after waking its manager thread, which can go back to waiting
        # without the new worker among those it watches: that worker's death (a decoder
        # crash) would go unnoticed until some other result arrives.
        for started in [pool.submit(os.getpid) for _ in range(workers)]:
            started.result()
        futures = {
            pool.submit(work.process, entry, settings, os.fspath(work_dir)): entry
            for entry in entries
        }
        for future in concurrent.futures.as_completed(futures):
            summaries[futures[future].video_id] = future.result()
            bar.update()


def write_from_cache(
    entries: Sequence[Entry],
    summaries: dict[str, dict],
    name: str,
    out_dir: epath.Path,
    work_dir: epath.Path,
    settings: work.Settings,
    examples_per_shard: int,
) -> epath.Path:
    """Writes the cached crops of finished entries, in video-id order, into the dataset."""
    by_split: dict[str, list[Entry]] = {}
    for entry in entries:
        if summaries[entry.video_id]["status"] == "ok":
            by_split.setdefault(entry.split, []).append(entry)
    num_shards = {
        split: max(1, math.ceil(frame_count(group, summaries) / examples_per_shard))
        for split, group in by_split.items()
    }
    splits = {split: _examples(group, name, work_dir) for split, group in sorted(by_split.items())}
    fields = run_manifest(entries, summaries, settings)
    try:
        return writer.write_dataset(
            out_dir, name, splits, num_shards, skipped=fields.pop("skipped"), extra_manifest=fields
        )
    finally:  # Clears their progress bars now, not when collected: an error prints after.
        for examples in splits.values():
            examples.close()


_CACHE_FIELDS = ("source", "cache")  # Summary fields about the cache, not the dataset.


def run_manifest(
    entries: Sequence[Entry], summaries: dict[str, dict], settings: work.Settings
) -> dict:
    """The manifest's fields beside the split counts, for both runners: the videos skipped
    (every status but "ok") and why, the settings, and frames left out of kept videos."""
    skipped = [summaries[e.video_id] for e in entries if summaries[e.video_id]["status"] != "ok"]
    fields = {
        "skipped": [{k: v for k, v in s.items() if k not in _CACHE_FIELDS} for s in skipped],
        "settings": dataclasses.asdict(settings),
    }
    if any(e.frames for e in entries):
        fields["skipped_frames"] = deepfakebench.skipped_frames(
            [summaries[e.video_id] for e in entries]
        )
    return fields


def frame_count(entries: Iterable[Entry], summaries: dict[str, dict]) -> int:
    return sum(summaries[e.video_id]["frames"] for e in entries)


def _examples(group: Sequence[Entry], name: str, work_dir: epath.Path):
    bar = tqdm.tqdm(group, unit="video", desc="write", leave=False, dynamic_ncols=True)
    for entry in bar:
        yield from work.cached_examples(entry, name, work_dir)


def write_preview(
    path: epath.Path, entries: Sequence[Entry], name: str, work_dir: epath.Path
) -> None:
    """A PNG with one row per split of crops from a few real and fake videos, framed green
    (real) or red (fake): the first thing to look at to see that crops show faces."""

    rows = []
    for split in writer.SPLITS:
        done = [e for e in entries if e.split == split and work.is_cropped(e, work_dir)]
        if not done:
            continue
        ranked = sorted(done, key=lambda e: unit_hash("preview", e.video_id))
        real = [e for e in ranked if e.label == REAL]
        fake = [e for e in ranked if e.label != REAL]
        half = PREVIEW_PER_SPLIT // 2
        shown = real[: max(half, PREVIEW_PER_SPLIT - len(fake))]
        shown += fake[: PREVIEW_PER_SPLIT - len(shown)]
        crops = [_preview_crop(e, name, work_dir) for e in shown]
        labels = [int(e.label != REAL) for e in shown]
        rows.append(preview.sample_grid(np.stack(crops), np.array(labels),
                                        columns=PREVIEW_PER_SPLIT))
    if rows:
        grid = cv2.cvtColor(np.concatenate(rows), cv2.COLOR_RGB2BGR)
        path.write_bytes(cv2.imencode(".png", grid)[1].tobytes())


def _preview_crop(entry: Entry, name: str, work_dir: epath.Path) -> np.ndarray:
    """The entry's first crop, RGB, at the preview size."""
    png = next(work.cached_examples(entry, name, work_dir))["image"]
    bgr = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    small = cv2.resize(bgr, (PREVIEW_SIZE, PREVIEW_SIZE), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(small, cv2.COLOR_BGR2RGB)
