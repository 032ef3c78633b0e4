"""Input-pipeline rows: grain beside tf.data, the host's CPU cost per image, worker counts.

TensorFlow and grain load inside the rows only: `cli` imports this module on the GPU image too,
which has neither.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import cv2
import numpy as np
from ml_collections import ConfigDict

from cae_jax.bench import timing


def write_face_dataset(out_dir: Path, size: int, records: int) -> Path:
    """A prepared dataset dir of distinct real face crops (skimage's astronaut, no download)."""
    from skimage import data

    from data_prep import writer

    photo = data.astronaut()

    def examples():
        for i in range(records):
            y, x = 20 + (i * 7) % 120, 100 + (i * 13) % 140
            crop = cv2.resize(photo[y : y + 200, x : x + 200], (size, size))
            yield {"image": crop, "label": i % 2, "dataset": "bench",
                   "method": "fake" if i % 2 else "real", "compression": "raw",
                   "video_id": f"v{i // 4:03d}", "frame_index": i,
                   "face_box": np.array([0, 0, size, size], np.float32), "fps": 25.0}

    return writer.write_dataset(out_dir, "bench", {"train": examples()}, num_shards=2)


def input_pipeline(config: ConfigDict, data_dir: Path, batches: int, repeats: int) -> dict:
    """Training images/s per core: grain (`train_dataset`) and tf.data (`tf_data_reference`)."""
    from cae_jax import input_pipeline as pipeline
    from cae_jax.bench.tf_data_reference import tf_data_reference

    config = ConfigDict(config.to_dict())
    config.input.sbi.prob = 0.0  # tf.data has no self-blending; both do the same work.
    config.input.augment.on_device = "off"  # tf.data augments on the host.
    batch = config.train.batch_size
    result = {}
    for name, make in (("grain", lambda: iter(pipeline.train_dataset(config, [str(data_dir)]))),
                       ("tf.data", lambda: iter(tf_data_reference(
                           config, [str(data_dir)]).as_numpy_iterator()))):
        it = make()
        next(it)  # Threads started, first shards open.
        seconds = timing.median_seconds(lambda it=it: [next(it) for _ in range(batches)],
                                        repeats, 0)
        result[name] = {"images_per_s_per_core": batches * batch / seconds / timing.cores()}
        close = getattr(it, "close", None)
        if close:
            close()
    return result


def host_seconds_per_image(config: ConfigDict, data_dir: Path, batches: int, on_device: bool
                           ) -> float:
    """Host CPU seconds per training image of `train_dataset` (decode, augment, batch).

    Process CPU time (every thread) over `batches` batches after a warm-up batch, one reader
    thread, so read-ahead adds no work outside the window beyond its few buffered records.
    `on_device`: the host only decodes, resizes and JPEG-recompresses; the train step does
    the rest.
    """
    from cae_jax import input_pipeline as pipeline

    config = ConfigDict(config.to_dict())
    config.input.augment.on_device = "on" if on_device else "off"
    config.input.update(threads=1, buffer=2, prefetch_batches=1, workers=0)
    it = iter(pipeline.train_dataset(config, [str(data_dir)]))
    next(it)
    start = time.process_time()
    for _ in range(batches):
        next(it)
    seconds = time.process_time() - start
    it.close()
    return seconds / (batches * config.train.batch_size)


def host_cores(seconds_per_image: float, images_per_s: float = 2000.0) -> float:
    """Host cores one accelerator needs to be fed `images_per_s` training images."""
    return seconds_per_image * images_per_s


def host_cost(config: ConfigDict, data_dir: Path, batches: int, repeats: int) -> dict:
    """`host_seconds_per_image` with host and with on-device augmentation, taking turns."""
    runs = {"host": [], "on_device": []}
    for _ in range(repeats):
        for mode, values in runs.items():
            values.append(host_seconds_per_image(config, data_dir, batches, mode == "on_device"))
    return {mode: {"cpu_s_per_image": statistics.median(v)} for mode, v in runs.items()}


def input_workers(config: ConfigDict, data_dir: Path, batches: int, repeats: int,
                  counts: tuple[int, ...]) -> dict:
    """Training images/s of `train_dataset` with each grain worker-process count."""
    from cae_jax import input_pipeline as pipeline

    result = {}
    for workers in counts:
        config = ConfigDict(config.to_dict())
        config.input.workers = workers
        config.input.augment.on_device = "off"
        it = iter(pipeline.train_dataset(config, [str(data_dir)]))
        next(it)  # Workers started.
        seconds = timing.median_seconds(lambda it=it: [next(it) for _ in range(batches)],
                                        repeats, 0)
        result[str(workers)] = {"images_per_s": batches * config.train.batch_size / seconds}
        it.close()
    return result
