"""The benchmark's tf.data peer: `train_dataset`'s training work written as tf.data."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf
from ml_collections import ConfigDict

from cae_jax.input_pipeline import per_host_batch
from cae_jax.prepared_data import split_shards


def tf_data_reference(
    config: ConfigDict,
    data_dirs: Sequence[str] | None = None,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> tf.data.Dataset:
    """The same training work as `train_dataset`, written as a tuned tf.data pipeline.

    For the benchmark only: shards interleaved in parallel, a 1024-record shuffle buffer,
    parse, PNG decode, resize, the same augmentations with the same probabilities in
    TensorFlow ops, mixing by weight and class balance by `sample_from_datasets`, batches of
    uint8 `image` and int32 `label`. Self-blending has no TensorFlow version: run both with
    config.input.sbi.prob = 0.
    """
    input_config, augment_config = config.input, config.input.augment
    data_dirs = list(data_dirs or input_config.train_dirs)
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
        kernels = range(augment_config.blur_kernel[0] | 1, augment_config.blur_kernel[1] + 1, 2)

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
            chance(augment_config.flip_prob), lambda: tf.image.flip_left_right(image), lambda: image
        )
        image = tf.cond(chance(augment_config.blur_prob), lambda: blur(image), lambda: image)

        def brightness_contrast():
            contrast, brightness = augment_config.contrast_limit, augment_config.brightness_limit
            c = tf.random.uniform([], -contrast, contrast)
            b = tf.random.uniform([], -brightness, brightness)
            return image * (1 + c) + 255 * b

        image = tf.cond(chance(augment_config.brightness_contrast_prob), brightness_contrast,
                        lambda: image)
        image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
        low, high = augment_config.jpeg_quality
        quality = tf.random.uniform([], low, high + 1, tf.int32)
        image = tf.cond(
            chance(augment_config.jpeg_prob),
            lambda: tf.image.adjust_jpeg_quality(image, quality),
            lambda: image,
        )
        image = tf.ensure_shape(image, [size, size, 3])
        return {"image": image, "label": tf.cast(record["label"], tf.int32)}

    streams, sizes = [], []
    for data_dir in data_dirs:
        shards = split_shards(data_dir, input_config.train_split)[process_index::process_count]
        ds = records([path for path, _ in shards])
        if input_config.class_balance:
            by_label = [ds.filter(lambda r, c=c: r["label"] == c) for c in (0, 1)]
            ds = tf.data.Dataset.sample_from_datasets(by_label, [0.5, 0.5], seed=config.seed)
        streams.append(ds)
        sizes.append(sum(count for _, count in shards))
    weights = np.asarray(list(input_config.weights) or sizes, np.float64)
    ds = tf.data.Dataset.sample_from_datasets(streams, list(weights / weights.sum()))
    return (
        ds.map(example, num_parallel_calls=autotune, deterministic=False)
        .batch(per_host_batch(config.train.batch_size, process_count), drop_remainder=True)
        .prefetch(autotune)
    )
