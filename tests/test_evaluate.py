"""Evaluate stage: metrics.json contract, plots, CAM samples, reusable score_model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_train import make_work, tiny_cfg

from pipeline.labels import CLASSES


def test_select_cam_samples_picks_confident_correct_and_wrong() -> None:
    from pipeline.core.evaluation import select_cam_samples

    y = np.array([0, 0, 0, 1, 1])
    probs = np.array(
        [
            [0.9, 0.1],  # correct, conf .9
            [0.6, 0.4],  # correct, conf .6
            [0.2, 0.8],  # wrong (pred 1), conf .8
            [0.3, 0.7],  # correct
            [0.55, 0.45],  # wrong
        ]
    )
    assert select_cam_samples(y, probs, 1) == [(0, "correct", 0), (0, "wrong", 2), (1, "correct", 3), (1, "wrong", 4)]
    assert len(select_cam_samples(y, probs, 5)) == 5
    assert select_cam_samples(y, probs, 0) == []


def test_flat_metrics_strict_json() -> None:
    from pipeline.core.evaluation import flat_metrics

    out = flat_metrics({"accuracy": np.float64(0.5), "auc_df": float("nan"), "support_df": np.int64(0)},
                       {"selected_branch": 2, "params_train": 10, "other": "x"}, 12)
    assert out == {"accuracy": 0.5, "auc_df": None, "support_df": 0, "selected_branch": 2, "params_train": 10,
                   "test_images": 12}
    json.dumps(out, allow_nan=False)


def test_train_select_evaluate_chain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.io.modelstore import load_exported
    from pipeline.io.scoring import score_model
    from pipeline.stages.evaluate import run_evaluate
    from pipeline.stages.select import run_select
    from pipeline.stages.train import run_train

    layout = make_work(tmp_path / "w")
    cfg = tiny_cfg(tmp_path / "w", **{"train.epochs": 1, "evaluate.cam_per_class": 1})
    run_train(cfg)
    run_select(cfg)
    summary = run_evaluate(cfg)

    metrics = json.loads(layout.metrics.read_text())
    for key in ("accuracy", "balanced_accuracy", "macro_auc", "params_inference", "params_train",
                "selected_branch", "val_loss_branch1", "val_loss_branch2"):
        assert key in metrics, key
    for cls in CLASSES:
        assert f"recall_{cls}" in metrics
    assert metrics["selected_branch"] in (1, 2)
    assert 0.0 <= metrics["balanced_accuracy"] <= 1.0
    assert summary["test_images"] == metrics["test_images"] == 14
    # bootstrap intervals (evaluate.bootstrap_samples, default 1000) around the reported figures
    assert metrics["ci_level"] == cfg.evaluate.ci_level == 0.95
    for key in ("balanced_accuracy", "accuracy", "macro_auc"):
        assert metrics[f"{key}_ci_low"] <= metrics[key] <= metrics[f"{key}_ci_high"], key
    detail = json.loads(layout.metrics_detail.read_text())["overall"]["intervals"]
    assert detail["samples"] == 1000 and detail["balanced_accuracy"] == [
        metrics["balanced_accuracy_ci_low"], metrics["balanced_accuracy_ci_high"]]

    for name in ("confusion_matrix.png", "roc.png", "confusion.csv"):
        assert (layout.plots_dir / name).is_file(), name
    conf = pd.read_csv(layout.plots_dir / "confusion.csv")
    assert list(conf.columns) == ["actual", "predicted"] and len(conf) == 14

    pred = pd.read_csv(layout.reports_dir / "predictions_test.csv")
    assert len(pred) == 14
    assert np.allclose(pred[list(CLASSES)].sum(axis=1), 1.0, atol=1e-6)
    assert pred["correct"].mean() == pytest.approx(metrics["accuracy"])
    from pipeline.core.metrics import bootstrap_intervals
    from pipeline.labels import CLASS_TO_INDEX

    # the intervals are of the reported labels (the export's rule), seeded by the run's seed
    y_csv, pred_csv = (pred[c].map(CLASS_TO_INDEX).to_numpy() for c in ("label", "predicted"))
    again_ci = bootstrap_intervals(y_csv, pred[list(CLASSES)].to_numpy(), pred_csv, 1000, 0.95, cfg.seed)
    assert again_ci["balanced_accuracy"] == pytest.approx(
        [metrics["balanced_accuracy_ci_low"], metrics["balanced_accuracy_ci_high"]])

    cams = sorted(p.name for p in layout.cam_dir.glob("*.png") if p.name != "grid.png")
    assert (layout.cam_dir / "grid.png").is_file()
    assert 1 <= len(cams) <= 2 * len(CLASSES)
    pattern = re.compile(rf"^({'|'.join(CLASSES)})_(correct|wrong)_test_\w+\.png$")
    assert all(pattern.match(c) for c in cams), cams
    per = pd.Series([c.split("_")[0] + "_" + c.split("_")[1] for c in cams]).value_counts()
    assert per.max() == 1  # cam_per_class = 1
    for c in cams:  # "correct" files are correct predictions, "wrong" ones wrong
        cls, kind, image_id = c[:-4].split("_", 2)
        row = pred.set_index("image_id").loc[image_id]
        assert row["label"] == cls and bool(row["correct"]) == (kind == "correct")

    # score_model is reusable on any manifest and agrees with the stage
    aug = pd.read_parquet(layout.augmented_manifest)
    test = aug[aug["split"] == "test"].reset_index(drop=True)
    again, probs = score_model(load_exported(layout.export_dir), test, layout.augmented_dir, cfg)
    assert again["accuracy"] == pytest.approx(metrics["accuracy"])
    assert probs.shape == (14, 7)

    # the intervals are seeded (the same again) and can be turned off
    run_evaluate(cfg)
    assert json.loads(layout.metrics.read_text()) == metrics
    run_evaluate(tiny_cfg(tmp_path / "w", **{"train.epochs": 1, "evaluate.cam_per_class": 1,
                                             "evaluate.bootstrap_samples": 0}))  # fmt: skip
    plain = json.loads(layout.metrics.read_text())
    assert not any("_ci_" in k or k == "ci_level" for k in plain) and plain["accuracy"] == metrics["accuracy"]
    assert "intervals" not in json.loads(layout.metrics_detail.read_text())["overall"]

    # a decision rule other than arg-max: the intervals follow the labels the stage reports
    import pipeline.stages.evaluate as evaluate_stage

    monkeypatch.setattr(evaluate_stage, "predicted_labels", lambda _model, p: np.arange(p.shape[0]) % p.shape[1])
    run_evaluate(cfg)
    shifted = json.loads(layout.metrics.read_text())
    rule_pred = pd.read_csv(layout.reports_dir / "predictions_test.csv")["predicted"].map(CLASS_TO_INDEX).to_numpy()
    assert (rule_pred == np.arange(14) % 7).all()
    rule_ci = bootstrap_intervals(y_csv, pred[list(CLASSES)].to_numpy(), rule_pred, 1000, 0.95, cfg.seed)
    assert [shifted["balanced_accuracy_ci_low"], shifted["balanced_accuracy_ci_high"]] == pytest.approx(
        rule_ci["balanced_accuracy"])
    assert [shifted["accuracy_ci_low"], shifted["accuracy_ci_high"]] == pytest.approx(rule_ci["accuracy"])
