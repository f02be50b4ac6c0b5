"""The decision rule, the pure part: class probabilities -> a predicted label.

Two rules, recorded in an export's ``config.json`` under ``decision`` and applied by
:func:`pipeline.core.inference.predicted_labels` (``predict``, the MLflow pyfunc, ``evaluate`` and
the registry gate all go through it):

``argmax``
    the class of the highest probability (ties -> lowest class index); what an export without a
    ``decision`` key uses.
``offsets``
    ``argmax(log p + offsets)``: one additive log-probability offset per class, fitted on the
    **validation** split, by one of two fits (``select.decision_rule``):

    * ``balanced`` -- :func:`fit_offsets`: seven free offsets maximising validation balanced
      accuracy (the ISIC metric);
    * ``prior`` -- :func:`fit_prior_power`: ``offsets = -tau * log(prior)``, where ``prior`` is the
      model's own class prior, estimated as its mean predicted probability on the validation split
      (Saerens et al., 2002), and the one exponent ``tau`` in ``[0, max]`` maximises validation
      balanced accuracy. Balanced accuracy is accuracy under a uniform class prior, so dividing out
      the prior the network learned (from the balanced copies *and* the class mix) is the Bayes
      decision for it; ``tau`` tempers it. One parameter instead of seven: with 9 ``df`` and 12
      ``vasc`` validation images in HAM10000, seven free offsets over-fit the validation split.
    Both correct the class prior the network learned from the balanced copies without dividing by
    the training-set prior (which over-shoots). The probabilities themselves are **not** changed: the
    reported probabilities stay the export's (the softmax, calibrated when the export carries a
    :mod:`pipeline.core.calibration` map, which is fitted first); only the label moves.

:func:`fit_offsets` is coordinate ascent over a bounded grid: starting at 0, each class in turn
takes the grid value in ``[-limit, limit]`` that maximises validation balanced accuracy with the
other offsets fixed, until a full round changes nothing (or ``rounds`` rounds). It is deterministic
and kept small on purpose: a move needs a strictly higher balanced accuracy, among equal scores the
value nearest 0 wins, the grid is bounded, and a class absent from the validation split keeps 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np

DECISION_RULES = ("argmax", "offsets")
_LOG_FLOOR = 1e-12  # log(0) guard: a probability of exactly 0 becomes log(1e-12)


def log_probs(probs: np.ndarray) -> np.ndarray:
    """``log(max(p, 1e-12))`` of an (N, C) probability array (float64)."""
    return np.log(np.maximum(np.asarray(probs, dtype=np.float64), _LOG_FLOOR))


def apply_offsets(probs: np.ndarray, offsets: np.ndarray | list[float] | None) -> np.ndarray:
    """Predicted class indices (N,) int64: ``argmax(log p + offsets)``; ``None`` = plain arg-max."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must be (N, C), got shape {p.shape}")
    if offsets is None:
        return p.argmax(axis=1).astype(np.int64)
    off = np.asarray(offsets, dtype=np.float64).reshape(-1)
    if off.shape[0] != p.shape[1] or not np.all(np.isfinite(off)):
        raise ValueError(f"offsets must be {p.shape[1]} finite numbers, got {off.tolist()}")
    return (log_probs(p) + off[None, :]).argmax(axis=1).astype(np.int64)


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Mean recall over the classes present in ``y_true`` (as :mod:`pipeline.core.metrics`)."""
    y = np.asarray(y_true, dtype=np.int64)
    pred = np.asarray(y_pred, dtype=np.int64)
    support = np.bincount(y, minlength=n_classes)
    hits = np.bincount(y[pred == y], minlength=n_classes)
    present = support > 0
    return float((hits[present] / support[present]).mean()) if present.any() else float("nan")


def _checked(y_true, probs, bound_name: str, bound: float, step: float) -> tuple[np.ndarray, np.ndarray]:
    """``(y (N,) int64, probs (N, C) float64)`` of a fit, or ValueError naming what is wrong."""
    y = np.asarray(y_true, dtype=np.int64).reshape(-1)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != y.shape[0] or y.size == 0:
        raise ValueError(f"probs must be (N, C) with N = {y.shape[0]} > 0, got shape {p.shape}")
    if not (bound >= 0 and step > 0):
        raise ValueError(f"need {bound_name} >= 0 and step > 0, got {bound_name}={bound}, step={step}")
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f"y_true values must be in 0..{p.shape[1] - 1}")
    return y, p


def fit_offsets(
    y_true: np.ndarray, probs: np.ndarray, limit: float = 2.0, step: float = 0.1, rounds: int = 10
) -> tuple[np.ndarray, dict[str, Any]]:
    """Per-class log-probability offsets maximising balanced accuracy on (``y_true``, ``probs``).

    Returns ``(offsets (C,) float64, info)`` with ``info`` = ``balanced_accuracy_argmax``,
    ``balanced_accuracy_offsets`` (both on the fitting data), ``rounds`` used. The offsets never
    leave ``[-limit, limit]`` and the fitted balanced accuracy is never below arg-max's.
    """
    y, p = _checked(y_true, probs, "limit", limit, step)
    lp = log_probs(p)
    n = lp.shape[1]
    k = int(np.floor(limit / step + 1e-9))
    grid = np.arange(-k, k + 1, dtype=np.float64) * step
    grid = grid[np.argsort(np.abs(grid), kind="stable")]  # nearest 0 first: ties keep the smallest offset
    present = np.bincount(y, minlength=n) > 0
    offsets = np.zeros(n, dtype=np.float64)
    base = balanced_accuracy(y, lp.argmax(axis=1), n)
    best = base
    used = 0
    for used in range(1, rounds + 1):
        changed = False
        for c in range(n):
            if not present[c]:
                continue
            trial = offsets.copy()
            best_v, best_s = offsets[c], best
            for v in grid:
                trial[c] = v
                s = balanced_accuracy(y, (lp + trial).argmax(axis=1), n)
                if s > best_s + 1e-12:
                    best_v, best_s = v, s
            if best_v != offsets[c]:
                offsets[c], best, changed = best_v, best_s, True
        if not changed:
            break
    offsets = np.round(offsets, 10)
    return offsets, {"balanced_accuracy_argmax": base, "balanced_accuracy_offsets": best, "rounds": used}


def fit_prior_power(
    y_true: np.ndarray, probs: np.ndarray, max_power: float = 2.0, step: float = 0.25
) -> tuple[np.ndarray, dict[str, Any]]:
    """Offsets ``-tau * log(prior)`` with ``prior`` = mean of ``probs`` (the model's class prior on
    the fitting data) and ``tau`` on the grid ``0, step, ..., max_power`` maximising balanced
    accuracy on (``y_true``, ``probs``); among equal scores the smallest ``tau`` wins (``tau = 0`` is
    arg-max, so the fitted balanced accuracy is never below arg-max's).

    Returns ``(offsets (C,) float64, info)`` with ``info`` = ``balanced_accuracy_argmax``,
    ``balanced_accuracy_offsets``, ``power`` (tau) and ``prior`` (C floats).
    """
    y, p = _checked(y_true, probs, "max_power", max_power, step)
    n = p.shape[1]
    lp = log_probs(p)
    log_prior = log_probs(p.mean(axis=0, keepdims=True))[0]
    base = balanced_accuracy(y, lp.argmax(axis=1), n)
    best_tau, best = 0.0, base
    for k in range(1, int(np.floor(max_power / step + 1e-9)) + 1):
        tau = k * step
        s = balanced_accuracy(y, (lp - tau * log_prior).argmax(axis=1), n)
        if s > best + 1e-12:
            best_tau, best = tau, s
    offsets = np.round(-best_tau * log_prior, 10) + 0.0  # + 0.0: no -0.0 in config.json
    return offsets, {"balanced_accuracy_argmax": base, "balanced_accuracy_offsets": best,
                     "power": round(best_tau, 10), "prior": [float(v) for v in np.exp(log_prior)]}  # fmt: skip


def fit_rule(rule: str, y_true: np.ndarray, probs: np.ndarray, select: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """The offsets of decision rule ``rule`` (``balanced`` | ``prior``) fitted on (``y_true``,
    ``probs``), with the grids of ``select`` (the config's ``select`` section)."""
    if rule == "prior":
        return fit_prior_power(y_true, probs, select.prior_power_max, select.prior_power_step)
    if rule == "balanced":
        return fit_offsets(y_true, probs, select.offset_limit, select.offset_step)
    raise ValueError(f"unknown decision rule {rule!r}; choose balanced or prior")


def decision_meta(offsets: np.ndarray | None) -> dict[str, Any]:
    """The ``decision`` entry of an export's ``config.json``."""
    if offsets is None:
        return {"rule": "argmax", "offsets": None}
    return {"rule": "offsets", "offsets": [float(v) for v in offsets]}


def offsets_of(meta: dict[str, Any]) -> np.ndarray | None:
    """The offsets an export's ``config.json`` records (``None``: arg-max, also for old exports)."""
    decision = meta.get("decision") or {}
    if decision.get("rule", "argmax") == "argmax":
        return None
    return np.asarray(decision["offsets"], dtype=np.float64)
