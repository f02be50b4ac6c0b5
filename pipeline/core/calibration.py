"""Probability calibration, the pure part: the network's probabilities -> calibrated probabilities.

The twin is trained on class-balanced copies (a `df` image up to 20 times) with a focal loss, and
its export averages the softmax of 8 views (``select.tta: flips``): its probabilities are neither
the test set's class mix nor sharp enough. A clinician reads those numbers, and the
model card quotes them, so the export can carry a calibration map fitted on the **validation**
split and applied to every probability it reports (``predict``, the MLflow pyfunc, ``evaluate``,
the registry gate), recorded in ``config.json`` under ``calibration``:

``none``
    the probabilities as the network gives them (what an export without the key uses).
``temperature``
    temperature scaling (Guo et al., ICML 2017): ``softmax(log p / T)``, one ``T`` > 0.
``temperature_bias``
    bias-corrected temperature scaling (Alexandari, Kundaje & Shrikumar, ICML 2020):
    ``softmax(log p / T + b)`` with one additive bias per class. The biases move the class mix the
    balanced copies taught the network back to the one of the data (val split's), which a single
    temperature cannot do.

Choices where the method is silent, written down here:

* The map acts on the log of the probabilities the export reports (after view averaging), not on
  per-view logits, so it composes with any ``tta`` and is fitted on exactly the numbers it maps.
* Fit: maximum likelihood (mean negative log-likelihood) on the val split. In ``a = 1/T`` and ``b``
  the objective is convex, so it is solved by damped Newton steps with a backtracking line search:
  deterministic, no random start, the same numbers on every machine up to float64 rounding. A small
  ridge (:data:`BIAS_RIDGE`) on the biases makes the optimum unique (softmax ignores a common shift
  of all biases) and keeps the bias of a class with very few val images finite.
* A class absent from the val split has no likelihood to fit: the fit maximises the likelihood of
  the val labels among the classes val has (the softmax over those classes; over all seven, the
  other biases would rise together until the absent class is never predicted), and the absent class
  keeps bias 0, the mean of the fitted biases (the ridge centres them), i.e. the network's own
  standing against the others.
* ``T`` is kept within ``[1 / A_MAX, 1 / A_MIN]`` (0.05 to 20): when the unconstrained optimum falls
  outside (a barely trained or anti-informative model), ``1/T`` is fixed at the nearer bound and
  only the biases are fitted.

It calibrates to the class mix of the val split: on a source whose mix differs, the calibrated
numbers can be further off than the raw ones.

The decision rule (:mod:`pipeline.core.decision`) is fitted after, on the calibrated val
probabilities, so the labels the export decides are the ones its reported probabilities support.
The ranking per class can move slightly (a per-class bias and a common temperature are not monotone
maps of one class's probability across images), so macro AUC is reported on the calibrated numbers
as well.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.core.decision import log_probs

CALIBRATIONS = ("none", "temperature", "temperature_bias")
BIAS_RIDGE = 1e-4  # ridge weight on the biases (per class, on the mean NLL scale)
A_MIN, A_MAX = 0.05, 20.0  # bounds of 1/T
_MAX_STEPS = 100
_TOL = 1e-10


def apply_calibration(probs: np.ndarray, temperature: float = 1.0, bias: np.ndarray | list[float] | None = None) -> np.ndarray:
    """``softmax(log p / temperature + bias)`` of an (N, C) probability array, float64, rows summing to 1.
    ``temperature`` 1 and ``bias`` None is the identity (up to rounding)."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must be (N, C), got shape {p.shape}")
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    b = np.zeros(p.shape[1]) if bias is None else np.asarray(bias, dtype=np.float64).reshape(-1)
    if b.shape[0] != p.shape[1] or not np.all(np.isfinite(b)):
        raise ValueError(f"bias must be {p.shape[1]} finite numbers, got {b.tolist()}")
    return _softmax(log_probs(p) / float(temperature) + b[None, :])


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _logits(lp: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """``a * lp + b`` for ``theta = [a]`` (temperature only) or ``[a, b_1 .. b_C]``."""
    return theta[0] * lp + (theta[1:][None, :] if theta.shape[0] > 1 else 0.0)


def _objective(lp: np.ndarray, y: np.ndarray, theta: np.ndarray) -> float:
    """Mean NLL of ``softmax(a * lp + b)`` plus the bias ridge."""
    z = _logits(lp, theta)
    zmax = z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z - zmax).sum(axis=1)) + zmax[:, 0]
    return float((lse - z[np.arange(len(y)), y]).mean() + BIAS_RIDGE * float(theta[1:] @ theta[1:]))


def _newton(lp: np.ndarray, y: np.ndarray, theta: np.ndarray, fit_a: bool) -> np.ndarray:
    """Damped Newton on :func:`_objective` over ``theta`` (``a`` held when not ``fit_a``)."""
    n, c = lp.shape
    onehot = np.zeros((n, c))
    onehot[np.arange(n), y] = 1.0
    # d z_k / d theta_j: lp_k for a, and 1 for the bias of class k
    feats = np.zeros((n, c, theta.shape[0]))
    feats[:, :, 0] = lp
    if theta.shape[0] > 1:
        feats[:, np.arange(c), 1 + np.arange(c)] = 1.0
    ridge = np.full(theta.shape[0], 2 * BIAS_RIDGE)
    ridge[0] = 0.0
    mask = np.ones(theta.shape[0], dtype=bool)
    mask[0] = fit_a
    f = _objective(lp, y, theta)
    for _ in range(_MAX_STEPS):
        q = _softmax(_logits(lp, theta))
        mean_feat = np.einsum("nk,nkj->nj", q, feats)
        grad = np.einsum("nk,nkj->j", q - onehot, feats) / n + ridge * theta
        hess = (np.einsum("nk,nkj,nki->ji", q, feats, feats) - mean_feat.T @ mean_feat) / n + np.diag(ridge)
        g, h = grad[mask], hess[np.ix_(mask, mask)]
        if g.size == 0 or float(np.abs(g).max()) < _TOL:
            break
        step = np.zeros_like(theta)
        step[mask] = -np.linalg.solve(h + 1e-12 * np.eye(g.size), g)
        t = 1.0
        while t > 1e-8:
            trial = theta + t * step
            f_trial = _objective(lp, y, trial)
            if f_trial <= f + 1e-4 * t * float(g @ step[mask]):
                break
            t *= 0.5
        else:
            break
        theta, f = trial, f_trial
    return theta


def fit_calibration(y_true: np.ndarray, probs: np.ndarray, method: str) -> tuple[float, np.ndarray, dict[str, Any]]:
    """``(temperature, bias (C,), info)`` of ``method`` (:data:`CALIBRATIONS`) fitted on (``y_true``, ``probs``).

    ``info``: ``nll_before`` and ``nll_after`` (mean negative log-likelihood on the fitting data,
    without the ridge), ``temperature_bounded`` (True when ``1/T`` sits at a bound). ``none`` gives
    ``(1.0, zeros, info)``.
    """
    if method not in CALIBRATIONS:
        raise ValueError(f"unknown calibration {method!r}; known: {list(CALIBRATIONS)}")
    y = np.asarray(y_true, dtype=np.int64).reshape(-1)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != y.shape[0] or y.size == 0:
        raise ValueError(f"probs must be (N, C) with N = {y.shape[0]} > 0, got shape {p.shape}")
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f"y_true values must be in 0..{p.shape[1] - 1}")
    if not np.all(np.isfinite(p)):
        raise ValueError("probs must be finite")
    lp = log_probs(p)
    c = p.shape[1]
    present = np.bincount(y, minlength=c) > 0
    # the likelihood of the val labels among the classes val has (see the module docstring)
    lp_fit, y_fit = lp[:, present], np.cumsum(present)[y] - 1
    theta = np.zeros(1 + (int(present.sum()) if method == "temperature_bias" else 0))
    theta[0] = 1.0
    before = _nll(lp, y)
    theta = _newton(lp_fit, y_fit, theta, fit_a=method != "none")
    bounded = not (A_MIN <= theta[0] <= A_MAX)
    if bounded:
        theta[0] = min(max(theta[0], A_MIN), A_MAX)
        theta = _newton(lp_fit, y_fit, theta, fit_a=False)
    bias = np.zeros(c)
    if theta.shape[0] > 1:
        bias[present] = theta[1:]
    temperature = float(np.round(1.0 / theta[0], 10))
    bias = np.round(bias, 10) + 0.0  # + 0.0: no -0.0 in config.json
    after = _nll(log_probs(apply_calibration(p, temperature, bias)), y)
    return temperature, bias, {"nll_before": before, "nll_after": after, "temperature_bounded": bounded}


def _nll(lp: np.ndarray, y: np.ndarray) -> float:
    return float(-lp[np.arange(len(y)), y].mean())


def calibration_meta(method: str, temperature: float, bias: np.ndarray) -> dict[str, Any]:
    """The ``calibration`` entry of an export's ``config.json``."""
    return {"method": method, "temperature": float(temperature), "bias": [float(v) for v in bias]}


def calibration_of(meta: dict[str, Any]) -> tuple[float, np.ndarray | None]:
    """``(temperature, bias)`` an export's ``config.json`` records; ``(1.0, None)`` (identity) when
    it records none (older exports, ``select.calibration: none``)."""
    cal = meta.get("calibration") or {}
    if cal.get("method", "none") == "none":
        return 1.0, None
    return float(cal["temperature"]), np.asarray(cal["bias"], dtype=np.float64)
