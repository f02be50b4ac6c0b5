"""Evaluation, the pure part: the ``metrics.json`` contract and the choice of CAM samples."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

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
