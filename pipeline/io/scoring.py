"""Scoring an exported model on a manifest of image files (used by ``evaluate`` and the registry gate).

Images are decoded once through the image cache at the model's ``image_size`` and run through the
pure :func:`pipeline.core.inference.predict_batch_uint8`; the metrics are
:func:`pipeline.core.metrics.classification_metrics`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import Config
from pipeline.core.inference import Model, predict_batch_uint8, predicted_labels
from pipeline.core.metrics import classification_metrics
from pipeline.core.schema import ensure_columns
from pipeline.errors import DataError
from pipeline.io.imagecache import load_image_cache
from pipeline.io.manifests import check_labels
from pipeline.labels import CLASS_TO_INDEX
from pipeline.layout import Layout

ARGMAX_KEYS = ("accuracy", "balanced_accuracy", "macro_f1")  # also reported for plain arg-max


def label_index(df: pd.DataFrame, where: str) -> np.ndarray:
    check_labels(df, where)
    return df["label"].astype(str).map(CLASS_TO_INDEX).to_numpy(dtype=np.int64)


def load_images(
    manifest_df: pd.DataFrame, images_root: str | Path, size: int, cfg: Config, name: str = "eval",
    workers: int | None = None,
) -> np.ndarray:
    """uint8 (N, 3, size, size) for the manifest rows, through the decode-once cache
    (``workers`` threads; default ``evaluate.cache_workers``)."""
    root = Path(images_root)
    ids = manifest_df["image_id"].astype(str).tolist()
    paths = [root / p for p in manifest_df["path"].astype(str)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"{len(missing)} image file(s) listed in the manifest are missing, e.g. {missing[:3]}")
    cache = load_image_cache(ids, paths, size, Layout.from_config(cfg).cache_dir, name=name,
                             workers=workers or cfg.evaluate.cache_workers, root=root)
    return np.asarray(cache.array)


def score_model(
    exported: Model, manifest_df: pd.DataFrame, images_root: str | Path, cfg: Config
) -> tuple[dict[str, Any], np.ndarray]:
    """Metrics of ``exported`` on ``manifest_df`` (columns image_id, path, label) -> (metrics, probs).

    Images are preprocessed like training (resized to the model's ``image_size``, the export's
    colour constancy and test-time augmentation); probabilities are in class order. Every metric
    of :func:`pipeline.core.metrics.classification_metrics` for the labels of the export's decision
    rule (what the pyfunc predicts; arg-max for an export without one), plus
    ``argmax_accuracy``, ``argmax_balanced_accuracy`` and ``argmax_macro_f1`` of plain arg-max.
    """
    ensure_columns(manifest_df, ("image_id", "path", "label"), "manifest")
    if manifest_df.empty:
        raise DataError("no images to score (empty manifest)")
    y_true = label_index(manifest_df, "manifest")
    images = load_images(manifest_df, images_root, exported.image_size, cfg)
    probs = predict_batch_uint8(exported, images, cfg.evaluate.batch_size)
    metrics = dict(classification_metrics(y_true, probs, y_pred=predicted_labels(exported, probs)))
    plain = classification_metrics(y_true, probs)
    metrics.update({f"argmax_{k}": plain[k] for k in ARGMAX_KEYS})
    return metrics, probs
