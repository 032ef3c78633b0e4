"""Face-crop examples -> a TFDS dataset directory of TFRecord shards plus `manifest.json`.

Every file is written to a temporary name and renamed into place, and `dataset_info.json`
(which `tfds.builder_from_directory` needs) is written last: a killed run never leaves a
partial shard under a final name, nor metadata describing shards that are not there. An
earlier dataset is moved aside before the new one is renamed in and deleted only after.
"""

from __future__ import annotations

import collections
import json
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence

import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath

from cae_jax import atomic_file
from data_prep import records

SPLITS = ("train", "validation", "test")
MANIFEST = "manifest.json"
NOTHING_WRITTEN = "manifest.nothing-written.json"
_MOVED = ".moved"  # In `previous_dir`: every file of the earlier dataset is there.
_COMMITTED = ".committed"  # In `previous_dir`: the new dataset is complete in `out_dir`.
_METADATA_FILES = ("dataset_info.json", "features.json", "label.labels.txt")


class NothingToWriteError(ValueError):
    """Every split is empty; the manifest written alongside lists what was skipped and why."""


class OutputError(OSError):
    """The dataset folder cannot be written (not a folder, read-only, a full disk)."""


def shard_name(name: str, split: str, index: int, num_shards: int) -> str:
    """The TFDS default file name of one shard."""
    return f"{name}-{split}.tfrecord-{index:05d}-of-{num_shards:05d}"


def write_json_atomic(path: epath.PathLike, obj) -> None:
    """Writes JSON through a temporary file, so readers see the old or the new file whole."""
    atomic_file.write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


class SplitStats:
    """Counts of one split for the manifest: videos and frames, by label and by method."""

    def __init__(self) -> None:
        self.frames = collections.Counter()
        self.videos: dict[str, set[str]] = collections.defaultdict(set)

    def add(self, video_id: str, label: int | str, method: str, frames: int = 1) -> None:
        label = records.LABEL_NAMES[label] if isinstance(label, int) else label
        for key in ("all", f"label:{label}", f"method:{method}"):
            self.frames[key] += frames
            self.videos[key].add(video_id)

    def to_dict(self) -> dict:
        def count(key: str) -> dict:
            return {"videos": len(self.videos.get(key, ())), "frames": self.frames[key]}

        methods = sorted(k.removeprefix("method:") for k in self.frames if k.startswith("method:"))
        return {
            **count("all"),
            "real": count("label:real"),
            "fake": count("label:fake"),
            "methods": {m: count(f"method:{m}") for m in methods},
        }


def temporary_shard(out_dir: epath.PathLike, name: str, split: str, index: int) -> epath.Path:
    """Where a shard is written before `commit` renames it; never matches a shard pattern."""
    return epath.Path(out_dir) / f".{name}-{split}-{index:05d}.tmp-{uuid.uuid4().hex[:12]}"


def write_shard(path: epath.PathLike, serialized: Iterable[bytes]) -> int:
    """Writes serialized examples to one TFRecord file; returns how many."""
    count = 0
    with tf.io.TFRecordWriter(os.fspath(path)) as writer:
        for record in serialized:
            writer.write(record)
            count += 1
    return count


def _write_split(
    out_dir: epath.Path, name: str, split: str, examples: Iterable[Mapping], num_shards: int
) -> tuple[list[tuple[epath.Path, int]], SplitStats]:
    """Writes examples round-robin into temporary shards; returns [(path, count)] and stats."""
    serialize = records.serializer()
    stats = SplitStats()
    paths = [temporary_shard(out_dir, name, split, i) for i in range(num_shards)]
    writers = [tf.io.TFRecordWriter(os.fspath(p)) for p in paths]
    lengths = [0] * num_shards
    try:
        for i, example in enumerate(examples):
            writers[i % num_shards].write(serialize(example))
            lengths[i % num_shards] += 1
            stats.add(example["video_id"], example["label"], example["method"])
    finally:
        for w in writers:
            w.close()
    return list(zip(paths, lengths, strict=True)), stats


def write_dataset(
    out_dir: epath.PathLike,
    name: str,
    splits: Mapping[str, Iterable[Mapping]],
    num_shards: int | Mapping[str, int] = 1,
    *,
    skipped: Sequence[Mapping] = (),
    extra_manifest: Mapping | None = None,
    description: str = "",
) -> epath.Path:
    """Writes a TFDS dataset directory loadable with `tfds.builder_from_directory(out_dir)`.

    Args:
      out_dir: the directory (created if needed; local or gs://). Shards and metadata of an
        earlier dataset of the same `name` in it are replaced; other files are left alone.
      name: dataset name, the prefix of shard files `{name}-{split}.tfrecord-{i:05d}-of-{n:05d}`.
      splits: split name (one of train/validation/test) -> iterable of example dicts in the
        `records.features()` schema. `image` is a uint8 HxWx3 RGB array or PNG bytes,
        `label` is 0/1 or "real"/"fake". Examples go round-robin over the split's shards.
      num_shards: shards per split (an int for all, or a dict per split). Shards that would get
        no example are not written, so a split has at most this many.
      skipped: entries `{"video_id", "split", "reason", ...}` of inputs that produced no example;
        they go into the manifest as they are.
      extra_manifest: more top-level manifest fields (e.g. the preparation settings).
      description: free text stored in dataset_info.json.

    Returns:
      `out_dir`. It holds `manifest.json` with, per split, the counts of videos and frames in
      total, for real, for fake and per method, and the `skipped` list.
    """
    out_dir = epath.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_splits(splits)
    shards, stats = {}, {}
    try:
        for split, examples in splits.items():
            n = num_shards if isinstance(num_shards, int) else num_shards[split]
            if n < 1:
                raise ValueError(f"num_shards for split {split!r} must be >= 1, got {n}")
            shards[split], stats[split] = _write_split(out_dir, name, split, examples, n)
        counts = {s: st.to_dict() for s, st in stats.items()}
        manifest = {"splits": counts, "skipped": list(skipped), **(extra_manifest or {})}
        return commit(out_dir, name, shards, manifest, description)
    except NothingToWriteError:
        raise
    except (OSError, tf.errors.OpError) as err:  # TensorFlow: ResourceExhaustedError, ...
        _remove_orphans(out_dir, name)
        reason = getattr(err, "message", None) or err.strerror or err
        raise OutputError(f"cannot write the dataset to {out_dir}: {reason}") from err
    except BaseException:
        _remove_orphans(out_dir, name)  # Every split's temporary shards, the failed one's too.
        raise


def _check_splits(splits: Iterable[str]) -> None:
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}; splits are {SPLITS}")


def commit(
    out_dir: epath.PathLike,
    name: str,
    shards: Mapping[str, Sequence[tuple[epath.PathLike, int]]],
    manifest: Mapping,
    description: str = "",
) -> epath.Path:
    """Turns temporary shards into the dataset, replacing an earlier one of the same `name`.

    `shards` maps split -> [(temporary shard path, example count)], in order. Empty shards are
    deleted and the rest numbered densely. `manifest` needs "splits" (per split counts) and
    "skipped"; "name" is added. The earlier dataset is moved aside (`previous_dir`), the new
    one renamed in, and only then is the earlier one deleted: at every point a complete
    dataset exists, and a run killed in between is repaired by the next `commit`.

    With no example at all, an earlier dataset is kept as it is (this run's manifest goes to
    `NOTHING_WRITTEN`), or without one only the manifest is written, and
    `NothingToWriteError` is raised.
    """
    out_dir = epath.Path(out_dir)
    _check_splits(shards)
    recover(out_dir, name)
    shards = {s: [(epath.Path(p), n) for p, n in pairs] for s, pairs in shards.items()}
    kept = {s: [(p, n) for p, n in pairs if n] for s, pairs in shards.items()}
    for pairs in shards.values():
        for path, n in pairs:
            if not n:
                path.unlink()
    manifest = {"name": name, **manifest}
    if not any(kept.values()):
        _remove_orphans(out_dir, name)
        return _nothing_to_write(out_dir, name, manifest)
    aside = previous_dir(out_dir, name)
    try:
        _move_aside(out_dir, name, aside)
        _write_new(out_dir, name, kept, manifest, description)
        (aside / _COMMITTED).touch()
    except BaseException:
        recover(out_dir, name)
        raise
    recover(out_dir, name)  # Deletes the earlier dataset.
    _remove_orphans(out_dir, name)
    if (out_dir / NOTHING_WRITTEN).exists():  # An earlier empty run's, now out of date.
        (out_dir / NOTHING_WRITTEN).unlink()
    return out_dir



def previous_dir(out_dir: epath.Path, name: str) -> epath.Path:
    """Where the earlier dataset waits while a new one is renamed into `out_dir`."""
    return out_dir / f".{name}-previous"


def _dataset_files(out_dir: epath.Path, name: str) -> list[epath.Path]:
    """The files of dataset `name` in `out_dir`, metadata first (so it stops loading first)."""
    files = [out_dir / f for f in (*_METADATA_FILES, MANIFEST) if (out_dir / f).exists()]
    for split in SPLITS:
        files += sorted(out_dir.glob(f"{name}-{split}.tfrecord-*-of-*"))
    return files


def _move_aside(out_dir: epath.Path, name: str, aside: epath.Path) -> None:
    aside.mkdir()
    for path in _dataset_files(out_dir, name):
        path.rename(aside / path.name)
    (aside / _MOVED).touch()


def _write_new(
    out_dir: epath.Path,
    name: str,
    kept: Mapping[str, Sequence[tuple[epath.Path, int]]],
    manifest: Mapping,
    description: str,
) -> None:
    split_infos = []
    for split, pairs in kept.items():
        if not pairs:
            continue
        num_bytes = sum(p.stat().length for p, _ in pairs)
        for i, (path, _) in enumerate(pairs):
            path.rename(out_dir / shard_name(name, split, i, len(pairs)))
        lengths = [n for _, n in pairs]
        split_infos.append(
            tfds.core.SplitInfo(name=split, shard_lengths=lengths, num_bytes=num_bytes)
        )
    write_json_atomic(out_dir / MANIFEST, manifest)
    tfds.folder_dataset.write_metadata(
        data_dir=os.fspath(out_dir),
        features=records.features(),
        split_infos=split_infos,
        check_data=False,
        description=description,
    )


def recover(out_dir: epath.PathLike, name: str) -> None:
    """Finishes or undoes a replacement that stopped half way; a no-op when none did.

    Committed: the earlier dataset is deleted. Otherwise the files of the new one (if any
    were renamed in) are removed and the earlier dataset's files moved back.
    """
    out_dir = epath.Path(out_dir)
    aside = previous_dir(out_dir, name)
    if not aside.exists():
        return
    if not (aside / _COMMITTED).exists():
        if (aside / _MOVED).exists():  # Whatever of `name` is in out_dir is the new, partial.
            for path in _dataset_files(out_dir, name):
                path.unlink()
            (aside / _MOVED).unlink()  # Before moving back: what is moved back stays.
        for path in aside.iterdir():
            if path.name not in (_MOVED, _COMMITTED):
                path.rename(out_dir / path.name)
    for path in aside.iterdir():
        if path.name not in (_MOVED, _COMMITTED):
            path.unlink()
    for marker in (_MOVED, _COMMITTED):  # Last: a kill before this point is redone.
        if (aside / marker).exists():
            (aside / marker).unlink()
    aside.rmdir()


def _nothing_to_write(out_dir: epath.Path, name: str, manifest: Mapping):
    if _dataset_files(out_dir, name):
        write_json_atomic(out_dir / NOTHING_WRITTEN, manifest)
        raise NothingToWriteError(
            f"no examples to write to {out_dir}: every split is empty; the dataset already "
            f"there is kept as it was (this run's skips: {out_dir / NOTHING_WRITTEN})"
        )
    write_json_atomic(out_dir / MANIFEST, manifest)
    raise NothingToWriteError(
        f"no examples to write to {out_dir}: every split is empty (see {MANIFEST})"
    )


def _remove_orphans(out_dir: epath.Path, name: str) -> None:
    for orphan in out_dir.glob(f".{name}-*.tmp-*"):  # Left by killed runs or retried workers.
        orphan.unlink()
