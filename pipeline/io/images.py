"""Reading image files: decode to RGB, list the images of a folder, cheap header facts.

The pure preprocessing (:mod:`pipeline.core.imaging`) starts from a decoded PIL image; this module
is the one place that opens image files for it, so training, evaluation and prediction decode alike.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.core.imaging import resize_square, to_rgb

IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})


def load_rgb(path: str | Path | io.BytesIO) -> Image.Image:
    """Decode an image file fully and return it as RGB. Raises ``OSError``/``ValueError`` if unreadable."""
    with Image.open(path) as img:
        img.load()
        return to_rgb(img)


def decode_image(data: bytes) -> Image.Image:
    """The bytes of an image file, decoded fully to RGB (the same path as :func:`load_rgb`)."""
    return load_rgb(io.BytesIO(data))


def load_resized(path: str | Path, size: int) -> np.ndarray:
    """File -> uint8 array (size, size, 3)."""
    return np.asarray(resize_square(load_rgb(path), size), dtype=np.uint8)


def list_images(folder: str | Path) -> list[Path]:
    """Image files below ``folder`` (recursive), sorted by path."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def file_facts(path: Path) -> tuple[int, int, str]:
    """(width, height, sha256) of one file, from its header and bytes, never raising.

    Unreadable bytes (missing file, permission) -> ``(0, 0, "")``; readable bytes that are not a
    recognisable image -> ``(0, 0, sha256)``.
    """
    try:
        data = path.read_bytes()
    except OSError:
        return 0, 0, ""
    digest = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(path) as img:  # lazy: parses the header only
            width, height = img.size
    except Exception:  # noqa: BLE001 - any parser failure means "not readable", validate reports it
        return 0, 0, digest
    return int(width), int(height), digest


def save_png(path: str | Path, image: np.ndarray) -> Path:
    """Write a uint8 (H, W, 3) array as a PNG (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(image, dtype=np.uint8), mode="RGB").save(path, format="PNG")
    return path



def save_mask_png(path: str | Path, mask: np.ndarray) -> Path:
    """Write a uint8 (H, W) mask (0/255) as an 8-bit greyscale PNG (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="L").save(path, format="PNG")
    return path


def load_mask(path: str | Path) -> np.ndarray:
    """A lesion mask PNG -> bool (H, W), True where the pixel is > 127."""
    with Image.open(path) as img:
        return np.asarray(img.convert("L"), dtype=np.uint8) > 127
