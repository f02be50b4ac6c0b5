"""Evaluation, the pure part: the ``metrics.json`` contract and the choice of CAM samples.

Per acquisition source (manifest ``source_site``) the evaluate stage adds to ``metrics.json`` the
flat keys ``site_<site>_<n|balanced_accuracy|accuracy|macro_auc|ece>`` (:func:`site_flat_metrics`;
MLflow logs them as ``test_site_...``) and writes the full detail -- per-class recall over the
classes present and the confusion matrix, overall and per source -- to ``metrics_detail.json``
(:func:`detail_report`). With ``evaluate.bootstrap_samples`` > 0 it adds the confidence intervals
of :func:`pipeline.core.metrics.bootstrap_intervals` as ``<key>_ci_low`` / ``<key>_ci_high`` and their
``ci_level`` (:func:`interval_flat_metrics`; MLflow: ``test_<key>_ci_low`` ...) and, with the level and the
number of resamples, as ``overall.intervals`` of ``metrics_detail.json``."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core.metrics import SUBSET_KEYS
from pipeline.labels import CLASSES

# Export facts copied from the model's config.json into metrics.json.
META_KEYS: tuple[str, ...] = (
    "params_inference",
    "params_train",
    "selected_branch",
    "val_loss_branch1",
    "val_loss_branch2",
    "best_epoch",
)


def select_cam_samples(
    y_true: np.ndarray, probs: np.ndarray, per_class: int, y_pred: np.ndarray | None = None
) -> list[tuple[int, str, int]]:
    """(true class, 'correct'|'wrong', row) of the CAM samples: per class the most confident
    correct and the most confident wrong predictions, up to ``per_class`` each (ties: row order).
    ``y_pred``: the labels of the decision rule (default arg-max)."""
    y_pred = probs.argmax(axis=1) if y_pred is None else np.asarray(y_pred)
    conf = probs.max(axis=1)
    out: list[tuple[int, str, int]] = []
    if per_class <= 0:
        return out
    for c in range(probs.shape[1]):
        for kind, mask in (("correct", (y_true == c) & (y_pred == c)), ("wrong", (y_true == c) & (y_pred != c))):
            rows = np.flatnonzero(mask)
            rows = rows[np.argsort(-conf[rows], kind="stable")][:per_class]
            out.extend((c, kind, int(r)) for r in rows)
    return out


def finite(v: Any) -> Any:
    """numpy scalars -> Python; non-finite floats -> None (strict JSON)."""
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(float(v)) else None
    if isinstance(v, np.integer):
        return int(v)
    return v


def flat_metrics(metrics: dict[str, Any], meta: dict[str, Any], n_test: int) -> dict[str, Any]:
    """The ``metrics.json`` content: metrics + export facts, strict-JSON values."""
    out = {k: finite(v) for k, v in metrics.items() if not isinstance(v, (list, dict, np.ndarray))}
    for k in META_KEYS:
        if k in meta:
            out[k] = finite(meta[k])
    out["test_images"] = int(n_test)
    return out


def site_flat_metrics(per_site: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``site_<site>_<key>`` for the headline keys of each source (strict-JSON values)."""
    return {f"site_{site}_{k}": finite(m[k]) for site, m in per_site.items() for k in SUBSET_KEYS}


def interval_flat_metrics(intervals: Mapping[str, Sequence[float]], level: float) -> dict[str, Any]:
    """``<key>_ci_low`` / ``<key>_ci_high`` of each ``key -> [low, high]`` and ``ci_level``
    (strict-JSON values)."""
    out: dict[str, Any] = {"ci_level": float(level)}
    for k, (lo, hi) in intervals.items():
        out[f"{k}_ci_low"], out[f"{k}_ci_high"] = finite(lo), finite(hi)
    return out


def _strict(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {str(k): _strict(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_strict(x) for x in v]
    return finite(v)


def detail_report(
    classes: Sequence[str], overall: Mapping[str, Any], per_site: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """The ``metrics_detail.json`` content: class order, the overall subset metrics (with the
    confusion matrix, rows = true class, columns = predicted) and the same per source."""
    return _strict({"classes": list(classes), "overall": overall, "per_source": per_site})


PREDICTION_COLUMNS: tuple[str, ...] = ("image_id", "label", "predicted", "correct", *CLASSES)


def predictions_frame(
    image_ids: Sequence[str], y_true: np.ndarray, y_pred: np.ndarray, probs: np.ndarray
) -> pd.DataFrame:
    """One row per scored image, :data:`PREDICTION_COLUMNS`: ``image_id``, the true and the decided
    class names, ``correct`` (0/1) and one probability column per class (``reports/predictions_test.csv``
    of the evaluate stage; the bench's per-model prediction files, which ``bench/compare.py`` pairs)."""
    y_true, y_pred, probs = np.asarray(y_true), np.asarray(y_pred), np.asarray(probs, dtype=np.float64)
    if not (len(image_ids) == y_true.size == y_pred.size == probs.shape[0]) or probs.shape[1:] != (len(CLASSES),):
        raise ValueError(f"predictions_frame: {len(image_ids)} ids, {y_true.size} labels, {y_pred.size} decisions "
                         f"and probabilities of shape {probs.shape} do not match")
    out = pd.DataFrame(probs, columns=list(CLASSES))
    out.insert(0, "correct", (y_true == y_pred).astype(int))
    out.insert(0, "predicted", [CLASSES[i] for i in y_pred])
    out.insert(0, "label", [CLASSES[i] for i in y_true])
    out.insert(0, "image_id", [str(i) for i in image_ids])
    return out
