"""The training stream: prepared TFRecord shards -> augmented global batches, with grain.

Per host: the host's shards of each dataset (shards dealt round-robin by process
index) are indexed record by record (`cae_jax.tfrecord`), shuffled globally and freshly each
epoch, parsed, decoded, resized, augmented (optionally turned into self-blended fakes), mixed
across datasets by weight, batched to the per-host batch and assembled into global
`jax.Array`s sharded over the mesh. Shuffling record indices (not a window of a stream)
makes reads hop between files, and makes the iterator state a handful of counters: a resumed
run produces exactly the batches an uninterrupted run would have.

Evaluation has its own stream (`eval_pipeline.py`); both read records with `prepared_data.py`.

Every random choice derives from `config.seed`, the dataset, the host and the record's
position in the stream, so a run is reproducible. grain workers each batch their own slice
of the stream: a given worker count always gives the same batches (0 and 1 the same ones).
"""

from __future__ import annotations

import json
import threading
import types
import weakref
from collections.abc import Sequence

import grain
import jax
import numpy as np
from absl import flags
from jax.sharding import Mesh
from ml_collections import ConfigDict

from cae_jax import augment, device_augment, prepared_data, sbi, sharding


def per_host_batch(global_batch: int, process_count: int) -> int:
    if global_batch % process_count:
        raise ValueError(f"batch size {global_batch} is not divisible by {process_count} hosts")
    return global_batch // process_count


def check_divides(global_batch: int, mesh: Mesh) -> None:
    """The batch is split over every device of the mesh, so their count must divide it."""
    if global_batch % mesh.size:
        raise ValueError(f"batch size {global_batch} is not divisible by the {mesh.size} devices")


class LabelIs(grain.transforms.Filter):
    def __init__(self, label: int):
        self.label = label

    def filter(self, record: dict) -> bool:
        return record["label"] == self.label


class TrainTransform(grain.transforms.RandomMap):
    """Decode, resize, maybe self-blend a real face, augment: one training example.

    With `input.augment.on_device` only decoding, downscaling, self-blending and the JPEG step
    run here: a crop no larger than `model.image_size` that is not self-blended travels
    top-left in a zero canvas, for the train step to upscale. Every choice, drawn from the
    same generator in the same order as without the option, travels as `aug_*` fields.
    """

    def __init__(self, config: ConfigDict, dataset_id: int, on_device: bool):
        self.image_size = config.model.image_size
        self.skip_corrupt = config.input.skip_corrupt
        self.sbi_prob = config.input.sbi.prob
        # A plain copy: a ConfigDict field read goes through its item and field-reference
        # lookup, far slower than an attribute, and each record takes a dozen of them.
        self.augment = types.SimpleNamespace(**config.input.augment.to_dict())
        self.dataset_id = dataset_id
        self.on_device = on_device

    def random_map(self, record: dict, rng: np.random.Generator) -> dict | None:
        image = prepared_data.decode_or_skip(record, self.skip_corrupt)
        if image is None:
            return None
        interpolations = augment.draw_interpolations(rng, self.augment.resize_prob)
        label = record["label"]
        blend = label == 0 and rng.random() < self.sbi_prob
        # Self-blending places its mask where the face sits at the final size.
        if not self.on_device or blend or max(image.shape[:2]) > self.image_size:
            image = augment.isotropic_resize(image, self.image_size, interpolations)
        if blend:
            image, _ = sbi.self_blend(image, rng)
            label = 1
        params = augment.draw(rng, self.augment)
        image = augment.apply(image, params, geometric_and_colour=not self.on_device)
        example = {"label": np.int32(label), "dataset_id": np.int32(self.dataset_id)}
        if self.on_device:
            image, resize = device_augment.place(image, self.image_size, interpolations)
            example.update(device_augment.param_fields({**params, **resize}))
        return {"image": image, **example}


class EpochShuffle(grain.MapDataset):
    """The parent's records in a fresh order each epoch (index // len), from (seed, epoch).

    Replaces grain's `shuffle`, whose per-index cipher walk costs about 40,000 / len
    microseconds per record: 0.6 ms at 64 records, 47 us at 1,000, 5 us at a million. Here
    each epoch's order is one numpy permutation (milliseconds per million records), and a
    record costs a lookup. The last two epochs' orders are kept: reader threads straddle an
    epoch boundary.
    """

    def __init__(self, parent: grain.MapDataset, seed: int):
        super().__init__(parent)
        self._seed = seed
        self._orders: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._parent)

    def __str__(self) -> str:
        return f"EpochShuffle(seed={self._seed})"

    def __getstate__(self) -> dict:
        # grain pickles the dataset into its worker processes; each builds its own orders.
        return {**self.__dict__, "_orders": {}, "_lock": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def _order(self, epoch: int) -> np.ndarray:
        with self._lock:
            order = self._orders.get(epoch)
            if order is None:
                rng = np.random.default_rng([self._seed, epoch])
                order = rng.permutation(len(self._parent))
                self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}
                self._orders[epoch] = order
            return order

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, position = divmod(index, len(self._parent))
        return self._parent[int(self._order(epoch)[position])]


# ----------------------------------------------------------------------------- train


def _stream_seed(seed: int, dataset_id: int, process_index: int) -> int:
    """A distinct 32-bit seed per (run seed, dataset, host)."""
    return int(np.random.SeedSequence([seed, dataset_id, process_index]).generate_state(1)[0])


def _dataset_stream(
    config: ConfigDict, data_dir: str, dataset_id: int, process_index: int, process_count: int,
    on_device: bool,
) -> tuple[grain.IterDataset, int]:
    """An endless stream of training examples of one dataset on one host, and its size."""
    input_config = config.input
    shards = prepared_data.split_shards(data_dir, input_config.train_split)
    host_shards = shards[process_index::process_count]
    if not host_shards:
        raise ValueError(
            f"{data_dir}: {len(shards)} shards of split {input_config.train_split!r} cannot feed "
            f"{process_count} hosts; prepare it with at least that many shards"
        )
    source = prepared_data.source(host_shards, input_config.skip_corrupt)
    seed = _stream_seed(config.seed, dataset_id, process_index)
    records = (
        EpochShuffle(grain.MapDataset.source(source).seed(seed), seed)
        .repeat()
        .map(prepared_data.ParseRecord(input_config.skip_corrupt))
    )
    transform = TrainTransform(config, dataset_id, on_device)
    read_options = prepared_data.read_options(config)
    if not input_config.class_balance:
        return records.random_map(transform).to_iter_dataset(read_options), len(source)
    real, fake = prepared_data.class_counts(data_dir, input_config.train_split)
    if not real or not fake:
        raise ValueError(
            f"{data_dir}: input.class_balance needs both classes in split "
            f"{input_config.train_split!r}, "
            f"found {real} real and {fake} fake frames"
        )
    by_label = [
        records.filter(LabelIs(label)).random_map(transform).to_iter_dataset(read_options)
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
    `input.augment.on_device` "auto" it decides where upscaling, flip, blur and
    brightness/contrast run.
    """
    input_config = config.input
    on_device = augment.on_device(input_config.augment, platform or jax.default_backend())
    data_dirs = list(data_dirs or input_config.train_dirs)
    if not data_dirs:
        raise ValueError("no training data: pass data_dirs or set config.input.train_dirs")
    weights = tuple(input_config.weights)
    if weights and (len(weights) != len(data_dirs) or min(weights) <= 0):
        raise ValueError(
            f"config.input.weights={weights} needs one positive weight per train dir "
            f"({len(data_dirs)})"
        )
    local_batch = per_host_batch(config.train.batch_size, process_count)
    streams, sizes = zip(
        *(
            _dataset_stream(config, d, k, process_index, process_count, on_device)
            for k, d in enumerate(data_dirs)
        ),
        strict=True,
    )
    mix_weights = list(weights) or list(sizes)
    ds = streams[0] if len(streams) == 1 else grain.IterDataset.mix(list(streams), mix_weights)
    ds = ds.batch(local_batch, drop_remainder=True)
    if input_config.workers > 0:
        # grain's workers read absl flags; outside an absl app nothing else parses them.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=input_config.workers))
    # Stacking a batch takes milliseconds: done ahead, off the training loop's thread.
    return grain.experimental.ThreadPrefetchIterDataset(
        ds, prefetch_buffer_size=input_config.prefetch_batches
    )


def to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Host-local numpy batch -> global arrays split over the mesh's batch axes.

    Images cross to the device as uint8, a quarter of the bytes of float32: the model
    normalizes them (`models.CAE`).
    """
    batch_sharding = sharding.batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(batch_sharding, v)
            for k, v in batch.items()}


def _close_and_drop(holder: list) -> None:
    if holder:
        holder.pop().close()


class TrainIterator:
    """Global training batches; `get_state()`/`set_state()` resume exactly.

    Yields dicts of global `jax.Array`s: `image` uint8 [B, H, W, 3], `label` int32 [B],
    `dataset_id` int32 [B], B = config.train.batch_size (with on-device augmentation also the
    `aug_*` fields, for the train step). Each host has its own
    state; `grain.checkpoint.CheckpointSave(iterator)` / `CheckpointRestore(iterator)` store
    it in an Orbax checkpoint (one JSON file per process). Restore into a fresh iterator
    built with the same config and data: the next batch is the one the saved run was due.
    """

    def __init__(self, dataset: grain.IterDataset, mesh: Mesh):
        self._holder = [iter(dataset)]
        self._mesh = mesh
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
        return to_global(next(self._iterator), self._mesh)

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
    check_divides(config.train.batch_size, mesh)
    platform = sharding.platform(mesh)
    dataset = train_dataset(config, data_dirs, process_index=process_index,
                            process_count=process_count, platform=platform)
    return TrainIterator(dataset, mesh)
