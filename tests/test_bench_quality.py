"""bench/quality.py: its pure parts and one end-to-end run on tiny SYNTHETIC data in a tmp dir."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT

from pipeline.config import SyntheticConfig
from pipeline.labels import CLASSES


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


quality = _load_bench()


def test_stratified_sample_keeps_every_stratum():
    df = pd.DataFrame({"split": ["train"] * 90 + ["test"] * 10, "label": ["nv"] * 80 + ["df"] * 10 + ["nv"] * 10})
    out = quality.stratified_sample(df, 20, seed=0)
    counts = out.groupby(["split", "label"]).size().to_dict()
    assert counts == {("test", "nv"): 2, ("train", "df"): 2, ("train", "nv"): 16}
    assert quality.stratified_sample(df, 200, seed=0) is df
    pd.testing.assert_frame_equal(out, quality.stratified_sample(df, 20, seed=0))


def test_split_and_data_overrides(tmp_path: Path):
    assert quality.split_overrides("random", ["x"]) == {"data.split.holdout_sources": []}
    assert quality.split_overrides("holdout", ["x"]) == {"data.split.holdout_sources": ["x"]}
    with pytest.raises(ValueError, match="unknown split 'lesion'"):
        quality.split_overrides("lesion", [])
    assert quality.data_overrides(tmp_path, None)["data.source"] == "ham10000"
    multi = quality.data_overrides(tmp_path / "a", tmp_path / "b")
    assert multi["data.source"] == "multi" and [e["name"] for e in multi["data.sources"]] == ["ham10000", "isic_archive"]


def test_model_report_and_tables():
    rng = np.random.default_rng(0)
    y = np.array([0, 1, 2, 5, 5, 0, 1, 2])
    probs = rng.dirichlet(np.ones(len(CLASSES)), size=len(y))
    sites = ["a", "a", "b", "b", "isic_archive", "isic_archive", "a", "b"]
    rep = quality.model_report(y, probs, sites, extra_sites=("isic_archive",))
    assert set(rep["per_source"]) == {"a", "b", "isic_archive"} and rep["ham_only"]["n"] == 6
    assert len(rep["overall"]["confusion_matrix"]) == len(CLASSES)
    ext = quality.external_report(np.array([0, 1, 1]), probs[:3])
    assert ext["classes_present"] == [CLASSES[0], CLASSES[1]]
    run = {"split": "holdout", "train_data": "ham10000",
           "models": {"twin": {"test": rep, "external": ext, "params_inference": 1234, "seconds": 5.0},
                      "mobilenet_v3_small": {"test": rep, "external": None, "params_inference": 99, "seconds": 1.0}}}
    text = quality.format_tables([run])
    assert "holdout" in text and "mobilenet_v3_small" in text and "isic_archive" in text and "1,234" in text
    assert "intervals" not in text  # none asked for
    json.dumps(run, allow_nan=False)
    assert not any(isinstance(v, float) and math.isnan(v) for v in rep["overall"].values())


def test_intervals_and_the_twin_against_a_baseline_on_the_same_images():
    rng = np.random.default_rng(2)
    y, p = _skewed(rng, 40)
    sites = ["a"] * len(y)
    twin_pred = p.argmax(axis=1)
    worse = twin_pred.copy()
    worse[np.flatnonzero(worse == y)[::4]] = (y[np.flatnonzero(worse == y)[::4]] + 1) % len(CLASSES)
    ci = (300, 0.9, 7)
    twin = quality.model_report(y, p, sites, (), twin_pred, ci)
    iv = twin["overall"]["intervals"]
    assert iv["level"] == 0.9 and iv["samples"] == 300
    assert iv["balanced_accuracy"][0] < twin["overall"]["balanced_accuracy"] < iv["balanced_accuracy"][1]
    assert quality.external_report(y, p, twin_pred, ci)["intervals"] == iv
    assert quality.model_report(y, p, sites, (), twin_pred, (0, 0.9, 7))["overall"]["intervals"] is None
    d = quality.versus(y, p, twin_pred, p, worse, ci)
    assert d["balanced_accuracy"]["difference"] > 0 and d["balanced_accuracy"]["interval"][0] > 0
    assert d["balanced_accuracy"]["a_better"] == 1.0 and d["macro_auc"]["difference"] == 0.0
    assert quality.versus(y, p, twin_pred, None, None, ci) is None
    base = quality.model_report(y, p, sites, (), worse, ci)
    run = {"split": "random", "train_data": "ham10000", "test_images": len(y), "models": {
        "twin": {"test": twin, "external": None, "params_inference": 1, "seconds": 1.0},
        "single_branch_ce": {"test": base, "external": None, "params_inference": 1, "seconds": 1.0,
                             "twin_minus_this": {"test": d, "external": None}}}}
    text = quality.format_tables([run])
    assert "90 % intervals" in text and "twin minus baseline" in text
    lo, hi = iv["balanced_accuracy"]
    assert f"{lo:.3f}-{hi:.3f}" in text
    row = next(line for line in text.splitlines() if line.startswith("random") and " test " in line)
    assert row.split()[4] == f"{d['balanced_accuracy']['difference']:+.3f}" and "100%" in row
    json.dumps(run, allow_nan=False)


def _skewed(rng, n: int):
    """``n`` per class, separable, class 3 under-predicted (a prior shift): the fitted rules beat arg-max."""
    y = np.repeat(np.arange(len(CLASSES)), n)
    logits = rng.normal(0, 1, (y.size, len(CLASSES)))
    logits[np.arange(y.size), y] += 2.0
    logits[:, 3] -= 2.5
    p = np.exp(logits)
    return y, p / p.sum(axis=1, keepdims=True)


def test_rule_comparison_fits_on_val_and_scores_test_and_external():
    rng = np.random.default_rng(3)
    (yv, pv), (yt, pt), (ye, pe) = _skewed(rng, 30), _skewed(rng, 30), _skewed(rng, 10)
    ye, pe = ye[ye != 0], pe[ye != 0]  # the external set lacks class 0 (as Derm7pt lacks akiec)
    res = quality.rule_comparison(yv, pv, yt, pt, ye, pe)
    assert set(res) == set(quality.RULES)
    assert res["argmax"]["offsets"] == [0.0] * len(CLASSES)
    assert res["argmax"]["test"]["accuracy"] == pytest.approx(np.mean(pt.argmax(1) == yt))
    for rule in ("balanced", "prior"):  # fitted on val: never below arg-max there, and it transfers
        assert res[rule]["val_balanced_accuracy"] >= res["argmax"]["val_balanced_accuracy"]
        assert res[rule]["test"]["balanced_accuracy"] > res["argmax"]["test"]["balanced_accuracy"]
        assert res[rule]["external"]["balanced_accuracy"] is not None
    assert quality.rule_comparison(yv, pv, yt, pt)["prior"]["external"] is None
    text = quality.format_rules([{"split": "random", "train_data": "ham10000", "models": {"twin": {"rules": res}}}])
    assert "prior" in text and "balanced" in text and "val BA" in text
    json.dumps(res, allow_nan=False)


def test_baselines_get_the_twins_calibration_method_fitted_on_their_own_val():
    from pipeline.core.calibration import apply_calibration, fit_calibration

    rng = np.random.default_rng(6)
    (yv, pv), (yt, pt) = _skewed(rng, 30), _skewed(rng, 30)
    same = quality.calibrated("none", yv, pv, pt, None)
    assert same[0] is pv and same[1] is pt and same[2] is None
    cv, ct, ce = quality.calibrated("temperature_bias", yv, pv, pt, None)
    temperature, bias, _ = fit_calibration(yv, pv, "temperature_bias")
    np.testing.assert_allclose(ct, apply_calibration(pt, temperature, bias), atol=1e-12)
    np.testing.assert_allclose(cv, apply_calibration(pv, temperature, bias), atol=1e-12)
    assert ce is None and not np.allclose(ct, pt, atol=1e-3)


def test_baselines_are_scored_under_the_twins_rule_fitted_on_their_own_val():
    from pipeline.config import SelectConfig

    rng = np.random.default_rng(5)
    (yv, pv), (yt, pt), (ye, pe) = _skewed(rng, 30), _skewed(rng, 30), _skewed(rng, 10)
    sites = ["a"] * len(yt)
    for rule, row in (("prior", "prior"), ("balanced", "balanced"), ("none", "argmax")):
        rep = quality.baseline_report(yv, pv, yt, pt, sites, (), ye, pe, SelectConfig(decision_rule=rule))
        assert rep["decision_rule"] == row and set(rep["rules"]) == set(quality.RULES)
        pred_test, pred_ext = rep.pop("labels")  # the rule's labels, for the paired comparison with the twin
        assert np.mean(pred_test == yt) == pytest.approx(rep["test"]["overall"]["accuracy"])
        assert np.mean(pred_ext == ye) == pytest.approx(rep["external"]["accuracy"])
        headline = rep["test"]["overall"]["balanced_accuracy"]
        assert headline == pytest.approx(rep["rules"][row]["test"]["balanced_accuracy"])
        assert rep["external"]["balanced_accuracy"] == pytest.approx(rep["rules"][row]["external"]["balanced_accuracy"])
        if row != "argmax":  # the rule changed the headline: it is not the arg-max figure
            assert rep["test"]["overall"]["balanced_accuracy"] > rep["rules"]["argmax"]["test"]["balanced_accuracy"]
    assert quality.baseline_report(yv, pv, yt, pt, sites, (), None, None, SelectConfig())["external"] is None


def test_configured_rule_names_the_rule_table_row():
    from pipeline.config import SelectConfig

    assert quality.configured_rule(SelectConfig(decision_rule="none")) == "argmax"
    assert quality.configured_rule(SelectConfig(decision_rule="prior")) == "prior"
    rules = {quality.configured_rule(SelectConfig(decision_rule=r)) for r in ("none", "balanced", "prior")}
    assert rules == set(quality.RULES)


def test_benchmark_trains_with_the_real_data_params():
    assert quality.DEFAULT_PARAMS == ROOT / "params-real.yaml"
    assert not any(k.startswith(("model.", "loss.", "augment.", "select.")) for k in quality.BENCH_RUN_OVERRIDES)


def test_skips_without_data(tmp_path: Path, capsys):
    assert quality.main(["--data", str(tmp_path / "none")]) == 0
    assert "skip:" in capsys.readouterr().out
    table, reason = quality.read_external(tmp_path / "none", None, 0)
    assert table is None and "not available" in reason


@pytest.mark.slow
def test_end_to_end_on_tiny_synthetic_data(tmp_path: Path, capsys):
    """Both splits x (HAM alone, with the extra source) x three models: about 45 s on 2 idle CPU cores."""
    from pipeline.stages.synthesize import write_dataset

    write_dataset(tmp_path / "ham", SyntheticConfig(images_per_class=6, image_size=40, sites=2), seed=1)
    write_dataset(tmp_path / "ext", SyntheticConfig(images_per_class=3, image_size=40, class_counts={"akiec": 0}), seed=2)
    write_dataset(tmp_path / "isic", SyntheticConfig(
        images_per_class=2, image_size=40, class_counts={c: 0 for c in CLASSES if c not in ("nv", "mel", "bkl")}), seed=3)
    out = tmp_path / "quality.json"
    tiny = ["pairs.epochs=1", "train.epochs=1", "train.warmup_epochs=0", "pairs.batch_size=16", "train.batch_size=16",
            "validate.workers=1", "augment.workers=1", "augment.image_size=32", "train.cache_workers=1", "evaluate.cache_workers=1",
            "augment.max_copies=2"]
    args = ["--data", str(tmp_path / "ham"), "--external", str(tmp_path / "ext"), "--isic", str(tmp_path / "isic"),
            "--with-isic", "--holdout", "synthetic_2", "--quick", "--work", str(tmp_path / "work"), "--out", str(out)]
    assert quality.main(args + [a for kv in tiny for a in ("--set", kv)]) == 0
    res = json.loads(out.read_text())
    assert [(r["split"], r["train_data"]) for r in res["runs"]] == [
        ("random", "ham10000"), ("holdout", "ham10000"), ("random", "ham10000+isic"), ("holdout", "ham10000+isic")]
    for run in res["runs"]:
        assert set(run["models"]) == {"twin", "single_branch_ce", "mobilenet_v3_small"}
        for m in run["models"].values():
            assert set(m["rules"]) == set(quality.RULES)  # every model: arg-max and both fitted rules
            assert m["external"]["n"] == 18 and "akiec" not in m["external"]["classes_present"]
            assert len(m["test"]["overall"]["confusion_matrix"]) == len(CLASSES)
        for name in ("single_branch_ce", "mobilenet_v3_small"):  # scored under the twin's rule (prior)
            b = run["models"][name]
            assert b["decision_rule"] == "prior"
            headline, prior_row = b["test"]["overall"], b["rules"]["prior"]["test"]
            assert headline["balanced_accuracy"] == pytest.approx(prior_row["balanced_accuracy"])
        if run["split"] == "holdout":  # the held-out source is the whole test set
            assert set(run["models"]["twin"]["test"]["per_source"]) == {"synthetic_2"}
        for name in ("single_branch_ce", "mobilenet_v3_small"):  # the twin against each, same images, paired
            d = run["models"][name]["twin_minus_this"]
            assert set(d) == {"test", "external"} and "labels" not in run["models"][name]
            twin_ba, base_ba = (run["models"][m]["test"]["overall"]["balanced_accuracy"] for m in ("twin", name))
            assert d["test"]["balanced_accuracy"]["difference"] == pytest.approx(twin_ba - base_ba)
        assert run["models"]["twin"]["test"]["overall"]["intervals"]["samples"] == 1000
        assert run["models"]["twin"]["calibration"]["method"] == "temperature_bias"  # params-real's, recorded
    # every model's labels and probabilities kept per run and set, as bench/compare.py reads them
    from pipeline.core.metrics import classification_metrics
    from pipeline.labels import CLASS_TO_INDEX

    kept = sorted((tmp_path / "work").glob("*/reports/bench/predictions_*.csv"))
    assert len(kept) == len(res["runs"]) * 3 * 2
    for run in res["runs"]:
        folder = tmp_path / "work" / f"{run['train_data']}-{run['split']}" / "reports" / "bench"
        for name, m in run["models"].items():
            for kind, report in (("test", m["test"]["overall"]), ("external", m["external"])):
                df = pd.read_csv(folder / f"predictions_{name}_{kind}.csv")
                y, pred = (df[c].map(CLASS_TO_INDEX).to_numpy() for c in ("label", "predicted"))
                again = classification_metrics(y, df[list(CLASSES)].to_numpy(), y_pred=pred)
                assert again["balanced_accuracy"] == pytest.approx(report["balanced_accuracy"])
                assert again["macro_auc"] == pytest.approx(report["macro_auc"], abs=1e-6)
    text = capsys.readouterr().out
    assert "ext BA" in text and "confusion matrices" in text and "prior" in text
    assert "95 % intervals" in text and "twin minus baseline" in text
    assert set(res["runs"][0]["models"]["twin"]["rules"]) == set(quality.RULES)


@pytest.mark.slow
def test_a_run_stopped_in_the_baselines_keeps_the_twin(tmp_path: Path, monkeypatch):
    """The result file is rewritten after every model: a long run that is killed (e.g. by a time
    limit on a lent GPU machine) still has the models it finished, each with the device it ran on."""
    from pipeline.stages.synthesize import write_dataset

    write_dataset(tmp_path / "ham", SyntheticConfig(images_per_class=6, image_size=40), seed=1)
    out = tmp_path / "quality.json"
    tiny = ["pairs.epochs=2", "train.epochs=2", "pairs.batch_size=16", "train.batch_size=16", "validate.workers=1",
            "augment.workers=1", "augment.image_size=32", "train.cache_workers=1", "evaluate.cache_workers=1",
            "augment.max_copies=2", "train.device=cpu", "train.channels_last=false"]
    calls = []

    def stopped(*args, **kwargs):
        calls.append(args[-1])  # the device setup the baseline was given
        raise KeyboardInterrupt("stopped by the time limit")

    monkeypatch.setattr(quality, "_train_baseline", stopped)
    args = ["--data", str(tmp_path / "ham"), "--external", str(tmp_path / "none"), "--splits", "random", "--quick",
            "--work", str(tmp_path / "work"), "--out", str(out)]
    with pytest.raises(KeyboardInterrupt):
        quality.main(args + [a for kv in tiny for a in ("--set", kv)])
    res = json.loads(out.read_text())
    assert [r["split"] for r in res["runs"]] == ["random"]
    assert set(res["runs"][0]["models"]) == {"twin"}
    twin = res["runs"][0]["models"]["twin"]
    assert twin["device"] == "cpu fp32"
    assert calls and calls[0].describe() == "cpu fp32"
    # how the twin trained travels with it: every epoch's losses and the lowest-loss epoch kept
    history = json.loads((tmp_path / "work" / "ham10000-random" / "models" / "train" / "history.json").read_text())
    assert twin["history"] == history and [h["epoch"] for h in history] == [1, 2]
    assert twin["best_epoch"] == min(history, key=lambda h: h["val_loss_total"])["epoch"]


def test_training_sets_with_and_without_the_extra_source(tmp_path: Path):
    """--with-isic runs HAM10000 alone and with ISIC; --isic-only just the latter; an absent ISIC
    folder is skipped with a reason (and --isic-only then has nothing to run)."""
    absent = tmp_path / "no-isic"
    present = tmp_path / "isic"
    present.mkdir()
    (present / "HAM10000_metadata.csv").write_text("lesion_id,image_id,dx\n")
    assert quality.training_sets(present, with_isic=False, isic_only=False) == ([("ham10000", None)], None)
    assert quality.training_sets(present, with_isic=True, isic_only=False) == (
        [("ham10000", None), ("ham10000+isic", present)], None)
    assert quality.training_sets(present, with_isic=False, isic_only=True) == ([("ham10000+isic", present)], None)
    sets, why = quality.training_sets(absent, with_isic=True, isic_only=False)
    assert sets == [("ham10000", None)] and "not available" in why and str(absent) in why
    sets, why = quality.training_sets(absent, with_isic=False, isic_only=True)
    assert sets == [] and "not available" in why


def test_isic_only_without_the_extra_source_runs_nothing(tmp_path: Path, capsys):
    ham = tmp_path / "ham"
    ham.mkdir()
    (ham / "HAM10000_metadata.csv").write_text("lesion_id,image_id,dx\n")
    out = tmp_path / "q.json"
    args = ["--data", str(ham), "--isic", str(tmp_path / "none"), "--external", str(tmp_path / "none"),
            "--isic-only", "--work", str(tmp_path / "work"), "--out", str(out)]
    assert quality.main(args) == 0
    assert "--isic-only skipped" in capsys.readouterr().out
    assert not out.exists() and not (tmp_path / "work").exists()


def test_baseline_with_weight_averaging_keeps_the_lowest_loss_average(monkeypatch):
    """``train.swa_start``: the baselines validate and keep the running mean of their epoch states, as the twin."""
    import torch

    import pipeline.core.training as training
    from pipeline.config import load_config
    from pipeline.core.model import build_inference
    from pipeline.io.compute import resolve_device

    snapshots: list[dict] = []
    real = training.WeightAverage.judged

    def recording(self, model, epoch):  # the raw state each epoch adds to the mean
        if self.active(epoch):
            snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real(self, model, epoch)

    monkeypatch.setattr(training.WeightAverage, "judged", recording)
    cfg = load_config(ROOT / "params.yaml", {"train.epochs": 3, "train.swa_start": 1, "train.batch_size": 8,
                                             "train.cpu_threads": 1, "train.channels_last": False})
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(24, 3, 32, 32), dtype=np.uint8)
    y = np.arange(24) % len(CLASSES)
    model, history = quality._train_baseline(build_inference(cfg.model), x, y, x[:14], y[:14], cfg, 0,
                                             resolve_device(cfg.train))
    assert len(snapshots) == 3  # every epoch from swa_start = 1
    best_epoch = min(history, key=lambda h: h["val_loss"])["epoch"]
    used = snapshots[:best_epoch]  # the kept state is the average up to the lowest-loss epoch
    assert not torch.equal(snapshots[0]["extractor.stem.0.weight"], snapshots[-1]["extractor.stem.0.weight"])
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, sum(s[k] for s in used) / len(used))


def test_baseline_trains_through_the_twins_trainer_with_its_flips_and_schedule(monkeypatch):
    """The baselines run :class:`pipeline.core.training.Trainer`: one optimizer step per batch, the
    twin's online flips (drawn from the trainer's generator) and the twin's learning-rate schedule."""
    import torch

    import pipeline.core.training as training
    from pipeline.config import load_config
    from pipeline.core.model import build_inference
    from pipeline.io.compute import resolve_device

    steps: list[float] = []
    real = training.optimizer_step

    def recording(objective, opt, sched, scaler, non_finite):
        steps.append(float(opt.param_groups[0]["lr"]))
        return real(objective, opt, sched, scaler, non_finite)

    monkeypatch.setattr(training, "optimizer_step", recording)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(24, 3, 32, 32), dtype=np.uint8)
    y = np.arange(24) % len(CLASSES)

    def train(**extra):
        steps.clear()
        cfg = load_config(ROOT / "params.yaml", {"train.epochs": 2, "train.batch_size": 8, "train.cpu_threads": 1,
                                                 **extra})  # fmt: skip
        model, history = quality._train_baseline(build_inference(cfg.model), x, y, x[:14], y[:14], cfg, 0,
                                                  resolve_device(cfg.train))  # fmt: skip
        return model, history, cfg

    flipped, history, cfg = train()
    assert [h["epoch"] for h in history] == [1, 2] and len(steps) == 2 * 3  # 24 images / batch 8, two epochs
    assert steps == pytest.approx([cfg.train.lr * training.lr_factor(i, 6, 0, "cosine") for i in range(6)])
    plain, _, _ = train(**{"train.online_flip": False})
    assert any(not torch.equal(a, b) for a, b in zip(flipped.state_dict().values(), plain.state_dict().values()))
    train(**{"train.warmup_epochs": 1})
    assert steps[:3] == pytest.approx([cfg.train.lr * (i + 1) / 3 for i in range(3)])  # the twin's warm-up


def test_baselines_are_scored_with_the_twins_test_time_views():
    """``select.tta: flips`` averages a baseline's softmax over the 8 flip/transpose views, as the
    twin's export does; ``none`` is the plain softmax."""
    import torch

    from pipeline.config import TrainConfig
    from pipeline.io.compute import resolve_device

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 7)).eval()
    x = np.random.default_rng(0).integers(0, 256, size=(5, 3, 8, 8), dtype=np.uint8)
    ds = resolve_device(TrainConfig(device="cpu"))
    inp = ds.to_input(torch.from_numpy(x))
    turns = [torch.rot90(inp, k, dims=(2, 3)) for k in range(4)]
    views = turns + [t.transpose(2, 3) for t in turns]
    with torch.no_grad():
        want = np.mean([torch.softmax(model(v.contiguous()), 1).numpy() for v in views], 0)
        plain = torch.softmax(model(inp), 1).numpy()
    got = quality._probs(model, x, ds, "flips")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(quality._probs(model, x, ds), plain, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, plain, atol=1e-4)  # the model is not flip-invariant: the views matter


def test_min_recall_is_the_worst_present_class_and_baselines_are_checked(capsys):
    assert quality.min_recall([[3, 1, 0], [0, 0, 0], [1, 1, 2]]) == 0.5  # class 1 absent from the test set
    assert quality.min_recall([[0, 0], [0, 0]]) is None
    with pytest.raises(SystemExit):
        quality.main(["--baselines", "resnet", "--data", str(ROOT / "nowhere"), "--splits", "holdout"])


def test_cam_position_reports_centre_and_border_mass():
    """A hand-built model whose map fires on red: a red patch in the middle puts the map's mass in
    the centre, one in a corner puts it on the border."""
    from types import SimpleNamespace

    import torch
    from torch import nn

    from pipeline.core.model import Branch, InferenceModel

    head = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.ReLU())
    branch = Branch(nn.Identity(), head, 4, 2, 0.0)
    with torch.no_grad():
        head[0].weight.zero_()
        head[0].weight[0, 0] = 1.0  # red ...
        head[0].weight[0, 1] = -1.0  # ... minus green
        branch.classifier.weight.zero_()
        branch.classifier.weight[0, 0] = 5.0
    exported = SimpleNamespace(model=InferenceModel(nn.AvgPool2d(2), branch).eval(), meta={})
    images = np.zeros((2, 3, 32, 32), np.uint8)
    images[0, 0, 12:20, 12:20] = 255  # red in the middle
    images[1, 0, :6, :6] = 255  # red in a corner
    centre = quality.cam_position(exported, images[:1], [0])
    corner = quality.cam_position(exported, images[1:], [0])
    assert centre["images"] == 1 and centre["centre_over_border"] == 1.0 and centre["centre_mass"] > 0.8
    assert corner["centre_over_border"] == 0.0 and corner["border_mass"] > 0.5
