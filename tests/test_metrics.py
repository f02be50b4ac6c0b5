"""Classification metrics against hand-computed examples and scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from pipeline.core.metrics import classification_metrics, confusion_matrix, roc_curves
from pipeline.labels import CLASSES


def _onehotish(pred: list[int], n: int = 3, conf: float = 0.8) -> np.ndarray:
    p = np.full((len(pred), n), (1 - conf) / (n - 1))
    p[np.arange(len(pred)), pred] = conf
    return p


def test_confusion_matrix_by_hand() -> None:
    cm = confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2], 3)
    np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 1, 0], [1, 0, 2]])
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(confusion_matrix([], [], 2), np.zeros((2, 2)))
    with pytest.raises(ValueError):
        confusion_matrix([0, 3], [0, 1], 3)
    with pytest.raises(ValueError):
        confusion_matrix([0, 1], [0], 3)


def test_small_example_by_hand() -> None:
    classes = ("a", "b", "c")
    y = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    pred = [0, 0, 0, 1, 1, 0, 2, 2]
    m = classification_metrics(y, _onehotish(pred), classes)
    assert m["accuracy"] == pytest.approx(6 / 8)
    # recalls 3/4, 1/2, 1 -> mean
    assert m["balanced_accuracy"] == pytest.approx((0.75 + 0.5 + 1.0) / 3)
    assert m["recall_a"] == pytest.approx(0.75) and m["precision_a"] == pytest.approx(0.75)
    assert m["precision_b"] == pytest.approx(0.5) and m["f1_b"] == pytest.approx(0.5)
    assert m["precision_c"] == 1.0 and m["f1_c"] == 1.0
    assert (m["support_a"], m["support_b"], m["support_c"]) == (4, 2, 2)
    assert m["auc_c"] == pytest.approx(1.0)


def test_against_sklearn_random() -> None:
    rng = np.random.default_rng(0)
    n = 300
    y = rng.integers(0, 7, n)
    logits = rng.normal(size=(n, 7)) + 1.5 * np.eye(7)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = classification_metrics(y, probs)
    pred = probs.argmax(1)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["macro_auc"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    p, r, f, s = skm.precision_recall_fscore_support(y, pred, labels=range(7), zero_division=0)
    for i, c in enumerate(CLASSES):
        assert m[f"precision_{c}"] == pytest.approx(p[i])
        assert m[f"recall_{c}"] == pytest.approx(r[i])
        assert m[f"f1_{c}"] == pytest.approx(f[i])
        assert m[f"support_{c}"] == s[i]
        assert m[f"auc_{c}"] == pytest.approx(skm.roc_auc_score(y == i, probs[:, i]))
    np.testing.assert_array_equal(confusion_matrix(y, pred, 7), skm.confusion_matrix(y, pred, labels=range(7)))


def test_absent_classes_are_nan_safe() -> None:
    # only classes 0 and 5 occur; class 3 is predicted once but never true
    y = np.array([0, 0, 5, 5, 5])
    probs = np.full((5, 7), 0.01)
    probs[[0, 1, 2, 3, 4], [0, 3, 5, 5, 0]] = 0.9
    m = classification_metrics(y, probs)
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert m["recall_df"] == 0.0 and m["precision_df"] == 0.0 and m["support_df"] == 0
    assert math.isnan(m["auc_df"]) and math.isnan(m["auc_vasc"])
    assert math.isfinite(m["macro_auc"])
    assert m["macro_auc"] == pytest.approx(np.mean([m["auc_akiec"], m["auc_nv"]]))
    # one class only: no AUC defined anywhere
    m1 = classification_metrics(np.zeros(3, dtype=int), np.full((3, 7), 1 / 7))
    assert math.isnan(m1["macro_auc"]) and m1["balanced_accuracy"] == 1.0
    assert set(roc_curves(np.zeros(3, dtype=int), np.full((3, 7), 1 / 7))) == set()
    # a class that occurs but is never predicted: precision/f1 are 0.0, not NaN
    m2 = classification_metrics(np.array([0, 1, 1]), np.eye(7)[[0, 0, 0]])
    assert m2["precision_bcc"] == 0.0 and m2["f1_bcc"] == 0.0 and m2["recall_bcc"] == 0.0
    assert m2["precision_akiec"] == pytest.approx(1 / 3)


def test_keys_and_validation() -> None:
    m = classification_metrics(np.array([0, 1]), np.eye(7)[[0, 1]])
    for c in CLASSES:
        for k in ("precision", "recall", "f1", "auc", "support"):
            assert f"{k}_{c}" in m
    assert {"accuracy", "balanced_accuracy", "macro_auc"} <= set(m)
    with pytest.raises(ValueError):
        classification_metrics(np.array([0, 1]), np.eye(3)[[0, 1]])
    with pytest.raises(ValueError):
        classification_metrics(np.array([0, 9]), np.eye(7)[[0, 1]])
    with pytest.raises(ValueError):
        classification_metrics(np.array([0]), np.eye(7)[[0, 1]])


def test_roc_curves_match_sklearn() -> None:
    rng = np.random.default_rng(1)
    y = np.array([0, 1, 2, 0, 1, 2, 0, 0])
    probs = rng.random((8, 3))
    curves = roc_curves(y, probs, ("a", "b", "c"))
    assert set(curves) == {"a", "b", "c"}
    for i, c in enumerate("abc"):
        fpr, tpr = curves[c]
        efpr, etpr, _ = skm.roc_curve(y == i, probs[:, i], drop_intermediate=False)
        np.testing.assert_allclose(fpr, efpr)
        np.testing.assert_allclose(tpr, etpr)
        assert fpr[0] == 0 and tpr[-1] == 1


def test_expected_calibration_error() -> None:
    from pipeline.core.metrics import expected_calibration_error

    y = np.array([0, 1, 0, 1])
    perfect = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(y, perfect) == pytest.approx(0.0)
    # always 90 % sure, right half of the time: |0.5 - 0.9| = 0.4
    over = np.array([[0.9, 0.1], [0.9, 0.1], [0.9, 0.1], [0.9, 0.1]])
    assert expected_calibration_error(y, over) == pytest.approx(0.4)
    # two bins of two: 0.6 sure and right twice (|1 - .6|), 0.8 sure and wrong twice (|0 - .8|) -> (0.4 + 0.8) / 2
    mixed = np.array([[0.6, 0.4], [0.4, 0.6], [0.2, 0.8], [0.8, 0.2]])
    assert expected_calibration_error(y, mixed) == pytest.approx(0.6)
    from pipeline.core.metrics import classification_metrics

    assert classification_metrics(np.arange(7), np.eye(7))["ece"] == pytest.approx(0.0)
