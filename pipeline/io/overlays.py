"""CAM pictures for a person (patent S4): the heat map of :func:`pipeline.core.cam.overlay`, drawn
on the original image beside the plain image, with a caption.

:func:`explanation_panel` lays out one picture::

    +--------------------------------------------------------------+
    | predicted mel 0.83 | map: mel                      (caption) |
    +------------------------------+---+---------------------------+
    |  the image as it is          |gap|  the same image with the  |
    |  (original width x height)   |   |  CAM heat map over it     |
    +------------------------------+---+---------------------------+

Both halves keep the picture's own resolution (a 600x450 photo gives two 600x450 halves); the CAM
must already be at that size (:func:`pipeline.core.cam.cam_for` with ``size``; a map of another
size is resized bilinearly by :func:`~pipeline.core.cam.overlay`). The caption's font grows with
the picture; a picture too narrow for the caption is padded on the right with the background.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.core.cam import overlay
from pipeline.io.images import save_png

BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)


def caption(label: str, probability: float, cam_class: str) -> str:
    """The caption of a CAM picture: predicted label, its probability and the class the map is for."""
    return f"predicted {label} {probability:.2f} | map: {cam_class}"


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def explanation_panel(image: np.ndarray, cam: np.ndarray, alpha: float, text: str) -> np.ndarray:
    """uint8 (caption + H, 2W + gap (or the caption's width), 3): ``image`` (H, W, 3) uint8 on the
    left, its CAM overlay (opacity ``alpha``) on the right, ``text`` in a band above both."""
    img = np.asarray(image, dtype=np.uint8)
    over = overlay(img, cam, alpha)
    h, w = img.shape[:2]
    gap = max(2, w // 100)
    font = _font(int(np.clip(round(max(h, w) / 28), 11, 36)))
    left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font)
    pad = max(3, (bottom - top) // 3)
    band = (bottom - top) + 2 * pad
    width = max(2 * w + gap, (right - left) + 2 * pad)
    canvas = Image.new("RGB", (width, band + h), BACKGROUND)
    canvas.paste(Image.fromarray(img, mode="RGB"), (0, band))
    canvas.paste(Image.fromarray(over, mode="RGB"), (w + gap, band))
    ImageDraw.Draw(canvas).text((pad - left, pad - top), text, fill=TEXT, font=font)
    return np.asarray(canvas, dtype=np.uint8)


def save_explanation_png(path: str | Path, image: np.ndarray, cam: np.ndarray, alpha: float, text: str) -> Path:
    """Write :func:`explanation_panel` as a PNG (parent folders created)."""
    return save_png(path, explanation_panel(image, cam, alpha, text))


def save_cam_npy(path: str | Path, cam: np.ndarray) -> Path:
    """Write the raw map: float32 (H, W) in [0, 1], row 0 the top of the picture as displayed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.clip(np.asarray(cam, dtype=np.float32), 0.0, 1.0)
    with open(path, "wb") as fh:
        np.save(fh, arr, allow_pickle=False)
    return path


def save_overlay_png(path: str | Path, image: np.ndarray, cam: np.ndarray, alpha: float) -> Path:
    """Write the CAM overlay of ``image`` (H, W, 3) uint8 with opacity ``alpha`` as a PNG."""
    return save_png(path, overlay(image, cam, alpha))
