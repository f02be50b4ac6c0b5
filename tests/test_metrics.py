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


# ----------------------------------------------------------------------------- bootstrap intervals


def _scored(rng: np.random.Generator, n: int, counts: tuple[float, ...] = (0.02, 0.05, 0.1, 0.03, 0.15, 0.6, 0.05)):
    """Labels with a HAM-like class mix and rounded (tied) probabilities that rank the true class up."""
    y = rng.choice(len(counts), size=n, p=np.asarray(counts) / sum(counts))
    logits = rng.normal(size=(n, len(counts)))
    logits[np.arange(n), y] += 1.5
    p = np.exp(np.round(logits, 1))
    return y, p / p.sum(axis=1, keepdims=True)


def test_resampled_scores_of_the_whole_set_are_the_reported_metrics() -> None:
    from pipeline.core.metrics import resampled_scores

    rng = np.random.default_rng(3)
    y, p = _scored(rng, 500)
    p = np.round(p, 2)  # many ties within each class column
    y[y == 3] = 4  # one class absent from the test set: left out of BA and macro AUC, as reported
    rule = p.argmax(axis=1)
    rule[::7] = 5
    for pred in (None, rule):
        m = classification_metrics(y, p, y_pred=pred)
        s = resampled_scores(y, p, np.arange(y.size)[None, :], pred)
        for key in ("balanced_accuracy", "accuracy", "macro_auc"):  # AUC from ranks, ties counted half
            assert s[key].shape == (1,) and s[key][0] == pytest.approx(m[key], abs=1e-12), key


def test_stratified_resamples_keep_each_class_count_and_are_seeded() -> None:
    from pipeline.core.metrics import stratified_resamples

    y = np.array([5, 0, 5, 5, 2, 0, 5, 2, 5])
    rows = stratified_resamples(y, 200, seed=4)
    assert rows.shape == (200, y.size)
    assert (y[rows] == y[rows[0]][None, :]).all()  # column j: the same class in every resample
    assert all((np.bincount(y[r], minlength=7) == np.bincount(y, minlength=7)).all() for r in rows)
    assert len({tuple(r) for r in rows}) > 150  # drawn with replacement within the class, not a fixed order
    assert (stratified_resamples(y, 200, seed=4) == rows).all()
    assert not (stratified_resamples(y, 200, seed=5) == rows).all()
    with pytest.raises(ValueError, match="samples"):
        stratified_resamples(y, 0, seed=0)


def test_interval_of_balanced_accuracy_has_the_binomial_width() -> None:
    """Class-stratified: BA = mean of K recalls, each a binomial share of its class, so the
    resampled BA has standard deviation sqrt(sum r_c (1 - r_c) / n_c) / K."""
    from pipeline.core.metrics import bootstrap_intervals, resampled_scores, stratified_resamples

    rng = np.random.default_rng(8)
    y, p = _scored(rng, 1000)
    pred = p.argmax(axis=1)
    sd = resampled_scores(y, p, stratified_resamples(y, 2000, seed=1), pred)["balanced_accuracy"].std()
    recall = np.array([np.mean(pred[y == c] == c) for c in range(7)])
    n = np.bincount(y, minlength=7)
    assert sd == pytest.approx(np.sqrt(np.sum(recall * (1 - recall) / n)) / 7, rel=0.08)

    ci = bootstrap_intervals(y, p, pred, samples=500, level=0.95, seed=0)
    m = classification_metrics(y, p)
    for key in ("balanced_accuracy", "accuracy", "macro_auc"):
        lo, hi = ci[key]
        assert lo < m[key] < hi, key
    narrow = bootstrap_intervals(y, p, pred, samples=500, level=0.5, seed=0)["balanced_accuracy"]
    assert ci["balanced_accuracy"][0] < narrow[0] < narrow[1] < ci["balanced_accuracy"][1]
    y_small, p_small = _scored(rng, 100)
    small = bootstrap_intervals(y_small, p_small, samples=500, seed=0)["balanced_accuracy"]
    assert small[1] - small[0] > 1.5 * (ci["balanced_accuracy"][1] - ci["balanced_accuracy"][0])  # 10x fewer images
    with pytest.raises(ValueError, match="level"):
        bootstrap_intervals(y, p, level=1.0)


def test_paired_differences_see_a_better_model_that_the_two_intervals_cannot() -> None:
    from pipeline.core.metrics import bootstrap_intervals, paired_differences

    rng = np.random.default_rng(11)
    y, p = _scored(rng, 600)
    pred_b = p.argmax(axis=1)
    pred_a = pred_b.copy()
    wrong = np.flatnonzero(pred_a != y)
    pred_a[wrong[:: 6]] = y[wrong[:: 6]]  # a corrects one in six of b's errors, and nothing else changes
    d = paired_differences(y, p, p, pred_a, pred_b, samples=500, seed=0)["balanced_accuracy"]
    full = classification_metrics(y, p, y_pred=pred_a)["balanced_accuracy"] - classification_metrics(y, p)[
        "balanced_accuracy"]
    assert d["difference"] == pytest.approx(full) and d["difference"] > 0
    assert 0 <= d["interval"][0] <= d["difference"] <= d["interval"][1] and d["a_better"] > 0.95
    a, b = (bootstrap_intervals(y, p, pr, samples=500, seed=0)["balanced_accuracy"] for pr in (pred_a, pred_b))
    assert a[0] < b[1]  # side by side the two intervals overlap; paired, the difference is clear

    back = paired_differences(y, p, p, pred_b, pred_a, samples=500, seed=0)["balanced_accuracy"]
    assert back["difference"] == pytest.approx(-d["difference"])
    assert back["interval"] == pytest.approx([-d["interval"][1], -d["interval"][0]])
    same = paired_differences(y, p, p, pred_b, pred_b, samples=200, seed=0)
    assert all(same[k]["interval"] == [0.0, 0.0] and same[k]["a_better"] == 0.0 for k in same)
