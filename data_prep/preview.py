"""A grid of face crops framed by label: for eyeballing what a dataset holds or a model is fed."""

from __future__ import annotations

import math

import numpy as np

FRAME_COLOURS = ((0, 170, 0), (220, 0, 0))  # label 0 real (green), 1 fake (red).


def sample_grid(images: np.ndarray, labels: np.ndarray, columns: int = 8) -> np.ndarray:
    """A uint8 RGB grid of training images, framed green (real) or red (fake).

    For eyeballing what the model is fed (augmentation strength, SBI fakes): save it as a
    PNG or log it as a TensorBoard image.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    n, h, w, _ = images.shape
    rows = math.ceil(n / columns)
    border = max(1, h // 32)
    grid = np.full((rows * (h + 2 * border), columns * (w + 2 * border), 3), 255, np.uint8)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        y, x = (i // columns) * (h + 2 * border), (i % columns) * (w + 2 * border)
        grid[y : y + h + 2 * border, x : x + w + 2 * border] = FRAME_COLOURS[int(label)]
        grid[y + border : y + border + h, x + border : x + border + w] = image
    return grid
