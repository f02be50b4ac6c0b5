"""Inference, the pure part: images -> class probabilities with an exported model (patent S3).

Every image is preprocessed exactly like training: RGB (:func:`pipeline.core.imaging.to_rgb`),
square resize to the model's ``image_size``, normalisation (:func:`~pipeline.core.imaging.to_model_input`).
Used by the ``predict`` and ``evaluate`` stages, the registry gate and the MLflow pyfunc, so all of
them predict the same numbers for the same pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from PIL import Image

from pipeline.core.cam import cam_for
from pipeline.core.imaging import resize_square, to_model_input, to_rgb
from pipeline.errors import DataError, PipelineError
from pipeline.labels import CLASSES


class Model(Protocol):
    """An exported model: the eager network and its ``config.json`` (:class:`pipeline.io.modelstore.ExportedModel`)."""

    model: Any
    meta: dict[str, Any]

    @property
    def image_size(self) -> int: ...


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
def predict_batch_uint8(exported: Model, batch_uint8: np.ndarray, batch_size: int) -> np.ndarray:
    """uint8 (N, 3, S, S) already at the model size -> probabilities (N, C) float64 summing to 1.

    Non-finite logits (a broken model) raise :class:`PipelineError` instead of giving probabilities."""
    model = exported.model
    device = next(model.parameters()).device
    probs = []
    for i in range(0, batch_uint8.shape[0], batch_size):
        x = to_model_input(torch.from_numpy(np.array(batch_uint8[i : i + batch_size])).to(device))
        logits = model(x).float()
        bad = ~torch.isfinite(logits).all(dim=1)
        if bool(bad.any()):
            rows = (torch.nonzero(bad).flatten() + i).tolist()
            raise PipelineError(
                f"the model produced non-finite outputs for {len(rows)} image(s) (rows {rows[:5]}); "
                "refusing to report garbage probabilities"
            )
        probs.append(torch.softmax(logits.double(), dim=1).cpu().numpy())
    if not probs:
        return np.zeros((0, int(exported.meta["num_classes"])), dtype=np.float64)
    p = np.concatenate(probs)
    return p / p.sum(axis=1, keepdims=True)


def predict_proba(exported: Model, images: Sequence[np.ndarray | Image.Image], batch_size: int) -> np.ndarray:
    """Images of any size -> class probabilities (N, C) in :data:`CLASSES` order."""
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


def cam_of(exported: Model, image_chw: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
    """CAM (H, W) in [0, 1] of the predicted class of one uint8 (3, H, W) image at the model size,
    the predicted class and the probabilities (patent S4)."""
    x = to_model_input(torch.from_numpy(np.array(image_chw[None])))
    return cam_for(exported.model, x)
