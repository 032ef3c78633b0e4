"""The trainer's TensorBoard files, read back by TensorBoard's own event reader."""

import cv2
import numpy as np
from skimage import data
from tensorboard.backend.event_processing import event_accumulator

from cae_jax import tensorboard_writer


def test_scalars_and_images_read_back_in_tensorboard(tmp_path):
    writer = tensorboard_writer.SummaryWriter(tmp_path / "tb")
    writer.scalars(2, {"loss": 0.75, "val_auc": 0.5})
    writer.scalars(4, {"loss": 0.25})
    grid = data.astronaut()[:64, :96]
    writer.image(4, "reconstruction", grid)
    writer.close()
    tensorboard_writer.SummaryWriter(tmp_path / "tb").close()  # A resume: a file of its own.
    events, _ = sorted((tmp_path / "tb").glob("events.out.tfevents.*"),
                       key=lambda p: p.stat().st_size, reverse=True)

    log = event_accumulator.EventAccumulator(str(events), size_guidance={"images": 0})
    log.Reload()
    assert sorted(log.Tags()["scalars"]) == ["loss", "val_auc"]
    assert [(e.step, e.value) for e in log.Scalars("loss")] == [(2, 0.75), (4, 0.25)]
    assert [(e.step, e.value) for e in log.Scalars("val_auc")] == [(2, 0.5)]
    (image,) = log.Images("reconstruction")
    assert (image.step, image.height, image.width) == (4, 64, 96)
    decoded = cv2.imdecode(np.frombuffer(image.encoded_image_string, np.uint8),
                           cv2.IMREAD_COLOR_RGB)
    np.testing.assert_array_equal(decoded, grid)  # PNG: lossless, RGB order kept.
