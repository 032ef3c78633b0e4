"""Reconstruction-error heatmaps: where the autoencoder fails to reproduce a face.

The CAE learns to reconstruct faces; regions it reproduces badly are where the face departs
from what it learned, which is the model's own pointer to a manipulation.
"""

from __future__ import annotations

import cv2
import numpy as np

ALPHA = 0.5  # Weight of the colour map over the crop.
PERCENTILE = 99.0  # Error mapped to the hottest colour: robust to a few extreme pixels.


def error_scale(error_maps: np.ndarray) -> float:
    """One scale for all frames of an input, so their heatmaps compare with each other."""
    if error_maps.size == 0:
        return 1.0
    return max(float(np.percentile(error_maps, PERCENTILE)), 1e-6)


def overlay(crop: np.ndarray, error_map: np.ndarray, scale: float) -> np.ndarray:
    """uint8 RGB crop [S, S, 3] + error [S, S] -> uint8 RGB, JET colour map alpha-blended."""
    level = np.clip(error_map / scale, 0.0, 1.0)
    colours = cv2.applyColorMap((level * 255).astype(np.uint8), cv2.COLORMAP_JET)
    colours = cv2.cvtColor(colours, cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(crop, 1.0 - ALPHA, colours, ALPHA, 0.0)


def write_png(path, rgb: np.ndarray) -> None:
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"{path}: could not write PNG")
