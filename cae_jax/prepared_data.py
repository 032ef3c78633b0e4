"""Reading what `cae-jax prepare` wrote: a split's shards, its class counts, each record.

Shards are located from the dataset's `dataset_info.json` (TFDS layout) with their record
counts, and records are parsed with protobuf directly into the fields the pipelines use
(`data_prep/records.py` is the schema); the PNG is decoded by `decode_image`. Every failure
names the file (and the record's byte offset).
"""

from __future__ import annotations

import json
import os

import cv2
import grain
import numpy as np
from etils import epath
from google.protobuf.message import DecodeError
from ml_collections import ConfigDict

from cae_jax import example_proto, tfrecord

METADATA_FIELDS = ("video_id", "method", "dataset")  # Text features kept for video metrics.
TFDS_SHARD_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"  # TFDS's default.


def split_shards(data_dir: str | os.PathLike, split: str) -> list[tuple[str, int]]:
    """(path, record count) of each shard of a split, from the dir's `dataset_info.json`.

    File names follow the split's `filepathTemplate` (TFDS's default when absent).

    The counts let the reader notice a shard cut short exactly at a record boundary, which
    no checksum can.
    """
    info_path = epath.Path(data_dir) / "dataset_info.json"
    if not info_path.is_file():
        raise FileNotFoundError(f"{info_path} not found: is {data_dir} a `cae-jax prepare` output?")
    try:
        info = json.loads(info_path.read_text())
        splits = {s["name"]: s for s in info.get("splits", [])}
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise ValueError(f"{info_path}: not a dataset_info.json written by `cae-jax prepare` "
                         f"({err})") from err
    if split not in splits:
        raise ValueError(f"{info_path}: no split {split!r}; it has {sorted(splits)}")
    lengths = [int(n) for n in splits[split]["shardLengths"]]
    template = splits[split].get("filepathTemplate", TFDS_SHARD_TEMPLATE)
    shards = []
    for i, length in enumerate(lengths):
        name = (
            template.replace("{DATASET}", info["name"])
            .replace("{SPLIT}", split)
            .replace("{FILEFORMAT}", info.get("fileFormat", "tfrecord"))
            .replace("{SHARD_X_OF_Y}", f"{i:05d}-of-{len(lengths):05d}")
        )
        path = epath.Path(data_dir) / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: shard listed in {info_path} is missing")
        shards.append((str(path), length))
    return shards


def class_counts(data_dir: str, split: str) -> tuple[int, int]:
    """(real, fake) frames of a split from `manifest.json` (written by `cae-jax prepare`)."""
    path = epath.Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: input.class_balance needs the manifest of `prepare`")
    counts = json.loads(path.read_text())["splits"].get(split)
    if counts is None:
        raise ValueError(f"{path}: no split {split!r} in the manifest")
    return counts["real"]["frames"], counts["fake"]["frames"]


def source(shards: list[tuple[str, int]], skip_corrupt: bool) -> tfrecord.IndexedTFRecords:
    paths, counts = zip(*shards, strict=True)
    return tfrecord.IndexedTFRecords(paths, num_records=counts, skip_corrupt=skip_corrupt)


def read_options(config: ConfigDict) -> grain.ReadOptions:
    return grain.ReadOptions(
        num_threads=config.input.threads, prefetch_buffer_size=config.input.buffer
    )


def _feature(features, name: str, kind: str, where: tuple[str, int]):
    if name not in features:
        raise tfrecord.CorruptRecordError(*where, f"record has no feature {name!r}")
    values = getattr(features[name], kind).value
    if not values:
        raise tfrecord.CorruptRecordError(*where, f"feature {name!r} has no {kind} value")
    return values[0]


class ParseRecord(grain.transforms.Map):
    """Raw record -> dict of the fields the pipeline uses (the image stays PNG bytes).

    Reads the `tf.train.Example` with protobuf directly (`example_proto`): the same wire
    format as `records.features()`, without TensorFlow.
    """

    def __init__(self, skip_corrupt: bool):
        self.skip_corrupt = skip_corrupt

    def map(self, raw: tfrecord.RawRecord) -> dict | None:
        where = (raw["path"], raw["offset"])
        try:
            try:
                features = example_proto.Example.FromString(raw["data"]).features.feature
            except DecodeError as err:
                raise tfrecord.CorruptRecordError(
                    *where, f"not a tf.train.Example ({err})"
                ) from err
            parsed = {
                "png": _feature(features, "image", "bytes_list", where),
                "label": int(_feature(features, "label", "int64_list", where)),
                "frame_index": int(_feature(features, "frame_index", "int64_list", where)),
                "path": raw["path"],
                "offset": raw["offset"],
            }
            for name in METADATA_FIELDS:
                parsed[name] = _feature(features, name, "bytes_list", where).decode()
            if parsed["label"] not in (0, 1):
                raise tfrecord.CorruptRecordError(*where, f"label {parsed['label']} not 0 or 1")
        except tfrecord.CorruptRecordError as err:
            tfrecord.skip_or_raise(err, self.skip_corrupt)
            return None
        return parsed


def decode_image(record: dict) -> np.ndarray:
    """PNG bytes of a parsed record -> uint8 RGB; failure names the file and byte offset."""
    image = cv2.imdecode(np.frombuffer(record["png"], np.uint8), cv2.IMREAD_COLOR_RGB)
    if image is None:
        raise tfrecord.CorruptRecordError(
            record["path"], record["offset"], "image bytes do not decode as PNG"
        )
    return image


def decode_or_skip(record: dict, skip_corrupt: bool) -> np.ndarray | None:
    try:
        return decode_image(record)
    except tfrecord.CorruptRecordError as err:
        tfrecord.skip_or_raise(err, skip_corrupt)
        return None
