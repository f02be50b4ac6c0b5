"""Classification metrics for the seven-class test set (scikit-learn, wrapped for absent classes).

scikit-learn computes every number; this wrapper fixes the conventions the project reports:

* ``balanced_accuracy`` is the ISIC 2018 task 3 metric: the mean recall over the classes that
  occur in ``y_true`` (a class absent from the test set cannot be recalled and is left out --
  what ``sklearn.metrics.balanced_accuracy_score`` does, without its warning).
* ``macro_auc`` is the mean one-vs-rest ROC AUC over the classes that have both positives and
  negatives in ``y_true``; it is NaN when no class qualifies. ``auc_<cls>`` is NaN for a class
  without positives or without negatives (scikit-learn would raise).
* Undefined precision (class never predicted) and recall (class absent) are 0.0
  (``zero_division=0``); ``support_<cls>`` tells them apart.
* Predictions are ``argmax(probs)`` (ties -> lowest class index) unless the caller passes the
  labels of a decision rule (``y_pred``).
* ``ece`` is the expected calibration error of the top-label confidence over
  :data:`ECE_BINS` equal-width bins: ``sum_b n_b / N * |accuracy_b - mean confidence_b|``
  (Guo et al. 2017); 0 is perfectly calibrated.
* **Subsets with only some classes** (one acquisition source, an external test set such as
  Derm7pt without akiec): :func:`per_group_metrics` applies the same conventions to each subset,
  so ``balanced_accuracy`` is the mean recall over the classes *present in that subset*,
  ``macro_auc`` averages the classes with both positives and negatives *in that subset* (NaN when
  none has), and ``recall`` lists the present classes only. The model still chooses among all its
  classes: a prediction of a class the subset lacks counts as an error (nothing is renormalised).
* **Confidence intervals** (:func:`bootstrap_intervals`, :func:`paired_differences`) come from a
  bootstrap of the test images that is *stratified by true class*: every resample keeps each
  class's count and draws its images with replacement within the class. Balanced accuracy is a
  mean of per-class recalls, so a plain resample that happened to miss a rare class (the held-out
  source has 11 ``akiec``) would change what is averaged; stratified, each class's recall varies
  by its own sample size, and accuracy is taken at the test set's class mix. Intervals are
  percentile intervals; the resamples are seeded, so a report is reproducible. They measure how
  much the figure depends on *which test images* were drawn, not how much it depends on the
  training seed (that spread comes on top).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import rankdata
from sklearn import metrics as skm

from pipeline.labels import CLASSES

ECE_BINS = 15  # the usual choice (Guo et al. 2017); a reporting convention, not a knob


def _check(y_true: np.ndarray, probs: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).reshape(-1)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise ValueError(f"probs must be (N, C) with N = {y.shape[0]}, got shape {p.shape}")
    if p.shape[1] != n_classes:
        raise ValueError(f"probs has {p.shape[1]} columns, expected {n_classes} classes")
    if not np.issubdtype(y.dtype, np.integer) and not np.all(np.mod(y, 1) == 0):
        raise ValueError("y_true must hold integer class indices")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"y_true values must be in 0..{n_classes - 1}")
    return y, p


def confusion_matrix(y_true: np.ndarray | Sequence[int], y_pred: np.ndarray | Sequence[int], n: int) -> np.ndarray:
    """(n, n) int64 counts; rows = true class, columns = predicted class."""
    t = np.asarray(y_true, dtype=np.int64).reshape(-1)
    p = np.asarray(y_pred, dtype=np.int64).reshape(-1)
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.size} vs {p.size}")
    for name, a in (("y_true", t), ("y_pred", p)):
        if a.size and (a.min() < 0 or a.max() >= n):
            raise ValueError(f"{name} values must be in 0..{n - 1}")
    if not t.size:
        return np.zeros((n, n), dtype=np.int64)
    return skm.confusion_matrix(t, p, labels=np.arange(n)).astype(np.int64)


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> float:
    """Top-label expected calibration error over ``bins`` equal-width confidence bins."""
    y = np.asarray(y_true, dtype=np.int64).reshape(-1)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != y.shape[0] or y.size == 0:
        raise ValueError(f"probs must be (N, C) with N = {y.shape[0]} > 0, got shape {p.shape}")
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            total += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(total)


def _auc(pos: np.ndarray, score: np.ndarray) -> float:
    if pos.all() or not pos.any():
        return float("nan")
    return float(skm.roc_auc_score(pos.astype(int), score))


def classification_metrics(
    y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str] = CLASSES, y_pred: np.ndarray | None = None
) -> dict[str, Any]:
    """Flat metric dict: ``accuracy``, ``balanced_accuracy``, ``macro_auc``, ``macro_f1``, ``ece`` and
    ``precision_/recall_/f1_/auc_/support_<cls>`` per class. Values are floats (support: int).

    ``y_pred``: the predicted labels when a decision rule other than arg-max chose them
    (:func:`pipeline.core.inference.predicted_labels`); the label metrics use them, AUC and ECE
    the probabilities."""
    classes = list(classes)
    n = len(classes)
    y, p, pred = _labels(y_true, probs, n, y_pred)
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y, pred, labels=np.arange(n), zero_division=0
    )
    aucs = np.array([_auc(y == c, p[:, c]) for c in range(n)])
    present = support > 0
    valid_auc = ~np.isnan(aucs)
    out: dict[str, Any] = {
        "accuracy": float(skm.accuracy_score(y, pred)),
        "balanced_accuracy": float(recall[present].mean()),
        "macro_auc": float(aucs[valid_auc].mean()) if valid_auc.any() else float("nan"),
        "macro_f1": float(f1[present].mean()),
        "ece": expected_calibration_error(y, p),
    }
    for c, name in enumerate(classes):
        out[f"precision_{name}"] = float(precision[c])
        out[f"recall_{name}"] = float(recall[c])
        out[f"f1_{name}"] = float(f1[c])
        out[f"auc_{name}"] = float(aucs[c])
        out[f"support_{name}"] = int(support[c])
    return out


def _labels(
    y_true: np.ndarray, probs: np.ndarray, n: int, y_pred: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Checked (y, probs, predicted labels): ``y_pred`` when a decision rule chose them, else arg-max."""
    y, p = _check(y_true, probs, n)
    if y.size == 0:
        raise ValueError("no samples")
    pred = p.argmax(axis=1) if y_pred is None else np.asarray(y_pred, dtype=np.int64).reshape(-1)
    if pred.shape != y.shape:
        raise ValueError(f"y_pred has {pred.size} labels for {y.size} samples")
    return y, p, pred


SUBSET_KEYS: tuple[str, ...] = ("n", "balanced_accuracy", "accuracy", "macro_auc", "ece")


def subset_metrics(
    y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str] = CLASSES, y_pred: np.ndarray | None = None
) -> dict[str, Any]:
    """The headline metrics of one subset (see the module docstring on absent classes):
    ``n``, ``balanced_accuracy``, ``accuracy``, ``macro_auc``, ``ece``, ``classes_present``,
    ``recall`` (present class -> recall) and ``confusion_matrix`` (rows true, columns predicted,
    in ``classes`` order). ``y_pred``: labels of a decision rule other than arg-max (the label
    metrics use them; AUC and ECE the probabilities)."""
    classes = list(classes)
    n = len(classes)
    y, p, pred = _labels(y_true, probs, n, y_pred)
    cm = confusion_matrix(y, pred, n)
    support = cm.sum(axis=1)
    present = [c for c in range(n) if support[c] > 0]
    recall = {classes[c]: float(cm[c, c] / support[c]) for c in present}
    m = classification_metrics(y, p, classes)  # AUC and ECE: from the probabilities only
    return {
        "n": int(y.size),
        "balanced_accuracy": float(np.mean(list(recall.values()))),
        "accuracy": float(np.trace(cm) / y.size),
        "macro_auc": m["macro_auc"],
        "ece": m["ece"],
        "classes_present": [classes[c] for c in present],
        "recall": recall,
        "confusion_matrix": cm.tolist(),
    }


def per_group_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    groups: Sequence[str] | np.ndarray,
    classes: Sequence[str] = CLASSES,
    y_pred: np.ndarray | None = None,
) -> dict[str, dict[str, Any]]:
    """group (e.g. acquisition source) -> :func:`subset_metrics` of its rows, groups sorted by name."""
    y, p = _check(y_true, probs, len(list(classes)))
    g = np.asarray([str(x) for x in groups])
    if g.shape[0] != y.shape[0]:
        raise ValueError(f"groups ({g.shape[0]}) and y_true ({y.shape[0]}) differ in length")
    pred = None if y_pred is None else np.asarray(y_pred, dtype=np.int64).reshape(-1)
    return {
        name: subset_metrics(y[g == name], p[g == name], classes, None if pred is None else pred[g == name])
        for name in sorted(set(g.tolist()))
    }


def roc_curves(
    y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str] = CLASSES
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """class name -> (fpr, tpr) one-vs-rest ROC curve, for classes with positives and negatives."""
    classes = list(classes)
    y, p = _check(y_true, probs, len(classes))
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for c, name in enumerate(classes):
        pos = y == c
        if pos.all() or not pos.any():
            continue
        fpr, tpr, _ = skm.roc_curve(pos.astype(int), p[:, c], drop_intermediate=False)
        curves[name] = (np.asarray(fpr, dtype=float), np.asarray(tpr, dtype=float))
    return curves


INTERVAL_KEYS: tuple[str, ...] = ("balanced_accuracy", "accuracy", "macro_auc")


def stratified_resamples(y_true: np.ndarray, samples: int, seed: int) -> np.ndarray:
    """(samples, N) row indices: each row a bootstrap resample that keeps every class's count,
    drawing with replacement within the class. Rows are grouped by class (class 0's draws first),
    so column ``j`` of every resample holds the same true class."""
    y = np.asarray(y_true, dtype=np.int64).reshape(-1)
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if y.size == 0:
        raise ValueError("no samples")
    rng = np.random.default_rng(seed)
    parts = []
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        parts.append(rows[rng.integers(0, rows.size, size=(samples, rows.size))])
    return np.concatenate(parts, axis=1)


def resampled_scores(
    y_true: np.ndarray, probs: np.ndarray, rows: np.ndarray, y_pred: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """:data:`INTERVAL_KEYS` -> (samples,) values, one per resample of ``rows``
    (:func:`stratified_resamples`), with the conventions of :func:`classification_metrics`:
    balanced accuracy over the classes present, macro AUC over the classes with positives and
    negatives (NaN when none), labels of ``y_pred`` (default arg-max). AUC is the Mann-Whitney
    statistic on average ranks, which equals ROC AUC with ties counted half."""
    n = np.asarray(probs).shape[1] if np.ndim(probs) == 2 else 0
    y, p, pred = _labels(y_true, probs, n, y_pred)
    rows = np.asarray(rows, dtype=np.int64)
    if rows.ndim != 2 or (rows.size and (rows.min() < 0 or rows.max() >= y.size)):
        raise ValueError(f"rows must be (samples, M) indices into {y.size} samples")
    yr = y[rows]
    correct = pred[rows] == yr
    present = [c for c in range(n) if (y == c).any()]
    recalls = [np.mean(correct, axis=1, where=yr == c) for c in present]
    aucs = []
    for c in range(n):
        pos = yr == c
        n_pos = pos.sum(axis=1)
        n_neg = pos.shape[1] - n_pos
        if not (n_pos > 0).all() or not (n_neg > 0).all():
            continue
        ranks = rankdata(p[rows, c], axis=1)
        aucs.append(((ranks * pos).sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return {
        "balanced_accuracy": np.mean(recalls, axis=0),
        "accuracy": correct.mean(axis=1),
        "macro_auc": np.mean(aucs, axis=0) if aucs else np.full(rows.shape[0], np.nan),
    }


def percentile_interval(values: np.ndarray, level: float) -> tuple[float, float]:
    """The central ``level`` percentile interval of ``values`` (NaN, NaN when any is NaN)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0 or np.isnan(v).any():
        return float("nan"), float("nan")
    lo, hi = np.quantile(v, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def bootstrap_intervals(
    y_true: np.ndarray,
    probs: np.ndarray,
    y_pred: np.ndarray | None = None,
    samples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, list[float]]:
    """:data:`INTERVAL_KEYS` -> ``[low, high]``: the ``level`` percentile interval over ``samples``
    class-stratified bootstrap resamples of the test set (see the module docstring)."""
    rows = stratified_resamples(y_true, samples, seed)
    return {k: list(percentile_interval(v, level)) for k, v in resampled_scores(y_true, probs, rows, y_pred).items()}


def paired_differences(
    y_true: np.ndarray,
    probs_a: np.ndarray,
    probs_b: np.ndarray,
    pred_a: np.ndarray | None = None,
    pred_b: np.ndarray | None = None,
    samples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Model a minus model b on the same test images, for each of :data:`INTERVAL_KEYS`:
    ``{"difference": a - b on the full set, "interval": [low, high], "a_better": share of resamples
    where a > b}``. Both models are scored on the *same* resamples (a paired bootstrap), so the
    interval is about the difference, which is much narrower than the two intervals side by side."""
    rows = stratified_resamples(y_true, samples, seed)
    ra = resampled_scores(y_true, probs_a, rows, pred_a)
    rb = resampled_scores(y_true, probs_b, rows, pred_b)
    full = np.arange(np.asarray(y_true).size)[None, :]
    fa = resampled_scores(y_true, probs_a, full, pred_a)
    fb = resampled_scores(y_true, probs_b, full, pred_b)
    out: dict[str, dict[str, Any]] = {}
    for k in INTERVAL_KEYS:
        d = ra[k] - rb[k]
        out[k] = {
            "difference": float(fa[k][0] - fb[k][0]),
            "interval": list(percentile_interval(d, level)),
            "a_better": float(np.mean(d > 0)) if not np.isnan(d).any() else float("nan"),
        }
    return out
