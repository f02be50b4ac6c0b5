"""Per-source metrics and confusion matrices (pipeline.core.metrics.per_group_metrics, the evaluate
stage's site_* keys and metrics_detail.json), on small project-made arrays and a tiny trained model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.core.evaluation import detail_report, site_flat_metrics
from pipeline.core.metrics import classification_metrics, per_group_metrics, subset_metrics
from pipeline.labels import CLASSES

C3 = ("a", "b", "c")


def _onehot(pred: list[int], n: int = 3, conf: float = 0.8) -> np.ndarray:
    p = np.full((len(pred), n), (1 - conf) / (n - 1))
    p[np.arange(len(pred)), pred] = conf
    return p


def test_per_group_metrics_only_present_classes():
    y = np.array([0, 0, 1, 1, 0, 0, 2, 2])
    pred = [0, 1, 1, 1, 0, 2, 2, 2]
    groups = ["s1"] * 4 + ["s2"] * 4
    out = per_group_metrics(y, _onehot(pred), groups, C3)
    assert list(out) == ["s1", "s2"]
    s1, s2 = out["s1"], out["s2"]
    assert s1["n"] == 4 and s1["classes_present"] == ["a", "b"]
    assert s1["recall"] == {"a": 0.5, "b": 1.0}  # class c absent: not listed, not averaged
    assert s1["balanced_accuracy"] == pytest.approx(0.75) and s1["accuracy"] == pytest.approx(0.75)
    assert s1["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [0, 0, 0]]
    assert s2["recall"] == {"a": 0.5, "c": 1.0} and s2["balanced_accuracy"] == pytest.approx(0.75)
    # AUC over the classes with positives and negatives in the subset: a and b in s1 (c has no positives)
    full = classification_metrics(y[:4], _onehot(pred)[:4], C3)
    assert s1["macro_auc"] == pytest.approx(np.nanmean([full["auc_a"], full["auc_b"]]))
    assert math.isnan(full["auc_c"])


def test_single_class_subset_has_no_auc_and_predicting_an_absent_class_is_an_error():
    y = np.array([1, 1, 1])
    out = subset_metrics(y, _onehot([1, 1, 2]), C3)  # c is absent but predicted once
    assert out["classes_present"] == ["b"] and out["balanced_accuracy"] == pytest.approx(2 / 3)
    assert math.isnan(out["macro_auc"])
    flat = site_flat_metrics({"x": out})
    assert flat["site_x_macro_auc"] is None and flat["site_x_n"] == 3
    assert set(flat) == {f"site_x_{k}" for k in ("n", "balanced_accuracy", "accuracy", "macro_auc", "ece")}


def test_per_group_metrics_checks_lengths():
    with pytest.raises(ValueError, match="differ in length"):
        per_group_metrics(np.array([0, 1]), _onehot([0, 1]), ["s1"], C3)


def test_detail_report_is_strict_json():
    y = np.array([0, 1, 1])
    probs = _onehot([0, 1, 0])
    rep = detail_report(C3, subset_metrics(y, probs, C3), per_group_metrics(y, probs, ["u", "u", "v"], C3))
    text = json.dumps(rep, allow_nan=False)
    back = json.loads(text)
    assert back["classes"] == list(C3) and back["per_source"]["v"]["macro_auc"] is None
    assert back["overall"]["confusion_matrix"] == [[1, 0, 0], [1, 1, 0], [0, 0, 0]]


def test_evaluate_writes_per_source_metrics(tmp_path: Path):
    from test_train import make_work, tiny_cfg

    from pipeline.stages.evaluate import run_evaluate
    from pipeline.stages.select import run_select
    from pipeline.stages.train import run_train

    layout = make_work(tmp_path / "w")
    cfg = tiny_cfg(tmp_path / "w", **{"train.epochs": 1, "evaluate.cam_per_class": 0})
    aug = pd.read_parquet(layout.augmented_manifest)
    # the validated manifest names each original's site: two sites, every class in each
    sites = ["clinic_a" if int(i.rsplit("_", 1)[1]) % 2 == 0 else "clinic_b" for i in aug["image_id"]]
    manifest = pd.DataFrame({"image_id": aug["image_id"], "path": aug["path"], "label": aug["label"],
                             "group_id": aug["group_id"], "split": aug["split"], "width": 32, "height": 32,
                             "sha256": "0" * 64, "source_site": sites})  # fmt: skip
    manifest.to_parquet(layout.validated_manifest, index=False)
    run_train(cfg)
    run_select(cfg)
    run_evaluate(cfg)
    metrics = json.loads(layout.metrics.read_text())
    assert metrics["site_clinic_a_n"] == metrics["site_clinic_b_n"] == 7
    detail = json.loads(layout.metrics_detail.read_text())
    assert detail["classes"] == list(CLASSES) and set(detail["per_source"]) == {"clinic_a", "clinic_b"}
    assert np.array(detail["overall"]["confusion_matrix"]).sum() == 14
    a = detail["per_source"]["clinic_a"]
    assert a["balanced_accuracy"] == pytest.approx(metrics["site_clinic_a_balanced_accuracy"])
    assert set(a["recall"]) == set(CLASSES)


def test_decision_rule_labels_drive_the_label_metrics():
    y = np.array([0, 0, 1, 1])
    probs = _onehot([0, 0, 0, 0], conf=0.6)
    by_argmax = subset_metrics(y, probs, C3)
    ruled = per_group_metrics(y, probs, ["s"] * 4, C3, y_pred=np.array([0, 0, 1, 0]))["s"]
    assert by_argmax["balanced_accuracy"] == pytest.approx(0.5)
    assert ruled["balanced_accuracy"] == pytest.approx(0.75) and ruled["confusion_matrix"][1] == [1, 1, 0]
    assert ruled["macro_auc"] == by_argmax["macro_auc"] and ruled["ece"] == by_argmax["ece"]  # from probabilities
    with pytest.raises(ValueError, match="y_pred has 3 labels for 4 samples"):
        subset_metrics(y, probs, C3, y_pred=np.array([0, 0, 1]))
