"""What a CAM is drawn on and checked against: the original picture behind an augmented row and,
for the synthetic data set, its lesion mask.

* :func:`original_paths`: per augmented row (its ``source_id``), the source image file the
  validated manifest names (``data_root / path``), ``None`` when the manifest, the row or the file
  is missing -- callers then draw on the stored (square) image.
* :func:`load_original`: that file decoded like everywhere else (:func:`pipeline.io.images.load_rgb`,
  EXIF orientation applied), as uint8 (H, W, 3).
* :func:`mask_paths`: the synthetic set's lesion masks (``masks/<source_id>_segmentation.png``
  below the data root, written by the ``synthesize`` stage), ``None`` where there is none.
* :func:`localisation_records`: per image the CAM checks of :mod:`pipeline.core.cam` against the
  mask: pointing hit, mass inside, centre / border mass.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import Config
from pipeline.core.cam import centre_border_mass, mass_inside, pointing_hit
from pipeline.core.inference import Model, cam_of
from pipeline.core.synthetic import MASK_SUFFIX, MASKS_DIR
from pipeline.io.images import load_mask, load_rgb
from pipeline.io.manifests import read_manifest
from pipeline.io.readers import data_root
from pipeline.labels import CLASS_TO_INDEX, CLASSES
from pipeline.layout import Layout


def original_paths(rows: pd.DataFrame, cfg: Config) -> list[Path | None]:
    """The source image file of each augmented row (column ``source_id``), or ``None``."""
    layout = Layout.from_config(cfg)
    if "source_id" not in rows.columns or not layout.validated_manifest.is_file():
        return [None] * len(rows)
    manifest = read_manifest(layout.validated_manifest, produced_by="validate")
    try:
        root = data_root(cfg)
    except Exception:  # noqa: BLE001 - a config without a resolvable root: draw on the stored images
        return [None] * len(rows)
    where = dict(zip(manifest["image_id"].astype(str), manifest["path"].astype(str), strict=True))
    out: list[Path | None] = []
    for sid in rows["source_id"].astype(str):
        rel = where.get(sid)
        path = root / rel if rel is not None else None
        out.append(path if path is not None and path.is_file() else None)
    return out


def load_original(path: Path | None) -> np.ndarray | None:
    """uint8 (H, W, 3) of a source image (EXIF orientation applied), ``None`` if absent/unreadable."""
    if path is None:
        return None
    try:
        return np.asarray(load_rgb(path), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError):
        return None


def mask_paths(source_ids: Sequence[str], cfg: Config) -> list[Path | None]:
    """The synthetic lesion mask of each source image id, or ``None`` where the data root has none."""
    folder = data_root(cfg) / MASKS_DIR
    out: list[Path | None] = []
    for sid in source_ids:
        p = folder / f"{sid}{MASK_SUFFIX}"
        out.append(p if p.is_file() else None)
    return out


def localisation_records(
    exported: Model, images: np.ndarray, rows: pd.DataFrame, cfg: Config, border: float = 0.125
) -> pd.DataFrame:
    """Where the CAM of each row points, against its lesion mask.

    ``images``: the stored uint8 (N, 3, S, S) the model sees (:func:`pipeline.io.scoring.load_images`
    of ``rows``); ``rows``: augmented manifest rows (``image_id, source_id, label``). Rows without
    a mask are left out. The map is of the single view's arg-max class, resized to the mask's size
    (the original picture's). Columns: ``image_id, label, predicted, correct, hit, mass_inside,
    mask_share, centre, border``.
    """
    records = []
    masks = mask_paths(rows["source_id"].astype(str).tolist(), cfg)
    for i, (mpath, image_id, label) in enumerate(zip(masks, rows["image_id"], rows["label"], strict=True)):
        if mpath is None:
            continue
        mask = load_mask(mpath)
        cam, pred, _ = cam_of(exported, images[i], None, mask.shape)
        centre, frame = centre_border_mass(cam, border)
        records.append({
            "image_id": str(image_id), "label": str(label), "predicted": CLASSES[pred],
            "correct": CLASS_TO_INDEX[str(label)] == pred, "hit": pointing_hit(cam, mask),
            "mass_inside": mass_inside(cam, mask), "mask_share": float(mask.mean()), "centre": centre,
            "border": frame,
        })  # fmt: skip
    return pd.DataFrame(records, columns=["image_id", "label", "predicted", "correct", "hit", "mass_inside",
                                          "mask_share", "centre", "border"])
