"""The evaluation stream: every record of a split exactly once across hosts, unaugmented.

Each host reads a contiguous range of the split's records, decodes and resizes them
(area/cubic, nothing random) and pads its last batches with `mask=False` rows, so every host
runs the same number of collective eval steps.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import grain
import jax
import numpy as np
from jax.sharding import Mesh
from ml_collections import ConfigDict

from cae_jax import augment, perturb, prepared_data
from cae_jax import config as config_lib
from cae_jax.input_pipeline import check_divides, per_host_batch, to_global
from cae_jax.prepared_data import METADATA_FIELDS


class EvalTransform(grain.transforms.Map):
    """Decode, optionally perturb the stored crop (perturb.py, deterministic per face), and
    resize (area/cubic): one evaluation example."""

    def __init__(self, image_size: int, skip_corrupt: bool,
                 perturbation: perturb.Perturbation | None = None):
        self.image_size = image_size
        self.skip_corrupt = skip_corrupt
        self.perturbation = perturbation

    def map(self, record: dict) -> dict | None:
        image = prepared_data.decode_or_skip(record, self.skip_corrupt)
        if image is None:
            return None
        example = {k: record[k] for k in (*METADATA_FIELDS, "frame_index", "label")}
        if self.perturbation is not None:
            image = perturb.apply(image, self.perturbation, example)
        return {**example, "image": augment.isotropic_resize(image, self.image_size)}


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
    perturbation: perturb.Perturbation | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """This host's evaluation batches as numpy; across hosts, every record exactly once.

    Every host yields the same number of batches (the collective eval step needs it), each
    of b = eval batch / process_count rows: `image` uint8, `label` int32, `mask` bool
    (False on padding), `frame_index` int64 and `video_id`, `method`, `dataset` (object
    arrays of str). Defaults: `config.eval_data_dir` and config.input.eval_split. With
    `perturbation`, every stored crop is perturbed before the resize.
    """
    input_config = config.input
    data_dir = data_dir or config_lib.eval_data_dir(config)
    if not data_dir:
        raise ValueError("no evaluation data: pass data_dir or set config.input.eval_dir")
    split = split or input_config.eval_split
    local_batch = per_host_batch(input_config.eval_batch_size or config.train.batch_size,
                                 process_count)
    source = prepared_data.source(prepared_data.split_shards(data_dir, split),
                                  input_config.skip_corrupt)
    start, stop = host_range(len(source), process_index, process_count)
    num_batches = math.ceil(math.ceil(len(source) / process_count) / local_batch)
    examples = iter(
        grain.MapDataset.source(source)[start:stop]
        .map(prepared_data.ParseRecord(input_config.skip_corrupt))
        .map(EvalTransform(config.model.image_size, input_config.skip_corrupt, perturbation))
        .to_iter_dataset(prepared_data.read_options(config))
    )
    for _ in range(num_batches):
        chunk = list(itertools.islice(examples, local_batch))
        yield _pad_batch(chunk, local_batch, config.model.image_size)


def make_eval_iterator(
    config: ConfigDict,
    mesh: Mesh,
    data_dir: str | None = None,
    split: str | None = None,
    perturbation: perturb.Perturbation | None = None,
) -> Iterator[dict]:
    """Evaluation batches: global arrays for the eval step plus this host's metadata.

    Yields {"image": float32 [B, H, W, 3] in [-1, 1], "label": int32 [B], "mask": bool [B]}
    as global arrays and "meta": this host's rows as numpy (`label`, `mask`, `frame_index`,
    `video_id`, `method`, `dataset`), in the order of the host's addressable part of the
    batch, for frame- and video-level metrics.
    """
    check_divides(config.input.eval_batch_size or config.train.batch_size, mesh)
    batches = eval_batches(
        config,
        data_dir,
        split,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        perturbation=perturbation,
    )
    for batch in batches:
        device = to_global({k: batch[k] for k in ("image", "label", "mask")}, mesh)
        meta = {k: v for k, v in batch.items() if k != "image"}
        yield {**device, "meta": meta}
