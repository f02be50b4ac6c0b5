"""Image preprocessing shared by augment, train, evaluate and predict (pure: no file access).

One code path turns any decoded image into the network input, so inference preprocesses exactly
like training (files are decoded by :func:`pipeline.io.images.load_rgb`, which calls
:func:`to_rgb`):

1. :func:`to_rgb` converts any PIL image to 8-bit RGB (grayscale, palette, RGBA (composited on
   black), CMYK and 16-bit images included).
2. :func:`resize_square` resizes to ``size x size`` with bilinear antialiasing. Aspect ratio
   is **not** kept: dermoscopy images are centred on the lesion and HAM10000 ships 600x450;
   squashing keeps the whole field of view (the same choice as the 224x224 HAM10000 copy).
3. :func:`to_model_input` scales uint8 NCHW to float and normalises with :data:`MEAN`/:data:`STD`.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

# Normalisation constants (ImageNet statistics; the network is trained from scratch, these
# only centre the inputs and are stored with every exported model).
MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL image to 8-bit RGB."""
    img = ImageOps.exif_transpose(img) or img
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        return Image.fromarray(scaled.round().astype(np.uint8), mode="L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def resize_square(img: Image.Image, size: int) -> Image.Image:
    if img.size == (size, size):
        return img
    return img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)


def to_model_input(batch_uint8: "torch.Tensor") -> "torch.Tensor":  # noqa: F821
    """uint8 (N, 3, H, W) -> normalised float32 (N, 3, H, W), on the batch's device."""
    import torch

    x = batch_uint8.float().div_(255.0)
    mean = torch.tensor(MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std
