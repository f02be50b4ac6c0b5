"""bench/compare.py: two benchmark runs' prediction files paired on the same images."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT

from pipeline.core.evaluation import PREDICTION_COLUMNS, predictions_frame
from pipeline.core.metrics import classification_metrics
from pipeline.labels import CLASSES


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


compare = _load("compare")


def _run(work: Path, y: np.ndarray, probs: np.ndarray, run: str = "ham10000-holdout", model: str = "twin",
         kind: str = "test", ids=None) -> Path:
    folder = work / run / "reports" / "bench"
    folder.mkdir(parents=True, exist_ok=True)
    ids = ids if ids is not None else [f"ISIC_{i:07d}" for i in range(len(y))]
    path = folder / f"predictions_{model}_{kind}.csv"
    predictions_frame(ids, y, probs.argmax(axis=1), probs).to_csv(path, index=False)
    return path


def _data(seed: int, n: int = 140, skill: float = 1.0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % len(CLASSES)
    logits = rng.normal(size=(n, len(CLASSES)))
    logits[np.arange(n), y] += skill
    p = np.exp(logits)
    return y, p / p.sum(axis=1, keepdims=True)


def test_predictions_frame_has_the_contract_columns_and_checks_shapes():
    y, p = _data(0, 14)
    df = predictions_frame([str(i) for i in range(14)], y, p.argmax(axis=1), p)
    assert tuple(df.columns) == PREDICTION_COLUMNS
    assert df["correct"].tolist() == (y == p.argmax(axis=1)).astype(int).tolist()
    with pytest.raises(ValueError, match="do not match"):
        predictions_frame(["a"], y, p.argmax(axis=1), p)


def test_pairs_every_common_file_and_the_difference_is_a_minus_b(tmp_path: Path):
    y, pa = _data(1, skill=2.0)
    _, pb = _data(2, skill=0.5)
    for model in ("twin", "single_branch_ce"):
        _run(tmp_path / "a", y, pa, model=model)
    _run(tmp_path / "b", y, pb)  # only the twin in B
    # B's rows in another order: matched by image id, not by position
    path_b = tmp_path / "b" / "ham10000-holdout" / "reports" / "bench" / "predictions_twin_test.csv"
    pd.read_csv(path_b).iloc[::-1].to_csv(path_b, index=False)
    rows = compare.compare(tmp_path / "a", tmp_path / "b", samples=300)
    assert [(r["run"], r["model"], r["set"], r["n"]) for r in rows] == [("ham10000-holdout", "twin", "test", 140)]
    d = rows[0]["a_minus_b"]
    full_a, full_b = classification_metrics(y, pa), classification_metrics(y, pb)
    for key in compare.KEYS:
        assert d[key]["difference"] == pytest.approx(full_a[key] - full_b[key])
        lo, hi = d[key]["interval"]
        assert lo <= d[key]["difference"] <= hi
    assert d["macro_auc"]["interval"][0] > 0 and d["balanced_accuracy"]["a_better"] > 0.99  # A clearly ahead
    text = compare.format_rows(rows)
    assert "ham10000-holdout" in text and "A ahead" in text
    # B minus A is the mirror image
    back = compare.compare(tmp_path / "b", tmp_path / "a", samples=300)[0]["a_minus_b"]
    assert back["accuracy"]["difference"] == pytest.approx(-d["accuracy"]["difference"])


def test_the_external_set_scores_the_classes_it_has(tmp_path: Path):
    y, pa = _data(3, n=120)
    keep = y != CLASSES.index("akiec")
    _, pb = _data(4, n=120)
    _run(tmp_path / "a", y[keep], pa[keep], kind="external")
    _run(tmp_path / "b", y[keep], pb[keep], kind="external")
    (row,) = compare.compare(tmp_path / "a", tmp_path / "b", samples=200)
    assert row["set"] == "external" and row["n"] == int(keep.sum())
    assert np.isfinite(row["a_minus_b"]["macro_auc"]["difference"])


def test_different_images_or_labels_are_an_error_naming_both_files(tmp_path: Path, capsys):
    y, p = _data(5)
    a = _run(tmp_path / "a", y, p)
    b = _run(tmp_path / "b", y, p, ids=[f"OTHER_{i}" for i in range(len(y))])
    assert compare.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert str(a) in err and str(b) in err and "different images" in err
    y2 = y.copy()
    y2[3] = (y2[3] + 1) % len(CLASSES)
    _run(tmp_path / "c", y2, p)
    assert compare.main([str(tmp_path / "a"), str(tmp_path / "c")]) == 2
    assert "different true classes" in capsys.readouterr().err


def test_a_damaged_file_or_nothing_in_common_is_a_clear_error(tmp_path: Path, capsys):
    y, p = _data(6)
    _run(tmp_path / "a", y, p)
    bad = _run(tmp_path / "b", y, p)
    bad.write_text(bad.read_text().replace("image_id,label", "image_id,lbl", 1))
    assert compare.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert str(bad) in capsys.readouterr().err
    _run(tmp_path / "b", y, np.full_like(p, 1.5))
    assert compare.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "within [0, 1]" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert compare.main([str(tmp_path / "a"), str(tmp_path / "empty")]) == 2
    assert "no prediction file in common" in capsys.readouterr().err


def test_cli_prints_and_writes_json(tmp_path: Path, capsys):
    y, p = _data(7)
    _run(tmp_path / "a", y, p)
    _run(tmp_path / "b", y, p)
    out = tmp_path / "cmp.json"
    assert compare.main([str(tmp_path / "a"), str(tmp_path / "b"), "--samples", "50", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["a_minus_b"]["balanced_accuracy"]["difference"] == 0.0  # the same model: no difference
    assert "A minus B" in capsys.readouterr().out


def test_runs_on_other_training_data_pair_by_split_and_on_the_sets_asked_for(tmp_path: Path, capsys):
    y, pa = _data(8, skill=2.0)
    _, pb = _data(9, skill=0.5)
    ids_a = [f"ISIC_{i:07d}" for i in range(len(y))]
    _run(tmp_path / "a", y, pa, run="ham10000+isic-holdout")
    _run(tmp_path / "a", y, pa, run="ham10000+isic-random", kind="external")
    _run(tmp_path / "a", y, pa, run="ham10000+isic-random", ids=[i + "x" for i in ids_a])  # other test images
    _run(tmp_path / "b", y, pb, run="ham10000-holdout")
    _run(tmp_path / "b", y, pb, run="ham10000-random", kind="external")
    _run(tmp_path / "b", y, pb, run="ham10000-random")
    with pytest.raises(compare.DataError, match="no prediction file in common"):
        compare.compare(tmp_path / "a", tmp_path / "b", samples=50)  # the folders' names differ
    with pytest.raises(compare.DataError, match="different images"):
        compare.compare(tmp_path / "a", tmp_path / "b", samples=50, by_split=True)  # the random test sets differ
    rows = compare.compare(tmp_path / "a", tmp_path / "b", samples=50, by_split=True, sets=("external",))
    assert [(r["run"], r["set"]) for r in rows] == [("random", "external")]
    assert rows[0]["a_minus_b"]["accuracy"]["difference"] == pytest.approx(
        classification_metrics(y, pa)["accuracy"] - classification_metrics(y, pb)["accuracy"])
    assert compare.main([str(tmp_path / "a"), str(tmp_path / "b"), "--samples", "50", "--by-split",
                         "--sets", "test"]) == 2  # fmt: skip
    assert "different images" in capsys.readouterr().err
    (tmp_path / "b" / "ham10000-random").rename(tmp_path / "b" / "keep")
    rows = compare.compare(tmp_path / "a", tmp_path / "b", samples=50, by_split=True, sets=("test",))
    assert [(r["run"], r["set"]) for r in rows] == [("holdout", "test")]
    # two runs of one split under one folder cannot be told apart by split
    _run(tmp_path / "b", y, pb, run="ham10000+isic-holdout")
    with pytest.raises(compare.DataError, match="both split 'holdout'"):
        compare.compare(tmp_path / "a", tmp_path / "b", samples=50, by_split=True)
    with pytest.raises(SystemExit):
        compare.main([str(tmp_path / "a"), str(tmp_path / "b"), "--sets", "train"])
