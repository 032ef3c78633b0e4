"""Face-crop examples -> a TFDS dataset directory of TFRecord shards plus `manifest.json`.

Every file is written to a temporary name and renamed into place, and `dataset_info.json`
(which `tfds.builder_from_directory` needs) is written last: a killed run never leaves a
partial shard under a final name, nor metadata describing shards that are not there.
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import tensorflow as tf
import tensorflow_datasets as tfds

from cae_jax import records

SPLITS = ("train", "validation", "test")
MANIFEST = "manifest.json"
_METADATA_FILES = ("dataset_info.json", "features.json", "label.labels.txt")


def shard_name(name: str, split: str, index: int, num_shards: int) -> str:
    """The TFDS default file name of one shard."""
    return f"{name}-{split}.tfrecord-{index:05d}-of-{num_shards:05d}"


def write_json_atomic(path: Path, obj) -> None:
    """Writes JSON through a temporary file, so readers see the old or the new file whole."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


class SplitStats:
    """Counts of one split for the manifest: videos and frames, by label and by method."""

    def __init__(self) -> None:
        self.frames = collections.Counter()
        self.videos: dict[str, set[str]] = collections.defaultdict(set)

    def add(self, example: Mapping) -> None:
        label = example["label"]
        label = records.LABEL_NAMES[label] if isinstance(label, int) else label
        for key in ("all", f"label:{label}", f"method:{example['method']}"):
            self.frames[key] += 1
            self.videos[key].add(example["video_id"])

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


def _write_split(
    out_dir: Path, name: str, split: str, examples: Iterable[Mapping], num_shards: int
) -> tuple[list[tuple[Path, Path]], list[int], int, SplitStats]:
    """Writes examples round-robin into temporary shards; returns (tmp, final) path pairs."""
    features = records.features()
    stats = SplitStats()
    tmp_paths = [out_dir / f".{name}-{split}-{i:05d}.tmp-{os.getpid()}" for i in range(num_shards)]
    writers = [tf.io.TFRecordWriter(os.fspath(p)) for p in tmp_paths]
    lengths = [0] * num_shards
    try:
        for i, example in enumerate(examples):
            writers[i % num_shards].write(features.serialize_example(example))
            lengths[i % num_shards] += 1
            stats.add(example)
    except BaseException:
        for w, p in zip(writers, tmp_paths, strict=True):
            w.close()
            p.unlink(missing_ok=True)
        raise
    for w in writers:
        w.close()
    # Fewer examples than shards: drop the empty ones so no shard is empty.
    kept = [(p, n) for p, n in zip(tmp_paths, lengths, strict=True) if n]
    for p, n in zip(tmp_paths, lengths, strict=True):
        if not n:
            p.unlink()
    pairs = [(p, out_dir / shard_name(name, split, i, len(kept))) for i, (p, _) in enumerate(kept)]
    num_bytes = sum(p.stat().st_size for p, _ in kept)
    return pairs, [n for _, n in kept], num_bytes, stats


def write_dataset(
    out_dir: str | os.PathLike,
    name: str,
    splits: Mapping[str, Iterable[Mapping]],
    num_shards: int | Mapping[str, int] = 1,
    *,
    skipped: Sequence[Mapping] = (),
    extra_manifest: Mapping | None = None,
    description: str = "",
) -> Path:
    """Writes a TFDS dataset directory loadable with `tfds.builder_from_directory(out_dir)`.

    Args:
      out_dir: the directory (created if needed). Shards and metadata of an earlier dataset of
        the same `name` in it are replaced; other files are left alone.
      name: dataset name, the prefix of shard files `{name}-{split}.tfrecord-{i:05d}-of-{n:05d}`.
      splits: split name (one of train/validation/test) -> iterable of example dicts in the
        `cae_jax.records.features()` schema. `image` is a uint8 HxWx3 RGB array or PNG bytes,
        `label` is 0/1 or "real"/"fake". Examples go round-robin over the split's shards.
      num_shards: shards per split (an int for all, or a dict per split). Shards that would get
        no example are not written, so a split has at most this many.
      skipped: entries `{"video_id", "split", "reason", ...}` of inputs that produced no example;
        they go into the manifest as they are.
      extra_manifest: more top-level manifest fields (e.g. the preparation settings).
      description: free text stored in dataset_info.json.

    Returns:
      `out_dir` as a Path. It holds `manifest.json` with, per split, the counts of videos and
      frames in total, for real, for fake and per method, and the `skipped` list.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}; splits are {SPLITS}")
    pending: list[tuple[Path, Path]] = []
    split_infos, manifest_splits = [], {}
    try:
        for split, examples in splits.items():
            n = num_shards if isinstance(num_shards, int) else num_shards[split]
            if n < 1:
                raise ValueError(f"num_shards for split {split!r} must be >= 1, got {n}")
            pairs, lengths, num_bytes, stats = _write_split(out_dir, name, split, examples, n)
            pending += pairs
            manifest_splits[split] = stats.to_dict()
            if lengths:
                split_infos.append(
                    tfds.core.SplitInfo(name=split, shard_lengths=lengths, num_bytes=num_bytes)
                )
    except BaseException:
        for tmp, _ in pending:
            tmp.unlink(missing_ok=True)
        raise
    if not split_infos:
        for tmp, _ in pending:
            tmp.unlink(missing_ok=True)
        raise ValueError(f"no examples to write to {out_dir}: every split is empty")

    _remove_dataset_files(out_dir, name)
    for tmp, final in pending:
        os.replace(tmp, final)
    manifest = {
        "name": name,
        "splits": manifest_splits,
        "skipped": list(skipped),
        **(extra_manifest or {}),
    }
    write_json_atomic(out_dir / MANIFEST, manifest)
    tfds.folder_dataset.write_metadata(
        data_dir=os.fspath(out_dir),
        features=records.features(),
        split_infos=split_infos,
        check_data=False,
        description=description,
    )
    return out_dir


def _remove_dataset_files(out_dir: Path, name: str) -> None:
    """Removes metadata first, then old shards: a crash in between leaves nothing loadable."""
    for meta in _METADATA_FILES:
        (out_dir / meta).unlink(missing_ok=True)
    for split in SPLITS:
        for old in out_dir.glob(f"{name}-{split}.tfrecord-*-of-*"):
            old.unlink()
