"""Inference, the pure part: images -> class probabilities and labels with an exported model (S3).

Every image is preprocessed exactly like training: RGB (:func:`pipeline.core.imaging.to_rgb`),
square resize to the model's ``image_size``, the colour constancy the model was trained with
(``preprocess`` in ``config.json``: :func:`pipeline.core.imaging.color_constancy`, ``none`` for
older exports), normalisation (:func:`~pipeline.core.imaging.to_model_input`). Used by the
``predict``, ``select`` and ``evaluate`` stages, the registry gate and the MLflow pyfunc, so all of
them predict the same numbers and labels for the same pixels:

* :func:`predict_batch_uint8` -- probabilities: the softmax of the network, or with the export's
  ``tta: flips`` the mean of the softmax over the 8 flip/transpose views of each image (the
  dihedral group of the square: lesions have no orientation; :func:`tta_views`), then the
  export's ``calibration`` (:mod:`pipeline.core.calibration`; identity for exports without one).
* :func:`predicted_labels` -- labels from probabilities under the export's decision rule
  (:mod:`pipeline.core.decision`: ``argmax`` or fitted log-probability ``offsets``), or plain
  arg-max when asked (``predict.decision: argmax``). The rule never adjusts the probabilities.

Every path runs the network as :func:`inference_ready` makes it: a copy in eval mode, batch norm
folded into the convs (:func:`pipeline.core.model.fold_batch_norm`; one op fewer per conv, about
a third off the batch-1 predict path on the CPU), in the channels-last memory format (this
mostly-depthwise network runs about 20 % faster that way on the CPU, batch 1 and 64 alike). Outputs
agree with the plain eval-mode network to about 1e-7. The loader
(:func:`pipeline.io.modelstore.load_exported`) and the ``select`` stage prepare it, so ``select``
fits the calibration and the decision rule on the same numbers that ``predict``, pyfunc and
``evaluate`` produce; the export itself is written from the unfolded network.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from PIL import Image

from pipeline.core.calibration import apply_calibration, calibration_of
from pipeline.core.cam import cam_for
from pipeline.core.decision import apply_offsets, offsets_of
from pipeline.core.imaging import color_constancy, resize_square, to_model_input, to_rgb
from pipeline.core.model import fold_batch_norm
from pipeline.errors import DataError, PipelineError
from pipeline.labels import CLASSES


class Model(Protocol):
    """An exported model: the eager network and its ``config.json`` (:class:`pipeline.io.modelstore.ExportedModel`)."""

    model: Any
    meta: dict[str, Any]

    @property
    def image_size(self) -> int: ...


# tta (the views: tta_views): flips -- identity, 3 rotations by 90 degrees, and the transposes of all
# four (the dihedral group)
TTA_MODES = ("none", "flips")
DECISIONS = ("rule", "argmax")  # predict.decision: the export's rule, or plain arg-max


def inference_ready(model: torch.nn.Module) -> torch.nn.Module:
    """The network every inference path runs: a copy of ``model`` in eval mode with its batch norm
    folded into the convs (:func:`pipeline.core.model.fold_batch_norm`) and in the channels-last
    memory format. ``model`` is untouched; export it, not the copy, whose state dict has no BN
    entries."""
    return fold_batch_norm(model).to(memory_format=torch.channels_last)


def preprocess_of(meta: dict[str, Any]) -> tuple[str, float]:
    """(colour-constancy method, power) an export was trained with; ``("none", 6.0)`` when absent."""
    pre = meta.get("preprocess") or {}
    return str(pre.get("color_constancy", "none")), float(pre.get("sog_power", 6.0))


def tta_of(meta: dict[str, Any]) -> str:
    """The export's test-time augmentation: ``none`` (also for older exports) or ``flips``."""
    return str(meta.get("tta", "none"))


def apply_preprocess(batch_uint8: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
    """The export's colour constancy on a resized uint8 (N, 3, S, S) batch (``none``: unchanged)."""
    method, power = preprocess_of(meta)
    return color_constancy(batch_uint8, method, power)


def tta_views(x: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """The views of a (N, C, H, W) batch that ``mode`` averages over (``none``: just ``x``)."""
    if mode == "none":
        return [x]
    if mode != "flips":
        raise PipelineError(f"unknown test-time augmentation {mode!r}; known: {list(TTA_MODES)}")
    views = [torch.rot90(x, k, dims=(2, 3)) for k in range(4)]
    return views + [v.transpose(2, 3) for v in views]


def predicted_labels(exported: Model, probs: np.ndarray, decision: str = "rule") -> np.ndarray:
    """Class indices (N,) for probabilities from :func:`predict_batch_uint8`: the export's decision
    rule (``decision="rule"``; an export without one is arg-max) or plain arg-max (``"argmax"``)."""
    if decision not in DECISIONS:
        raise PipelineError(f"unknown decision {decision!r}; known: {list(DECISIONS)}")
    return apply_offsets(probs, offsets_of(exported.meta) if decision == "rule" else None)


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


def view_probs(model: torch.nn.Module, x: torch.Tensor, mode: str, first_row: int = 0) -> torch.Tensor:
    """float64 class probabilities (N, C) of ``model`` on the model input ``x`` (N, C, H, W): the
    softmax, averaged over the :func:`tta_views` of ``mode`` (all views in one forward pass: TTA at
    batch 1 is one batch of 8, not 8 passes). Non-finite logits raise :class:`PipelineError` naming
    the rows (counted from ``first_row``)."""
    views = tta_views(x, mode)
    n = x.shape[0]
    logits = model(views[0] if len(views) == 1 else torch.cat(views).contiguous()).float()
    bad = ~torch.isfinite(logits).all(dim=1)
    if bool(bad.any()):
        rows = sorted({int(r) % n + first_row for r in torch.nonzero(bad).flatten()})
        raise PipelineError(
            f"the model produced non-finite outputs for {len(rows)} image(s) (rows {rows[:5]}); "
            "refusing to report garbage probabilities"
        )
    p = torch.softmax(logits.double(), dim=1)
    return p.view(len(views), n, -1).mean(dim=0) if len(views) > 1 else p


@torch.no_grad()
def predict_batch_uint8(exported: Model, batch_uint8: np.ndarray, batch_size: int) -> np.ndarray:
    """uint8 (N, 3, S, S) already at the model size (not yet colour-corrected) -> probabilities
    (N, C) float64 summing to 1, under the export's colour constancy, test-time augmentation and
    calibration (applied to each image's view-averaged probabilities, so a row does not depend on
    the batch it comes in).

    Non-finite logits (a broken model) raise :class:`PipelineError` instead of giving probabilities."""
    model = exported.model
    device = next(model.parameters()).device
    mode = tta_of(exported.meta)
    probs = []
    for i in range(0, batch_uint8.shape[0], batch_size):
        chunk = apply_preprocess(np.array(batch_uint8[i : i + batch_size]), exported.meta)
        x = to_model_input(torch.from_numpy(chunk).to(device))
        probs.append(view_probs(model, x, mode, first_row=i).cpu().numpy())
    if not probs:
        return np.zeros((0, int(exported.meta["num_classes"])), dtype=np.float64)
    p = np.concatenate(probs)
    p = p / p.sum(axis=1, keepdims=True)
    temperature, bias = calibration_of(exported.meta)
    return p if bias is None else apply_calibration(p, temperature, bias)


def predict_proba(exported: Model, images: Sequence[np.ndarray | Image.Image], batch_size: int) -> np.ndarray:
    """Images of any size -> class probabilities (N, C) in :data:`CLASSES` order."""
    size = exported.image_size
    out = []
    for i in range(0, len(images), batch_size):
        out.append(predict_batch_uint8(exported, prepare(images[i : i + batch_size], size), batch_size))
    if not out:
        return np.zeros((0, int(exported.meta["num_classes"])), dtype=np.float64)
    return np.concatenate(out)


def probabilities_frame(
    image_ids: Sequence[str], probs: np.ndarray, classes: Sequence[str] = CLASSES, labels: np.ndarray | None = None
) -> pd.DataFrame:
    """The output table: image_id, label (``labels``, default arg-max), one probability column per class."""
    classes = list(classes)
    df = pd.DataFrame(probs, columns=classes)
    idx = probs.argmax(axis=1) if labels is None and len(probs) else labels
    df.insert(0, "label", [classes[int(i)] for i in idx] if len(probs) else [])
    df.insert(0, "image_id", list(image_ids))
    return df


def cam_of(
    exported: Model, image_chw: np.ndarray, class_idx: int | None = None, size: tuple[int, int] | None = None
) -> tuple[np.ndarray, int, np.ndarray]:
    """CAM in [0, 1] of one uint8 (3, H, W) image at the model size (after the export's
    colour constancy, without test-time augmentation), the class it shows and the single-view
    softmax, uncalibrated (patent S4). ``class_idx`` None: the single view's arg-max class; callers pass
    the label :func:`predicted_labels` chose so the map explains the reported label. The map is
    (H, W), or ``size`` = (height, width): the original picture's size, undoing the square resize."""
    x = to_model_input(torch.from_numpy(apply_preprocess(np.array(image_chw[None]), exported.meta)))
    return cam_for(exported.model, x, class_idx, size)
