"""Streams prepared TFRecord shards into the train and eval steps with grain.

Training, per host: the host's shards of each dataset (shards dealt round-robin by process
index) are indexed record by record (`cae_jax.tfrecord`), shuffled globally and freshly each
epoch, parsed, decoded, resized, augmented (optionally turned into self-blended fakes), mixed
across datasets by weight, batched to the per-host batch and assembled into global
`jax.Array`s sharded over the mesh. Shuffling record indices (not a window of a stream)
makes reads hop between files, and makes the iterator state a handful of counters: a resumed
run produces exactly the batches an uninterrupted run would have.

Evaluation reads every record of a split exactly once across hosts (each host a contiguous
range of records), unaugmented, and pads the last batches with `mask=False` rows.

Every random choice derives from `config.seed`, the dataset, the host and the record's
position in the stream, so a run is reproducible. grain workers each batch their own slice
of the stream: a given worker count always gives the same batches (0 and 1 the same ones).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import types
import weakref
from collections.abc import Iterator, Sequence

import cv2
import grain
import jax
import numpy as np
from absl import flags
from etils import epath
from google.protobuf.message import DecodeError
from jax.sharding import Mesh
from ml_collections import ConfigDict
from tensorflow.core.example import example_pb2

from cae_jax import augment, device_augment, sbi, sharding, tfrecord
from cae_jax import config as config_lib
from cae_jax.models import normalize

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
    info = json.loads(info_path.read_text())
    splits = {s["name"]: s for s in info.get("splits", [])}
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


def per_host_batch(global_batch: int, process_count: int) -> int:
    if global_batch % process_count:
        raise ValueError(f"batch size {global_batch} is not divisible by {process_count} hosts")
    return global_batch // process_count


def _check_divides(global_batch: int, mesh: Mesh) -> None:
    """The batch is split over every device of the mesh, so their count must divide it."""
    if global_batch % mesh.size:
        raise ValueError(f"batch size {global_batch} is not divisible by the {mesh.size} devices")


# ----------------------------------------------------------------------------- per record


def _feature(features, name: str, kind: str, where: tuple[str, int]):
    if name not in features:
        raise tfrecord.CorruptRecordError(*where, f"record has no feature {name!r}")
    values = getattr(features[name], kind).value
    if not values:
        raise tfrecord.CorruptRecordError(*where, f"feature {name!r} has no {kind} value")
    return values[0]


class ParseRecord(grain.transforms.Map):
    """Raw record -> dict of the fields the pipeline uses (the image stays PNG bytes).

    Reads the `tf.train.Example` with protobuf directly: the same wire format as
    `records.features()`, without a TensorFlow op per record.
    """

    def __init__(self, skip_corrupt: bool):
        self.skip_corrupt = skip_corrupt

    def map(self, raw: tfrecord.RawRecord) -> dict | None:
        where = (raw["path"], raw["offset"])
        try:
            try:
                features = example_pb2.Example.FromString(raw["data"]).features.feature
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


def _decode_or_skip(record: dict, skip_corrupt: bool) -> np.ndarray | None:
    try:
        return decode_image(record)
    except tfrecord.CorruptRecordError as err:
        tfrecord.skip_or_raise(err, skip_corrupt)
        return None


class LabelIs(grain.transforms.Filter):
    def __init__(self, label: int):
        self.label = label

    def filter(self, record: dict) -> bool:
        return record["label"] == self.label


class TrainTransform(grain.transforms.RandomMap):
    """Decode, resize, maybe self-blend a real face, augment: one training example.

    With `input.augment.on_device` only the JPEG step runs here; the other augmentation
    choices, drawn from the same generator in the same order, travel as `aug_*` fields for
    the train step to apply.
    """

    def __init__(self, config: ConfigDict, dataset_id: int, on_device: bool):
        self.image_size = config.model.image_size
        self.skip_corrupt = config.input.skip_corrupt
        self.sbi_prob = config.input.sbi.prob
        # A plain copy: a ConfigDict field read costs ~4 us, a dozen of them per record.
        self.augment = types.SimpleNamespace(**config.input.augment.to_dict())
        self.dataset_id = dataset_id
        self.on_device = on_device

    def random_map(self, record: dict, rng: np.random.Generator) -> dict | None:
        image = _decode_or_skip(record, self.skip_corrupt)
        if image is None:
            return None
        image = augment.random_resize(image, self.image_size, rng, self.augment.resize_prob)
        label = record["label"]
        if label == 0 and rng.random() < self.sbi_prob:
            image, _ = sbi.self_blend(image, rng)
            label = 1
        params = augment.draw(rng, self.augment)
        image = augment.apply(image, params, geometric_and_colour=not self.on_device)
        example = {"image": image, "label": np.int32(label),
                   "dataset_id": np.int32(self.dataset_id)}
        if self.on_device:
            example.update(device_augment.param_fields(params))
        return example


class EvalTransform(grain.transforms.Map):
    """Decode and resize (area/cubic), nothing random: one evaluation example."""

    def __init__(self, image_size: int, skip_corrupt: bool):
        self.image_size = image_size
        self.skip_corrupt = skip_corrupt

    def map(self, record: dict) -> dict | None:
        image = _decode_or_skip(record, self.skip_corrupt)
        if image is None:
            return None
        example = {k: record[k] for k in (*METADATA_FIELDS, "frame_index", "label")}
        return {**example, "image": augment.isotropic_resize(image, self.image_size)}


# ----------------------------------------------------------------------------- train


def _read_options(config: ConfigDict) -> grain.ReadOptions:
    return grain.ReadOptions(
        num_threads=config.input.threads, prefetch_buffer_size=config.input.buffer
    )


def _source(shards: list[tuple[str, int]], skip_corrupt: bool) -> tfrecord.IndexedTFRecords:
    paths, counts = zip(*shards, strict=True)
    return tfrecord.IndexedTFRecords(paths, num_records=counts, skip_corrupt=skip_corrupt)


def _stream_seed(seed: int, dataset_id: int, process_index: int) -> int:
    """A distinct 32-bit seed per (run seed, dataset, host)."""
    return int(np.random.SeedSequence([seed, dataset_id, process_index]).generate_state(1)[0])


def _class_counts(data_dir: str, split: str) -> tuple[int, int]:
    """(real, fake) frames of a split from `manifest.json` (written by `cae-jax prepare`)."""
    path = epath.Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: input.class_balance needs the manifest of `prepare`")
    counts = json.loads(path.read_text())["splits"].get(split)
    if counts is None:
        raise ValueError(f"{path}: no split {split!r} in the manifest")
    return counts["real"]["frames"], counts["fake"]["frames"]


def _dataset_stream(
    config: ConfigDict, data_dir: str, dataset_id: int, process_index: int, process_count: int,
    on_device: bool,
) -> tuple[grain.IterDataset, int]:
    """An endless stream of training examples of one dataset on one host, and its size."""
    inp = config.input
    shards = split_shards(data_dir, inp.train_split)
    host_shards = shards[process_index::process_count]
    if not host_shards:
        raise ValueError(
            f"{data_dir}: {len(shards)} shards of split {inp.train_split!r} cannot feed "
            f"{process_count} hosts; prepare it with at least that many shards"
        )
    source = _source(host_shards, inp.skip_corrupt)
    records = (
        grain.MapDataset.source(source)
        .seed(_stream_seed(config.seed, dataset_id, process_index))
        .shuffle()
        .repeat()
        .map(ParseRecord(inp.skip_corrupt))
    )
    transform = TrainTransform(config, dataset_id, on_device)
    if not inp.class_balance:
        return records.random_map(transform).to_iter_dataset(_read_options(config)), len(source)
    real, fake = _class_counts(data_dir, inp.train_split)
    if not real or not fake:
        raise ValueError(
            f"{data_dir}: input.class_balance needs both classes in split {inp.train_split!r}, "
            f"found {real} real and {fake} fake frames"
        )
    by_label = [
        records.filter(LabelIs(label)).random_map(transform).to_iter_dataset(_read_options(config))
        for label in (0, 1)
    ]
    return grain.IterDataset.mix(by_label, [1, 1]), len(source)


def train_dataset(
    config: ConfigDict,
    data_dirs: Sequence[str] | None = None,
    *,
    process_index: int = 0,
    process_count: int = 1,
    platform: str | None = None,
) -> grain.IterDataset:
    """This host's endless stream of training batches as numpy (the benchmarked pipeline).

    Batches hold `image` uint8 [b, H, W, 3] (H = W = config.model.image_size), `label` int32
    [b] (0 real, 1 fake) and `dataset_id` int32 [b] (index into `data_dirs`), with
    b = config.train.batch_size / process_count; with on-device augmentation also the
    `aug_*` fields of `device_augment.PARAM_DTYPES`. `data_dirs` defaults to
    config.input.train_dirs; they are mixed by config.input.weights. `platform` is that of
    the devices the batches feed (default: JAX's default backend): with
    `input.augment.on_device` "auto" it decides where flip, blur and brightness/contrast run.
    """
    inp = config.input
    on_device = augment.on_device(inp.augment, platform or jax.default_backend())
    data_dirs = list(data_dirs or inp.train_dirs)
    if not data_dirs:
        raise ValueError("no training data: pass data_dirs or set config.input.train_dirs")
    if inp.weights and (len(inp.weights) != len(data_dirs) or min(inp.weights) <= 0):
        raise ValueError(
            f"config.input.weights={tuple(inp.weights)} needs one positive weight per train "
            f"dir ({len(data_dirs)})"
        )
    local_batch = per_host_batch(config.train.batch_size, process_count)
    streams, sizes = zip(
        *(
            _dataset_stream(config, d, k, process_index, process_count, on_device)
            for k, d in enumerate(data_dirs)
        ),
        strict=True,
    )
    weights = list(inp.weights) or list(sizes)
    ds = streams[0] if len(streams) == 1 else grain.IterDataset.mix(list(streams), weights)
    ds = ds.batch(local_batch, drop_remainder=True)
    if inp.workers > 0:
        # grain's workers read absl flags; outside an absl app nothing else parses them.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=inp.workers))
    # Stacking a batch takes milliseconds: done ahead, off the training loop's thread.
    return grain.experimental.ThreadPrefetchIterDataset(
        ds, prefetch_buffer_size=inp.prefetch_batches
    )


def to_global(batch: dict[str, np.ndarray], mesh: Mesh, normalized: bool = True
              ) -> dict[str, jax.Array]:
    """Host-local numpy batch -> global arrays split over the mesh's batch axes.

    Images cross to the device as uint8, a quarter of the bytes of float32, and are
    normalized there (`normalized=False` leaves them uint8: the train step augments first).
    """
    batch_sharding = sharding.batch_sharding(mesh)
    out = {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in batch.items()}
    if normalized:
        out["image"] = normalize(out["image"])
    return out


def _close_and_drop(holder: list) -> None:
    if holder:
        holder.pop().close()


class TrainIterator:
    """Global training batches; `get_state()`/`set_state()` resume exactly.

    Yields dicts of global `jax.Array`s: `image` float32 [B, H, W, 3] in [-1, 1], `label`
    int32 [B], `dataset_id` int32 [B], B = config.train.batch_size (with on-device
    augmentation: `image` uint8 and the `aug_*` fields, for the train step). Each host has its own
    state; `grain.checkpoint.CheckpointSave(iterator)` / `CheckpointRestore(iterator)` store
    it in an Orbax checkpoint (one JSON file per process). Restore into a fresh iterator
    built with the same config and data: the next batch is the one the saved run was due.
    """

    def __init__(self, dataset: grain.IterDataset, mesh: Mesh, normalized: bool = True):
        self._holder = [iter(dataset)]
        self._mesh = mesh
        self._normalized = normalized
        # Closes and drops the grain iterator at exit too, while the interpreter is whole
        # (grain's own cleanup fails once modules are being torn down).
        self._close = weakref.finalize(self, _close_and_drop, self._holder)

    @property
    def _iterator(self) -> grain.DatasetIterator:
        if not self._holder:
            raise RuntimeError("the iterator is closed")
        return self._holder[0]

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        return to_global(next(self._iterator), self._mesh, self._normalized)

    def get_state(self) -> bytes:
        """This host's position as JSON bytes (the `grain.DataLoaderIterator` convention)."""
        return json.dumps(self._iterator.get_state()).encode()

    def set_state(self, state: bytes) -> None:
        self._iterator.set_state(json.loads(state))

    def start_prefetch(self) -> None:
        """Starts reading ahead before the first `next` (grain's checkpoint restore calls it)."""
        self._iterator.start_prefetch()

    def close(self) -> None:
        """Stops grain's prefetch threads and worker processes."""
        self._close()


def make_train_iterator(
    config: ConfigDict,
    mesh: Mesh,
    data_dirs: Sequence[str] | None = None,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> TrainIterator:
    """The training input: `train_dataset` of this host, assembled into global arrays."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    _check_divides(config.train.batch_size, mesh)
    platform = sharding.platform(mesh)
    dataset = train_dataset(config, data_dirs, process_index=process_index,
                            process_count=process_count, platform=platform)
    on_device = augment.on_device(config.input.augment, platform)
    return TrainIterator(dataset, mesh, normalized=not on_device)


# ----------------------------------------------------------------------------- eval


def host_range(num_records: int, process_index: int, process_count: int) -> tuple[int, int]:
    """The contiguous [start, stop) records of one host; sizes differ by at most one."""
    base, extra = divmod(num_records, process_count)
    start = process_index * base + min(process_index, extra)
    return start, start + base + (process_index < extra)


def _pad_batch(examples: list[dict], size: int, image_size: int) -> dict[str, np.ndarray]:
    """Stacks examples and pads to `size` rows with `mask=False` (zeros, empty strings)."""
    pad = size - len(examples)
    batch = {
        "image": np.zeros((size, image_size, image_size, 3), np.uint8),
        "label": np.zeros(size, np.int32),
        "frame_index": np.full(size, -1, np.int64),
        "mask": np.arange(size) < len(examples),
    }
    for i, example in enumerate(examples):
        batch["image"][i] = example["image"]
        batch["label"][i] = example["label"]
        batch["frame_index"][i] = example["frame_index"]
    for name in METADATA_FIELDS:
        batch[name] = np.array([e[name] for e in examples] + [""] * pad, dtype=object)
    return batch


def eval_batches(
    config: ConfigDict,
    data_dir: str | None = None,
    split: str | None = None,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """This host's evaluation batches as numpy; across hosts, every record exactly once.

    Every host yields the same number of batches (the collective eval step needs it), each
    of b = eval batch / process_count rows: `image` uint8, `label` int32, `mask` bool
    (False on padding), `frame_index` int64 and `video_id`, `method`, `dataset` (object
    arrays of str). Defaults: `config.eval_data_dir` and config.input.eval_split.
    """
    inp = config.input
    data_dir = data_dir or config_lib.eval_data_dir(config)
    if not data_dir:
        raise ValueError("no evaluation data: pass data_dir or set config.input.eval_dir")
    split = split or inp.eval_split
    local_batch = per_host_batch(inp.eval_batch_size or config.train.batch_size, process_count)
    source = _source(split_shards(data_dir, split), inp.skip_corrupt)
    start, stop = host_range(len(source), process_index, process_count)
    num_batches = math.ceil(math.ceil(len(source) / process_count) / local_batch)
    examples = iter(
        grain.MapDataset.source(source)[start:stop]
        .map(ParseRecord(inp.skip_corrupt))
        .map(EvalTransform(config.model.image_size, inp.skip_corrupt))
        .to_iter_dataset(_read_options(config))
    )
    for _ in range(num_batches):
        chunk = list(itertools.islice(examples, local_batch))
        yield _pad_batch(chunk, local_batch, config.model.image_size)


def make_eval_iterator(
    config: ConfigDict,
    mesh: Mesh,
    data_dir: str | None = None,
    split: str | None = None,
) -> Iterator[dict]:
    """Evaluation batches: global arrays for the eval step plus this host's metadata.

    Yields {"image": float32 [B, H, W, 3] in [-1, 1], "label": int32 [B], "mask": bool [B]}
    as global arrays and "meta": this host's rows as numpy (`label`, `mask`, `frame_index`,
    `video_id`, `method`, `dataset`), in the order of the host's addressable part of the
    batch, for frame- and video-level metrics.
    """
    _check_divides(config.input.eval_batch_size or config.train.batch_size, mesh)
    batches = eval_batches(
        config,
        data_dir,
        split,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    for batch in batches:
        device = to_global({k: batch[k] for k in ("image", "label", "mask")}, mesh)
        meta = {k: v for k, v in batch.items() if k != "image"}
        yield {**device, "meta": meta}


# ----------------------------------------------------------------------------- reference


def tf_data_reference(
    config: ConfigDict,
    data_dirs: Sequence[str] | None = None,
    *,
    process_index: int = 0,
    process_count: int = 1,
):
    """The same training work as `train_dataset`, written as a tuned tf.data pipeline.

    For the benchmark only: shards interleaved in parallel, a 1024-record shuffle buffer,
    parse, PNG decode, resize, the same augmentations with the same probabilities in
    TensorFlow ops, mixing by weight and class balance by `sample_from_datasets`, batches of
    uint8 `image` and int32 `label`. Self-blending has no TensorFlow version: run both with
    config.input.sbi.prob = 0.
    """
    import tensorflow as tf

    inp, aug = config.input, config.input.augment
    data_dirs = list(data_dirs or inp.train_dirs)
    size = config.model.image_size
    autotune = tf.data.AUTOTUNE
    spec = {
        "image": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([], tf.int64),
    }

    def records(files: list[str]) -> tf.data.Dataset:
        return (
            tf.data.Dataset.from_tensor_slices(files)
            .shuffle(len(files), seed=config.seed)
            .repeat()
            .interleave(
                tf.data.TFRecordDataset,
                cycle_length=min(len(files), 8),
                num_parallel_calls=autotune,
                deterministic=False,
            )
            .shuffle(1024, seed=config.seed)
            .map(lambda r: tf.io.parse_single_example(r, spec), num_parallel_calls=autotune)
        )

    def chance(prob: float) -> tf.Tensor:
        return tf.random.uniform([]) < prob

    def blur(image: tf.Tensor) -> tf.Tensor:
        kernels = range(aug.blur_kernel[0] | 1, aug.blur_kernel[1] + 1, 2)

        def blur_k(k: int):
            sigma = 0.3 * ((k - 1) * 0.5 - 1) + 0.8  # OpenCV's sigma for a k x k kernel.
            g = tf.exp(-0.5 * (tf.range(k, dtype=tf.float32) - (k - 1) / 2) ** 2 / sigma**2)
            g = g / tf.reduce_sum(g)
            kernel = tf.tile((g[:, None] * g[None, :])[:, :, None, None], [1, 1, 3, 1])
            return lambda: tf.nn.depthwise_conv2d(image[None], kernel, [1] * 4, "SAME")[0]

        branches = [blur_k(k) for k in kernels]
        return tf.switch_case(tf.random.uniform([], 0, len(branches), tf.int32), branches)

    def example(record: dict) -> dict:
        image = tf.io.decode_png(record["image"], channels=3)
        image = tf.image.resize(image, [size, size], method="area")
        image = tf.cond(
            chance(aug.flip_prob), lambda: tf.image.flip_left_right(image), lambda: image
        )
        image = tf.cond(chance(aug.blur_prob), lambda: blur(image), lambda: image)

        def brightness_contrast():
            c = tf.random.uniform([], -aug.contrast_limit, aug.contrast_limit)
            b = tf.random.uniform([], -aug.brightness_limit, aug.brightness_limit)
            return image * (1 + c) + 255 * b

        image = tf.cond(chance(aug.brightness_contrast_prob), brightness_contrast, lambda: image)
        image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
        quality = tf.random.uniform([], aug.jpeg_quality[0], aug.jpeg_quality[1] + 1, tf.int32)
        image = tf.cond(
            chance(aug.jpeg_prob),
            lambda: tf.image.adjust_jpeg_quality(image, quality),
            lambda: image,
        )
        image = tf.ensure_shape(image, [size, size, 3])
        return {"image": image, "label": tf.cast(record["label"], tf.int32)}

    streams, sizes = [], []
    for data_dir in data_dirs:
        shards = split_shards(data_dir, inp.train_split)[process_index::process_count]
        ds = records([path for path, _ in shards])
        if inp.class_balance:
            by_label = [ds.filter(lambda r, c=c: r["label"] == c) for c in (0, 1)]
            ds = tf.data.Dataset.sample_from_datasets(by_label, [0.5, 0.5], seed=config.seed)
        streams.append(ds)
        sizes.append(sum(count for _, count in shards))
    weights = np.asarray(list(inp.weights) or sizes, np.float64)
    ds = tf.data.Dataset.sample_from_datasets(streams, list(weights / weights.sum()))
    return (
        ds.map(example, num_parallel_calls=autotune, deterministic=False)
        .batch(per_host_batch(config.train.batch_size, process_count), drop_remainder=True)
        .prefetch(autotune)
    )
