"""Classify image files with an exported model (the ``predict`` stage) and the pure core.

``run_predict(cfg, model, images, out, cam_dir=None)``:

* ``model`` is an export folder (``models/export``) or a registry URI ``models:/NAME@ALIAS``
  (downloaded with :func:`pipeline.registry.download_model`, imported only then).
* ``images`` is one image file or a folder searched recursively
  (:func:`pipeline.preprocess.list_images`).
* The output CSV has exactly the columns ``image_id,label,akiec,bcc,bkl,df,mel,nv,vasc``:
  ``image_id`` is the file name without extension, the class columns are softmax probabilities
  (sum 1), ``label`` is the arg-max class.
* Every image is preprocessed exactly like training: :func:`~pipeline.preprocess.load_rgb`
  (any mode: L, RGBA, P, CMYK, 16-bit ...) -> :func:`~pipeline.preprocess.resize_square` to the
  model's ``image_size`` -> :func:`~pipeline.preprocess.to_model_input`.
* An unreadable file is reported by name (log and stderr) and skipped; the stage fails
  (:class:`~pipeline.errors.DataError`) only when no image could be read.
* ``cam_dir``: a CAM overlay PNG per image (``<image_id>.png``, predicted class, patent S4).

:func:`predict_proba` is the pure core used by the MLflow pyfunc wrapper.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from pipeline.config import Config
from pipeline.errors import DataError
from pipeline.export import ExportedModel, load_exported
from pipeline.fileio import atomic_path
from pipeline.labels import CLASSES
from pipeline.preprocess import list_images, load_rgb, resize_square, to_model_input, to_rgb

log = logging.getLogger(__name__)

OUTPUT_COLUMNS: tuple[str, ...] = ("image_id", "label", *CLASSES)
BATCH = 64


def prepare(images: Sequence[np.ndarray | Image.Image], size: int) -> np.ndarray:
    """Images of any size (uint8 HxWx3, HxW, HxWx4 arrays or PIL images) -> uint8 (N, 3, size, size)."""
    out = np.empty((len(images), 3, size, size), dtype=np.uint8)
    for i, img in enumerate(images):
        if not isinstance(img, Image.Image):
            arr = np.asarray(img)
            if arr.dtype != np.uint8:
                raise DataError(f"image {i}: expected uint8 pixels, got {arr.dtype}")
            if arr.ndim == 3 and arr.shape[2] == 1:
                arr = arr[:, :, 0]
            if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
                raise DataError(f"image {i}: expected HxW, HxWx3 or HxWx4, got shape {arr.shape}")
            img = Image.fromarray(arr)
        out[i] = np.asarray(resize_square(to_rgb(img), size), dtype=np.uint8).transpose(2, 0, 1)
    return out


@torch.no_grad()
def predict_batch_uint8(exported: ExportedModel, batch_uint8: np.ndarray, batch_size: int = BATCH) -> np.ndarray:
    """uint8 (N, 3, S, S) already at the model size -> probabilities (N, C) float64 summing to 1."""
    model = exported.model
    device = next(model.parameters()).device
    probs = []
    for i in range(0, batch_uint8.shape[0], batch_size):
        x = to_model_input(torch.from_numpy(np.array(batch_uint8[i : i + batch_size])).to(device))
        logits = model(x).float()
        probs.append(torch.softmax(logits.double(), dim=1).cpu().numpy())
    if not probs:
        return np.zeros((0, int(exported.meta["num_classes"])), dtype=np.float64)
    p = np.concatenate(probs)
    return p / p.sum(axis=1, keepdims=True)


def predict_proba(exported: ExportedModel, images: Sequence[np.ndarray | Image.Image], batch_size: int = BATCH) -> np.ndarray:
    """Pure core: images of any size -> class probabilities (N, 7) in :data:`CLASSES` order."""
    size = exported.image_size
    out = []
    for i in range(0, len(images), batch_size):
        out.append(predict_batch_uint8(exported, prepare(images[i : i + batch_size], size), batch_size))
    if not out:
        return np.zeros((0, int(exported.meta["num_classes"])), dtype=np.float64)
    return np.concatenate(out)


def probabilities_frame(image_ids: Sequence[str], probs: np.ndarray, classes: Sequence[str] = CLASSES) -> pd.DataFrame:
    """The output table: image_id, label (arg-max), one probability column per class."""
    classes = list(classes)
    df = pd.DataFrame(probs, columns=classes)
    df.insert(0, "label", [classes[i] for i in probs.argmax(axis=1)] if len(probs) else [])
    df.insert(0, "image_id", list(image_ids))
    return df


def resolve_model(model: str | Path, cfg: Config) -> Path:
    """An export folder for ``model`` (a folder path or ``models:/NAME@ALIAS``)."""
    text = str(model)
    if text.startswith("models:/"):
        from pipeline.registry import download_model  # lazy: MLflow is heavy and optional here

        return Path(download_model(text, cfg))
    folder = Path(text)
    if not folder.is_dir():
        raise DataError(f"{folder}: model folder not found (expected an export folder or models:/NAME@ALIAS)")
    return folder


def _image_files(images: str | Path) -> list[Path]:
    src = Path(images)
    if src.is_file():
        return [src]
    if src.is_dir():
        files = list_images(src)
        if not files:
            raise DataError(f"{src}: no image files found (looked for .jpg .jpeg .png .bmp .tif .tiff .webp)")
        return files
    raise DataError(f"{src}: no such file or folder")


def read_images(files: Sequence[Path], size: int) -> tuple[list[Path], np.ndarray, list[str]]:
    """Decode + resize; returns (readable files, uint8 (N,3,S,S), problems 'file: reason')."""
    ok: list[Path] = []
    arrays: list[np.ndarray] = []
    problems: list[str] = []
    for f in files:
        try:
            img = load_rgb(f)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            problems.append(f"{f}: unreadable image ({exc})")
            continue
        arrays.append(np.asarray(resize_square(img, size), dtype=np.uint8).transpose(2, 0, 1))
        ok.append(f)
    stack = np.stack(arrays) if arrays else np.zeros((0, 3, size, size), np.uint8)
    return ok, stack, problems


def run_predict(cfg: Config, model: str, images: str, out: str, cam_dir: str | None = None) -> dict[str, Any]:
    """The ``predict`` stage. Returns {'images', 'skipped', 'out', ...}."""
    folder = resolve_model(model, cfg)
    exported = load_exported(folder)
    files = _image_files(images)
    ok, batch, problems = read_images(files, exported.image_size)
    for p in problems:
        log.warning("skipped %s", p)
        print(f"warning: skipped {p}", file=sys.stderr)
    if not ok:
        raise DataError(f"{images}: none of the {len(files)} image file(s) could be read")
    probs = predict_batch_uint8(exported, batch)
    ids = [f.stem for f in ok]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        log.warning("%d image ids occur more than once (same file name in different folders): %s", len(dup), dup[:5])
    df = probabilities_frame(ids, probs, exported.classes)
    with atomic_path(out) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6f")
    summary: dict[str, Any] = {
        "images": len(ok),
        "skipped": len(problems),
        "out": str(out),
        "model": str(model),
        "labels": {k: int(v) for k, v in df["label"].value_counts().sort_index().items()},
    }
    if cam_dir:
        write_cams(exported, batch, ids, Path(cam_dir))
        summary["cam_dir"] = str(cam_dir)
    return summary


def write_cams(exported: ExportedModel, batch: np.ndarray, ids: Sequence[str], cam_dir: Path) -> None:
    """One CAM overlay PNG per image for its predicted class (each file written atomically).

    Files are added to ``cam_dir`` (other files there are left alone)."""
    from pipeline.cam import cam_for, save_overlay_png

    cam_dir.mkdir(parents=True, exist_ok=True)
    for image_id, img in zip(ids, batch, strict=True):
        x = to_model_input(torch.from_numpy(np.ascontiguousarray(img[None])))
        cam, _, _ = cam_for(exported.model, x)
        tmp = cam_dir / f".{image_id}.tmp.png"
        save_overlay_png(tmp, img.transpose(1, 2, 0), cam)
        os.replace(tmp, cam_dir / f"{image_id}.png")
