"""Raw dataset layouts -> lists of `Entry` (one per video or image) with label, method and split.

Each builder reads its dataset's official layout and metadata. Entries that metadata lists but
that are missing on disk are still returned: `prepare` records them as skipped, never drops them.
Where a dataset has no official validation (or test) split, one is carved out by identity
(`entries.carve`).
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
from collections.abc import Callable, Iterator

from etils.epath import Path

from data_prep import deepfakebench, video
from data_prep.entries import (
    COMPRESSIONS,
    REAL,
    DatasetLayoutError,
    Entry,
    Options,
    carve,
)

SPLITS_DIR = pathlib.Path(__file__).parent / "splits"  # Official FF++ pair lists (package data).


def _relative(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def _media_files(folder: Path) -> list[Path]:
    """Videos and images anywhere under folder (walk() works on local disks and gs:// alike)."""
    found = [d / f for d, _, files in folder.walk() for f in files]
    return sorted(p for p in found if video.is_video(p) or video.is_image(p))


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetLayoutError(f"{path}: expected {what}, not found")
    return path


# --- FaceForensics++ -------------------------------------------------------------------------


def ffpp_split_of_ids() -> dict[str, str]:
    """Source id ("004") -> split, from the official pair lists shipped with this package."""
    names = {"train": "train", "val": "validation", "test": "test"}
    split_of = {}
    for file_stem, split in names.items():
        text = (SPLITS_DIR / f"{file_stem}.json").read_text()
        for pair in json.loads(text):
            for source_id in pair:
                split_of[source_id] = split
    return split_of


def _ffpp_split(split_of: dict[str, str], stem: str, path: Path) -> str:
    ids = stem.split("_")
    splits = {split_of.get(i) for i in ids}
    if len(splits) != 1 or None in splits:
        raise DatasetLayoutError(f"{path}: id(s) {ids} not in one official FF++ split pair")
    return splits.pop()


def ffpp(root: Path, opts: Options) -> list[Entry]:
    """FaceForensics++: youtube originals and the chosen manipulations at one compression."""
    if opts.compression not in COMPRESSIONS:
        raise DatasetLayoutError(f"compression must be one of {COMPRESSIONS}: {opts.compression}")
    split_of = ffpp_split_of_ids()
    folders = {REAL: root / "original_sequences" / "youtube" / opts.compression / "videos"}
    for method in opts.methods:
        folders[method] = root / "manipulated_sequences" / method / opts.compression / "videos"
    _require_dir(folders[REAL], "FF++ original_sequences/youtube/<comp>/videos")
    entries = []
    for method, folder in folders.items():
        if not folder.is_dir():
            continue  # A method not downloaded; the manifest's per-method counts show it.
        for path in _media_files(folder):
            entries.append(
                Entry(
                    path=path,
                    video_id=_relative(root, path),
                    label=REAL if method == REAL else "fake",
                    method=method,
                    split=_ffpp_split(split_of, path.stem, path),
                    compression=opts.compression,
                )
            )
    return entries


def dfd(root: Path, opts: Options) -> list[Entry]:
    """DeepFakeDetection (FF++ download): actors' originals and their fakes; splits by actor."""
    real_dir = root / "original_sequences" / "actors" / opts.compression / "videos"
    fake_dir = root / "manipulated_sequences" / "DeepFakeDetection" / opts.compression / "videos"
    _require_dir(real_dir, "DFD original_sequences/actors/<comp>/videos")
    entries = [
        Entry(p, _relative(root, p), label, method, "train", opts.compression)
        for folder, label, method in (
            (real_dir, REAL, REAL),
            (fake_dir, "fake", "DeepFakeDetection"),
        )
        if folder.is_dir()
        for p in _media_files(folder)
    ]
    # "01__walking.mp4" and "01_02__walking__ABCD.mp4" both belong to actor 01.
    actor = lambda e: e.path.stem.split("_")[0]  # noqa: E731
    fractions = {"validation": opts.val_fraction, "test": opts.test_fraction}
    return carve(entries, actor, fractions, opts.seed)


# --- Celeb-DF --------------------------------------------------------------------------------

CELEBDF_FOLDERS = {"Celeb-real": REAL, "YouTube-real": REAL, "Celeb-synthesis": "fake"}


def celebdf(root: Path, opts: Options) -> list[Entry]:
    """Celeb-DF v1/v2: List_of_testing_videos.txt is test; validation is carved from train."""
    test_list = root / "List_of_testing_videos.txt"
    if not test_list.is_file():
        raise DatasetLayoutError(f"{test_list}: Celeb-DF test list not found")
    test_ids = set()
    for number, line in enumerate(test_list.read_text().splitlines(), 1):
        if line.strip():
            parts = line.split()
            if len(parts) != 2 or parts[0] not in ("0", "1"):
                raise DatasetLayoutError(f"{test_list}:{number}: expected '<0|1> <path>': {line!r}")
            test_ids.add(parts[1])
    entries, on_disk = [], set()
    for folder, label in CELEBDF_FOLDERS.items():
        if not (root / folder).is_dir():
            continue
        for path in _media_files(root / folder):
            video_id = _relative(root, path)
            on_disk.add(video_id)
            split = "test" if video_id in test_ids else "train"
            method = REAL if label == REAL else folder
            entries.append(Entry(path, video_id, label, method, split))
    if not entries:
        raise DatasetLayoutError(f"{root}: none of {sorted(CELEBDF_FOLDERS)} holds videos")
    for video_id in sorted(test_ids - on_disk):  # Listed but missing: reported as skipped.
        folder = video_id.split("/")[0]
        label = CELEBDF_FOLDERS.get(folder, "fake")
        method = REAL if label == REAL else folder
        entries.append(Entry(root / video_id, video_id, label, method, "test"))
    return carve(entries, _celebdf_identity, {"validation": opts.val_fraction}, opts.seed)


def _celebdf_identity(e: Entry) -> str:
    """'Celeb-real/id3_0001' and 'Celeb-synthesis/id3_id7_0001' -> 'id3'; YouTube clips are
    each their own identity."""
    stem = e.path.stem
    return stem.split("_")[0] if stem.startswith("id") else e.video_id


# --- DFDC ------------------------------------------------------------------------------------


def dfdc(root: Path, opts: Options) -> list[Entry]:
    """DFDC: dfdc_train_part_*/metadata.json (train; validation carved by original video) and
    the public test set's labels.csv (test)."""
    pairs = []  # (entry, its original video) for the grouping of the carve-out.
    for metadata in sorted(root.glob("dfdc_train_part_*/metadata.json")):
        try:
            table = json.loads(metadata.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DatasetLayoutError(f"{metadata}: not valid JSON ({err})") from err
        for filename, info in sorted(table.items()):
            label = str(info.get("label", "")).upper()
            if label not in ("REAL", "FAKE"):
                raise DatasetLayoutError(f"{metadata}: {filename} has label {label!r}")
            path = metadata.parent / filename
            original = info.get("original") or filename
            entry = Entry(
                path,
                _relative(root, path),
                label.lower(),
                REAL if label == "REAL" else "DFDC",
                "train",
            )
            pairs.append((entry, original))
    entries = carve(
        [e for e, _ in pairs], _group_by(pairs), {"validation": opts.val_fraction}, opts.seed
    )
    for labels in sorted([*root.glob("labels.csv"), *root.glob("*/labels.csv")]):
        entries += _dfdc_test(root, labels)
    if not entries:
        raise DatasetLayoutError(f"{root}: no dfdc_train_part_*/metadata.json nor labels.csv")
    return entries


def _group_by(pairs: list[tuple[Entry, str]]) -> Callable[[Entry], str]:
    """Groups a fake with its original video (the original's own name for reals)."""
    group = {e.video_id: original for e, original in pairs}
    return lambda e: group[e.video_id]


def _dfdc_test(root: Path, labels: Path) -> Iterator[Entry]:
    for number, row in enumerate(csv.DictReader(labels.read_text().splitlines()), 2):
        try:
            filename, label = row["filename"], int(row["label"])
        except (KeyError, TypeError, ValueError) as err:
            raise DatasetLayoutError(
                f"{labels}:{number}: expected columns filename,label (0 real, 1 fake)"
            ) from err
        path = labels.parent / filename
        label_name = "fake" if label else REAL
        yield Entry(path, _relative(root, path), label_name, "DFDC" if label else REAL, "test")


# --- Own folders -----------------------------------------------------------------------------

_LABELS = {"real": REAL, "0": REAL, "fake": "fake", "1": "fake"}
_SPLITS = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}


def folder(root: Path, opts: Options) -> list[Entry]:
    """ROOT/real/** and ROOT/fake/** (videos or images; fake/<method>/... names the method),
    or a CSV file `path,label[,split]` with paths relative to the CSV's folder."""
    if root.is_file():
        return _folder_csv(root, opts)
    entries = []
    for label in ("real", "fake"):
        base = _require_dir(root / label, f"a '{label}' folder (or pass a CSV file)")
        for path in _media_files(base):
            parts = path.relative_to(base).parts
            method = REAL if label == REAL else (parts[0] if len(parts) > 1 else "fake")
            entries.append(Entry(path, _relative(root, path), label, method, "train"))
    return _carve_unsplit(entries, opts)


def _folder_csv(csv_path: Path, opts: Options) -> list[Entry]:
    try:
        text = csv_path.read_text()
    except UnicodeDecodeError as err:
        raise DatasetLayoutError(
            f"{csv_path}: a file, but not a CSV of path,label[,split] rows ({err.reason} at "
            f"byte {err.start}): --root takes a folder or such a CSV"
        ) from err
    entries, has_split = [], False
    for number, row in enumerate(csv.reader(text.splitlines()), 1):
        if not row or (number == 1 and row[0].strip().lower() == "path"):
            continue  # Blank line or header.
        if len(row) not in (2, 3):
            raise DatasetLayoutError(f"{csv_path}:{number}: expected path,label[,split]")
        label = _LABELS.get(row[1].strip().lower())
        split = _SPLITS.get(row[2].strip().lower()) if len(row) == 3 else "train"
        if label is None or split is None:
            raise DatasetLayoutError(
                f"{csv_path}:{number}: label must be real/fake/0/1 and split "
                f"train/validation/test: {row}"
            )
        has_split |= len(row) == 3
        path = (csv_path.parent / row[0].strip()).resolve()
        video_id = Path(row[0].strip()).as_posix()
        method = REAL if label == REAL else "fake"
        entries.append(Entry(path, video_id, label, method, split))
    if not entries:
        raise DatasetLayoutError(f"{csv_path}: no rows")
    return entries if has_split else _carve_unsplit(entries, opts)


def _carve_unsplit(entries: list[Entry], opts: Options) -> list[Entry]:
    """Without given splits each item (a video, or an image's folder) is its own group."""
    group = lambda e: str(Path(e.video_id).parent) if e.is_image else e.video_id  # noqa: E731
    fractions = {"validation": opts.val_fraction, "test": opts.test_fraction}
    return carve(entries, group, fractions, opts.seed)


BUILDERS: dict[str, Callable[[Path, Options], list[Entry]]] = {
    "ffpp": ffpp,
    "celebdf": celebdf,
    "dfdc": dfdc,
    "dfd": dfd,
    "folder": folder,
    "deepfakebench": deepfakebench.entries,
}


def list_entries(dataset: str, root: str | os.PathLike, opts: Options) -> list[Entry]:
    """All entries of a raw dataset, sorted by video id (ids must be unique)."""
    root = Path(root)
    if dataset not in BUILDERS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {sorted(BUILDERS)}")
    if not root.exists():
        raise DatasetLayoutError(f"{root}: dataset root not found")
    entries = sorted(BUILDERS[dataset](root, opts), key=lambda e: e.video_id)
    pairs = zip(entries, entries[1:], strict=False)
    duplicates = {a.video_id for a, b in pairs if a.video_id == b.video_id}
    if duplicates:
        raise DatasetLayoutError(f"{root}: duplicate video ids {sorted(duplicates)[:5]}")
    return entries
