"""TensorBoard event files of scalars and images, written without TensorFlow.

An event file is a TFRecord of `Event` protos (tensorboard's own copies of them): a version
record, then one `Summary` per write. Scalars are `simple_value`s and images PNG-encoded
`Summary.Image`s, which TensorBoard shows in its scalars and images tabs. Importing
TensorFlow for `tf.summary` cost every training process seconds and, on hosts with its GPU
build, the accelerator.
"""

from __future__ import annotations

import os
import socket
import time
import uuid

import cv2
import numpy as np
from etils import epath
from tensorboard.compat.proto import event_pb2, summary_pb2

from cae_jax import tfrecord


class SummaryWriter:
    """Writes events to a new file in `logdir`; each write reaches the file at once."""

    def __init__(self, logdir: str | os.PathLike):
        logdir = epath.Path(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        # TensorBoard reads every file named *tfevents*; the uid keeps two writers of one
        # process and second (a run resumed at once) from sharing a file.
        name = (f"events.out.tfevents.{time.time():.0f}.{socket.gethostname()}.{os.getpid()}."
                f"{uuid.uuid4().hex[:8]}")
        self._file = (logdir / name).open("wb")
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _write(self, event: event_pb2.Event) -> None:
        self._file.write(tfrecord.frame(event.SerializeToString()))
        self._file.flush()

    def _summary(self, step: int, *values: summary_pb2.Summary.Value) -> None:
        self._write(event_pb2.Event(wall_time=time.time(), step=step,
                                    summary=summary_pb2.Summary(value=values)))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._summary(step, *(summary_pb2.Summary.Value(tag=tag, simple_value=float(value))
                              for tag, value in values.items()))

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        """`image`: uint8 [H, W, 3] RGB."""
        ok, png = cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]))
        if not ok:
            raise ValueError(f"{tag}: image of shape {image.shape} does not encode as PNG")
        height, width, channels = image.shape
        self._summary(step, summary_pb2.Summary.Value(tag=tag, image=summary_pb2.Summary.Image(
            height=height, width=width, colorspace=channels, encoded_image_string=png.tobytes())))

    def close(self) -> None:
        self._file.close()
