"""Image preprocessing shared by augment, train, evaluate and predict (pure: no file access).

One code path turns any decoded image into the network input, so inference preprocesses exactly
like training (files are decoded by :func:`pipeline.io.images.load_rgb`, which calls
:func:`to_rgb`):

1. :func:`to_rgb` converts any PIL image to 8-bit RGB (grayscale, palette, RGBA (composited on
   black), CMYK and 16-bit images included).
2. :func:`resize_square` resizes to ``size x size`` with bilinear antialiasing. Aspect ratio
   is **not** kept: dermoscopy images are centred on the lesion and HAM10000 ships 600x450;
   squashing keeps the whole field of view (the same choice as the 224x224 HAM10000 copy).
3. optionally :func:`color_constancy` (Shades of Gray, ``augment.color_constancy``) on the resized
   uint8 image; the export records it, so inference applies what training saw.
4. :func:`to_model_input` scales uint8 NCHW to float and normalises with :data:`MEAN`/:data:`STD`.
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

    return normalize_unit(batch_uint8.float().div_(255.0))


def normalize_unit(x: "torch.Tensor") -> "torch.Tensor":  # noqa: F821
    """float (N, 3, H, W) in [0, 1] -> normalised with the model's channel mean and std."""
    import torch

    mean = torch.tensor(MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


COLOR_CONSTANCY = ("none", "shades_of_gray")  # the colour-constancy methods preprocessing knows


def shades_of_gray(image: np.ndarray, power: float = 6.0) -> np.ndarray:
    """Shades-of-Gray colour constancy (Finlayson & Trezzi 2004) of one uint8 RGB image.

    The illuminant is estimated per channel as the Minkowski ``power``-mean of the pixels,
    ``e_c = (mean(I_c ** p)) ** (1 / p)`` (p = 1: grey world, p -> inf: max-RGB; p = 6 is the
    standard of the ISIC-challenge dermoscopy work), and every channel is scaled by
    ``mean(e) / e_c`` so the estimated illuminant becomes neutral grey of the same brightness.
    Takes uint8 HxWx3 (:func:`shades_of_gray_chw` for (N, 3, H, W) batches) and returns uint8 of
    the same shape (rounded, clipped to 0..255). A black image (no illuminant to estimate) is
    returned unchanged.
    """
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"shades_of_gray expects a uint8 HxWx3 image, got {arr.dtype} {arr.shape}")
    if not power >= 1:
        raise ValueError(f"shades_of_gray power must be >= 1, got {power}")
    # 256-entry lookup tables instead of per-pixel powers (uint8 has 256 values): ~10x faster
    levels = np.arange(256, dtype=np.float64) / 255.0
    counts = np.stack([np.bincount(arr[:, :, c].reshape(-1), minlength=256) for c in range(3)])
    illum = np.power(counts @ np.power(levels, power) / (arr.shape[0] * arr.shape[1]), 1.0 / power)
    if not np.all(illum > 0):
        return arr.copy()
    gain = illum.mean() / illum
    luts = np.clip(np.rint(levels[None, :] * gain[:, None] * 255.0), 0, 255).astype(np.uint8)
    return np.stack([luts[c][arr[:, :, c]] for c in range(3)], axis=2)


def shades_of_gray_chw(batch: np.ndarray, power: float = 6.0) -> np.ndarray:
    """:func:`shades_of_gray` of every image of a uint8 (N, 3, H, W) batch (a new array)."""
    b = np.asarray(batch)
    if b.dtype != np.uint8 or b.ndim != 4 or b.shape[1] != 3:
        raise ValueError(f"expected a uint8 (N, 3, H, W) batch, got {b.dtype} {b.shape}")
    out = np.empty_like(b)
    for i in range(b.shape[0]):
        out[i] = shades_of_gray(b[i].transpose(1, 2, 0), power).transpose(2, 0, 1)
    return out


def color_constancy(batch: np.ndarray, method: str, power: float = 6.0) -> np.ndarray:
    """A uint8 (N, 3, H, W) batch under colour-constancy ``method`` (``none``: returned as is)."""
    if method == "none":
        return batch
    if method == "shades_of_gray":
        return shades_of_gray_chw(batch, power)
    raise ValueError(f"unknown colour-constancy method {method!r}; known: {list(COLOR_CONSTANCY)}")


PHASH_SIDE = 16  # the hash compares 16 x 16 neighbouring pixels of a grey thumbnail: 256 bits


def perceptual_hash(img: Image.Image) -> str:
    """256-bit difference hash of the decoded pixels, as 64 hex digits.

    The image is reduced to a 17 x 16 grey thumbnail and each bit says whether a pixel is brighter
    than its left neighbour, so the hash depends on what the image shows, not on how it is encoded:
    the same pixels saved as PNG give the same hash as the JPEG, a resized or re-compressed copy
    differs by a few bits. Measured on ``ham10000-224`` (5,984 distinct lesions): two different
    lesions are never closer than 19 bits; PNG re-encodes are 0 bits away, resized copies at most
    12, JPEG quality-70 re-compressions at most 17.
    """
    grey = to_rgb(img).convert("L").resize((PHASH_SIDE + 1, PHASH_SIDE), Image.Resampling.BILINEAR, reducing_gap=None)
    a = np.asarray(grey, dtype=np.int16)
    return np.packbits((a[:, 1:] > a[:, :-1]).reshape(-1)).tobytes().hex()


def hash_words(hashes: list[str]) -> np.ndarray:
    """64-hex-digit hashes -> uint64 (N, 4) (rows of zeros for missing hashes)."""
    out = np.zeros((len(hashes), 4), dtype=np.uint64)
    for i, h in enumerate(hashes):
        if h:
            out[i] = np.frombuffer(bytes.fromhex(h), dtype=">u8").astype(np.uint64)
    return out


def near_pairs(words: np.ndarray, max_distance: int, chunk: int = 256) -> list[tuple[int, int]]:
    """Index pairs ``(i, j)``, ``i < j``, whose hashes differ in at most ``max_distance`` bits.

    The first 64 bits alone already differ in at most as many bits, so they prefilter candidates
    (4x less work), which the full 256-bit distance then confirms. O(N^2 / 4) word operations.
    """
    n = words.shape[0]
    pairs: list[tuple[int, int]] = []
    first = words[:, 0]
    for start in range(0, n, chunk):
        block = first[start : start + chunk]
        d0 = np.bitwise_count(block[:, None] ^ first[None, :])
        rows, cols = np.nonzero(d0 <= max_distance)
        keep = cols > rows + start
        rows, cols = rows[keep] + start, cols[keep]
        if rows.size:
            full = np.bitwise_count(words[rows] ^ words[cols]).sum(axis=1)
            ok = full <= max_distance
            pairs.extend(zip(rows[ok].tolist(), cols[ok].tolist(), strict=True))
    return pairs
