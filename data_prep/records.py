"""The face-crop record: one `tf.train.Example` per face crop, written by `cae-jax prepare`.

The schema is a TFDS `FeaturesDict`, so a prepared dataset directory loads with
`tfds.builder_from_directory` and its records parse with the same definition here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import example_serializer

LABEL_NAMES = ("real", "fake")  # label 0 = real, 1 = fake.


def features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "label": tfds.features.ClassLabel(names=LABEL_NAMES),
            "dataset": tfds.features.Text(),  # e.g. "ffpp", "celebdf", "demo".
            "method": tfds.features.Text(),  # "real" for pristine, else e.g. "Deepfakes".
            "compression": tfds.features.Text(),  # "c0", "c23", "c40" or "".
            "video_id": tfds.features.Text(),  # Path relative to the dataset root: unique.
            "frame_index": np.int64,  # Frame number within the video (0 for images).
            "face_box": tfds.features.Tensor(shape=(4,), dtype=np.float32),  # x0,y0,x1,y1 px.
            "fps": np.float32,  # Source frame rate (0 for images).
        }
    )


def serializer() -> Callable[[Mapping], bytes]:
    """Example dict -> `tf.train.Example` bytes, the same in every process.

    `FeaturesDict.serialize_example` writes the feature map in protobuf's hash order, which
    varies from process to process; deterministic serialization sorts it, so a resumed run
    writes the very bytes of an uninterrupted one.
    """
    spec = features()
    to_proto = example_serializer.ExampleSerializer(spec.get_serialized_info()).get_tf_example
    return lambda example: to_proto(spec.encode_example(example)).SerializeToString(
        deterministic=True
    )
