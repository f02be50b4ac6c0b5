"""Stage ``predict``: classify image files with an exported model or a registered version.

``run_predict(cfg, model, images, out, cam_dir=None)``:

* ``model`` is an export folder (``models/export``) or a registry URI ``models:/NAME@ALIAS`` /
  ``models:/NAME/VERSION`` (downloaded with :func:`pipeline.io.registry.download_model`).
* ``images`` is one image file or a folder searched recursively
  (:func:`pipeline.io.images.list_images`).
* The output CSV has exactly the columns ``image_id,label,akiec,bcc,bkl,df,mel,nv,vasc``:
  ``image_id`` is the file name without extension, the class columns are softmax probabilities
  (sum 1; with the export's ``tta: flips`` the mean over 8 flip/transpose views; then the
  export's ``calibration``, when it has one), ``label`` is
  the class the export's decision rule picks (``predict.decision: rule``, the pyfunc's label;
  arg-max for exports without a rule) or plain arg-max (``predict.decision: argmax``). The rule
  changes only the label, never the probabilities.
* Every image is preprocessed exactly like training (any mode: L, RGBA, P, CMYK, 16-bit ...; the
  export's colour constancy), see :mod:`pipeline.core.inference`; ``predict.batch_size`` images go
  through the network at once, on ``predict.cpu_threads`` torch threads (0: torch's default).
* An unreadable file is reported by name (log and stderr) and skipped; the stage fails
  (:class:`~pipeline.errors.DataError`) only when no image could be read.
* ``cam_dir``: per image, for its reported label (patent S4):

  - ``<image_id>.png``: the picture at its own resolution (decoded like for the network, EXIF
    orientation applied) beside the same picture with the CAM heat map over it, under a caption
    with the predicted label, its probability (the CSV's) and the class the map is for
    (:func:`pipeline.io.overlays.explanation_panel`). The map is computed on the square network
    input and resized straight to the picture's width x height, undoing the square squash.
  - ``<image_id>.cam.npy``: that map, float32 in [0, 1], shape (height, width) of the picture as
    displayed (row 0 at the top), ``numpy.load`` reads it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.config import Config
from pipeline.core.imaging import resize_square
from pipeline.core.inference import Model, cam_of, predict_batch_uint8, predicted_labels, probabilities_frame
from pipeline.errors import DataError
from pipeline.io.files import atomic_path
from pipeline.io.images import list_images, load_rgb
from pipeline.io.modelstore import load_exported
from pipeline.io.overlays import caption, save_cam_npy, save_explanation_png
from pipeline.io.threads import use_cpu_threads
from pipeline.labels import CLASSES

log = logging.getLogger(__name__)


def resolve_model(model: str | Path, cfg: Config) -> Path:
    """An export folder for ``model`` (a folder path or ``models:/NAME@ALIAS``)."""
    text = str(model)
    if text.startswith("models:/"):
        from pipeline.io.registry import download_model  # MLflow is heavy: imported only for registry URIs

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


def write_cams(
    exported: Model, files: Sequence[Path], batch: np.ndarray, ids: Sequence[str], cam_dir: Path, alpha: float,
    labels: np.ndarray, probs: np.ndarray,
) -> None:
    """Per image the CAM picture ``<image_id>.png`` and the map ``<image_id>.cam.npy`` at the
    original image's size, for its reported label (``labels``; ``probs`` the reported
    probabilities), each file written atomically. ``batch`` holds the network inputs decoded from
    ``files``; each file is decoded again, one at a time, for the picture.

    Files are added to ``cam_dir`` (other files there are left alone)."""
    cam_dir.mkdir(parents=True, exist_ok=True)
    for i, (f, image_id, img) in enumerate(zip(files, ids, batch, strict=True)):
        original = np.asarray(load_rgb(f), dtype=np.uint8)
        label = int(labels[i])
        cam, _, _ = cam_of(exported, img, label, original.shape[:2])
        name = CLASSES[label]
        with atomic_path(cam_dir / f"{image_id}.png") as tmp:
            save_explanation_png(tmp, original, cam, alpha, caption(name, float(probs[i, label]), name))
        with atomic_path(cam_dir / f"{image_id}.cam.npy") as tmp:
            save_cam_npy(tmp, cam)


def run_predict(cfg: Config, model: str, images: str, out: str, cam_dir: str | None = None) -> dict[str, Any]:
    use_cpu_threads(cfg.predict.cpu_threads)
    folder = resolve_model(model, cfg)
    exported = load_exported(folder)
    files = _image_files(images)
    ok, batch, problems = read_images(files, exported.image_size)
    for p in problems:
        log.warning("skipped %s", p)
        print(f"warning: skipped {p}", file=sys.stderr)
    if not ok:
        raise DataError(f"{images}: none of the {len(files)} image file(s) could be read")
    probs = predict_batch_uint8(exported, batch, cfg.predict.batch_size)
    ids = [f.stem for f in ok]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        log.warning("%d image ids occur more than once (same file name in different folders): %s", len(dup), dup[:5])
    labels = predicted_labels(exported, probs, cfg.predict.decision)
    df = probabilities_frame(ids, probs, exported.classes, labels)
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
        write_cams(exported, ok, batch, ids, Path(cam_dir), cfg.cam.alpha, labels, probs)
        summary["cam_dir"] = str(cam_dir)
    return summary
