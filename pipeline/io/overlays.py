"""CAM overlays written as PNG files (patent S4): the heat map of :func:`pipeline.core.cam.overlay`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.core.cam import overlay
from pipeline.io.images import save_png


def save_overlay_png(path: str | Path, image: np.ndarray, cam: np.ndarray, alpha: float) -> Path:
    """Write the CAM overlay of ``image`` (H, W, 3) uint8 with opacity ``alpha`` as a PNG."""
    return save_png(path, overlay(image, cam, alpha))
