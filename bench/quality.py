"""Quality benchmark: the twin model next to two baselines, on two splits, with an external test.

    .venv/bin/python bench/quality.py [--splits random,holdout] [--holdout vidir_modern] [--with-isic | --isic-only]
                                      [--quick] [--data DIR] [--external DIR] [--isic DIR] [--set key=value ...]

For each chosen **split** -- ``random``: the lesion-grouped, stratified random split; ``holdout``:
``data.split.holdout_sources`` = ``--holdout`` (default ``vidir_modern``, a whole HAM10000 source as
the test set) -- it runs the pipeline's own stages (ingest → validate → augment → pairs → train →
select → evaluate) on ``--data`` (default ``../shared/data/ham10000-224``) into
``bench/results/quality/<training data>-<split>/``, then trains, on the **same** split and the same
augmented train images, two baselines:

* ``single_branch_ce`` — the same backbone (extractor + one branch, :func:`build_inference`) as a
  plain classifier with cross-entropy, same epochs/optimizer/schedule (does twin training help?);
* ``mobilenet_v3_small`` — torchvision MobileNetV3-Small from scratch (no downloaded weights).

Each baseline keeps its lowest-validation-loss epoch, like the twin (patent S2), trains on the
twin's device and precision (:func:`pipeline.io.compute.resolve_device`: CUDA with autocast when
present, channels-last with ``train.channels_last``) and gets the twin's decision rule
(``select.decision_rule``) and calibration (``select.calibration``), both fitted on its own val
probabilities, so the headline BA and ECE compare models under one rule; every model's arg-max / balanced / prior figures are in the rule table. Every model
is scored on the test split -- BA, accuracy, macro AUC, ECE, the confusion matrix and the same per
acquisition source (:func:`pipeline.core.metrics.per_group_metrics`) -- and on the **external**
test set ``--external`` (default ``../shared/data/derm7pt-384``; never trained or selected on;
metrics over the classes it has, i.e. six without akiec), skipped with a reason when absent.
BA, accuracy and macro AUC get class-stratified bootstrap intervals (``evaluate.bootstrap_samples``,
``evaluate.ci_level``), and each baseline the twin's lead over it on the same images with a
paired-bootstrap interval (``twin_minus_this``; :func:`pipeline.core.metrics.paired_differences`).
Every model's labels and probabilities stay in ``<work>/<data>-<split>/reports/bench/
predictions_<model>_<test|external>.csv``, so ``bench/compare.py WORK_A WORK_B`` can pair two runs
(e.g. a trial and the committed recipe) on the same images.
``--with-isic`` runs every split twice: on HAM10000 alone and with ``--isic`` (default
``../shared/data/isic-archive-512``) added to the training sources (``data.source: multi``);
``ham_only`` then gives the test metrics over the HAM10000 sources only, comparable across both.
``--isic-only`` runs only the second of the two (HAM10000 with ``--isic``), e.g. to add that half to
an earlier run without ISIC.
The config is ``--params`` (default ``params-real.yaml``, the real-data config) with the data,
split and work folder set per run; ``--set key=value`` changes any knob for a trial.
``--quick`` is a smoke run (few epochs, small images, a stratified subsample of the manifest and
of the external set; the recipe's weight averaging, if any, from the first epoch). Results:
tables on stdout and ``bench/results/quality.json``, rewritten after every finished model (a
run stopped by a time limit keeps what it finished). Targets for the twin model (issue 12):
BA ≥ 0.72 on the random split; report the source-held-out and external figures next to it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The benchmark trains with the real-data config ``params-real.yaml`` (``--params``): the same file
# `make run-real` and `dvc repro` with `--params params-real.yaml` use, so the benchmark's twin is the
# model a user gets on real data. Only how the benchmark runs is set here, nothing about the model.
DEFAULT_PARAMS = ROOT / "params-real.yaml"
# Each run's per-model predictions (test split, external set) go to <work>/<data>-<split>/reports/<this>/.
PREDICTIONS_DIR = "bench"
BENCH_RUN_OVERRIDES: dict[str, object] = {
    "train.progress": False,
}


def _train_baseline(model, x_train, y_train, x_val, y_val, cfg, seed: int, ds) -> tuple[object, list[dict]]:
    """Plain cross-entropy training through the twin's :class:`pipeline.core.training.Trainer`: the
    same optimizer, schedule (warm-up included), online flips, weight averaging (``train.swa_start``)
    and lowest-validation-loss state as the twin, on the twin's device and precision ``ds``
    (:func:`pipeline.io.compute.resolve_device`). Each epoch is a seeded shuffle of the training
    images cut into full batches."""
    import torch
    import torch.nn.functional as F

    from pipeline.core.training import Trainer, WeightAverage, build_optimizer, build_scheduler, flip_transform

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    tc = cfg.train
    model.to(ds.device)
    if ds.channels_last:
        model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model.parameters(), tc)
    bs = tc.batch_size
    steps = max(1, len(x_train) // bs)
    sched = build_scheduler(opt, tc, steps * tc.epochs, steps * tc.warmup_epochs)
    scaler = torch.amp.GradScaler("cuda", enabled=ds.grad_scaler)
    average = WeightAverage(model, tc.swa_start) if tc.swa_start is not None else None
    xt, yt = torch.from_numpy(np.asarray(x_train)), torch.from_numpy(y_train).long()
    xv, yv = np.asarray(x_val), torch.from_numpy(y_val).long().to(ds.device)

    def loss(logits, targets):
        return {"train_loss": F.cross_entropy(logits, targets[0])}

    def batches(epoch: int):
        def shuffled():
            order = torch.randperm(len(xt), generator=gen)
            for b in range(steps):
                idx = order[b * bs : (b + 1) * bs]
                yield xt[idx], yt[idx]

        return shuffled(), steps

    def score(judged):
        judged.eval()
        return {"val_loss": F.cross_entropy(_logits(judged, xv, ds), yv).item()}

    def report(history, best, improved) -> None:
        print(f"    epoch {history[-1]['epoch']}: val_loss {history[-1]['val_loss']:.4f}", flush=True)

    trainer = Trainer(model, model, loss, opt, sched, scaler, ds, gen, inputs=1, transform=flip_transform(tc),
                      average=average)  # fmt: skip
    history, best = trainer.fit(range(tc.epochs), batches, score, key="val_loss", on_epoch=report)
    model.load_state_dict(best["state"])
    return model.eval(), [{"epoch": r["epoch"], "val_loss": r["val_loss"]} for r in history]


def cam_position(exported, images, labels) -> dict:
    """Where the twin's class activation maps lie on the test images (HAM10000's lesions are mostly
    centred): the mean share of each map's mass in the central box of half the width and height and
    in the outer border (:func:`pipeline.core.cam.centre_border_mass`), and the share of images
    whose map has more mass in the centre than in the border. A model that leans on the frame, a
    ruler or the vignette shows up as border mass."""
    from pipeline.core.cam import centre_border_mass
    from pipeline.core.inference import cam_of

    shares = np.array([centre_border_mass(cam_of(exported, img, int(c))[0]) for img, c in zip(images, labels, strict=True)])
    if not len(shares):
        return {}
    return {"images": len(shares), "centre_mass": round(float(shares[:, 0].mean()), 4),
            "border_mass": round(float(shares[:, 1].mean()), 4),
            "centre_over_border": round(float((shares[:, 0] > shares[:, 1]).mean()), 4)}  # fmt: skip


def _latency(cfg) -> float:
    """CPU batch-1 milliseconds per image of ``cfg``'s model through the whole predict path (colour
    constancy, TTA, calibration, decision rule; :func:`throughput.bench_pipeline_infer`)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from throughput import bench_pipeline_infer

    return round(bench_pipeline_infer(cfg, "cpu", iters=30, warmup=5)["ms_per_image"], 2)


def _logits(model, x, ds):
    """float32 logits of ``model`` (eval mode) on uint8 images ``x`` (N, 3, S, S), 256 at a time, on ``ds``."""
    import torch

    with torch.no_grad(), ds.autocast():
        return torch.cat([model(ds.to_input(torch.from_numpy(np.asarray(x[i : i + 256])))).float()
                          for i in range(0, len(x), 256)])  # fmt: skip


def _probs(model, x, ds, tta: str = "none") -> np.ndarray:
    """Class probabilities of ``model`` on uint8 images ``x``: with ``tta`` (``select.tta``) the mean
    softmax over the same views, by the same function, as the twin's export
    (:func:`pipeline.core.inference.view_probs`), so a baseline is scored the way the twin is."""
    import torch

    from pipeline.core.inference import view_probs

    if tta == "none":
        return torch.softmax(_logits(model, x, ds), 1).cpu().numpy()
    with torch.no_grad(), ds.autocast():
        return torch.cat([view_probs(model, ds.to_input(torch.from_numpy(np.asarray(x[i : i + 256]))), tta, i)
                          for i in range(0, len(x), 256)]).cpu().numpy()  # fmt: skip


SPLIT_MODES: tuple[str, ...] = ("random", "holdout")
BASELINES: tuple[str, ...] = ("single_branch_ce", "mobilenet_v3_small")
# The from-scratch recipe (the 227 k-parameter twin at 48 px; params-real.yaml before the pretrained
# backbone, commit 5f3a1c1): --with-scratch runs it beside the params file's recipe, on the same
# splits and test images, as these overrides of the params file.
SCRATCH_RECIPE: dict[str, object] = {
    "augment.image_size": 48,
    "augment.copies": 1,
    "augment.balance": True,
    "augment.max_copies": 20,
    "augment.balance_sites": True,
    "augment.keep_original": True,
    "augment.color_constancy": "shades_of_gray",
    "pairs.epochs": 12,
    "model.extractor": [[1, 16, 1, 1], [4, 24, 2, 2], [4, 32, 2, 2]],
    "model.branch": [[4, 64, 2, 2], [4, 96, 2, 2]],
    "model.split": None,
    "model.output_stride": None,
    "model.head_channels": 256,
    "model.dropout": 0.1,
    "loss.gamma": 1.0,
    "loss.alpha": None,
    "train.epochs": 12,
    "train.batch_size": 64,
    "train.lr": 0.004,
    "train.warmup_epochs": 0,
    "train.pretrained_lr": None,
    "train.swa_start": 3,
    "select.decision_rule": "prior",
    "select.tta": "flips",
    "select.calibration": "temperature_bias",
}
# --quick: a smoke run of every code path in minutes (not a measurement).
QUICK_OVERRIDES: dict[str, object] = {
    "augment.image_size": 32,
    "augment.max_copies": 4,
    "pairs.epochs": 2,
    "train.epochs": 2,
    "evaluate.cam_per_class": 0,
}
QUICK_ROWS = 1200  # manifest rows kept by --quick (stratified by split and label)
QUICK_EXTERNAL = 300  # external images scored by --quick
DEFAULT_DATA = ROOT.parent / "shared" / "data"


# ----------------------------------------------------------------------------- pure parts
def stratified_sample(df, n: int, seed: int, by: tuple[str, ...] = ("split", "label")):
    """About ``n`` rows of ``df``, the same fraction of every ``by`` stratum (at least 2 rows of a
    stratum that has them), seeded; the whole table when it has at most ``n`` rows."""
    import pandas as pd

    if len(df) <= n:
        return df
    frac = n / len(df)
    parts = []
    for _, g in df.groupby(list(by), sort=True):
        k = min(len(g), max(2, round(len(g) * frac)))
        parts.append(g.sample(n=k, random_state=seed))
    return pd.concat(parts).sort_index()


def split_overrides(mode: str, holdout: list[str]) -> dict[str, object]:
    """The ``data.split`` overrides of one split mode."""
    if mode not in SPLIT_MODES:
        raise ValueError(f"unknown split {mode!r}; choose from {list(SPLIT_MODES)}")
    return {"data.split.holdout_sources": list(holdout) if mode == "holdout" else []}


def data_overrides(ham: Path, extra: Path | None) -> dict[str, object]:
    """Training data: HAM10000 alone (``data.source: ham10000``) or with ``extra`` (``multi``)."""
    if extra is None:
        return {"data.source": "ham10000", "data.root": str(ham.resolve()), "data.sources": []}
    return {
        "data.source": "multi", "data.root": None, "data.csv": None,
        "data.sources": [{"source": "ham10000", "root": str(ham.resolve()), "name": "ham10000"},
                         {"source": "ham10000", "root": str(extra.resolve()), "name": "isic_archive"}],
    }  # fmt: skip


def training_sets(isic: Path, *, with_isic: bool, isic_only: bool) -> tuple[list[tuple[str, Path | None]], str | None]:
    """The training sets to run, as (name, extra source or None), and why ISIC was skipped (absent).

    Default: HAM10000 alone; ``with_isic``: alone, then with ``isic`` added; ``isic_only``: only with
    it (nothing to run when ``isic`` is absent)."""
    sets: list[tuple[str, Path | None]] = [] if isic_only else [("ham10000", None)]
    if not (with_isic or isic_only):
        return sets, None
    if not (isic / "HAM10000_metadata.csv").is_file():
        return sets, f"{isic}: no HAM10000_metadata.csv (extra training source not available here)"
    return [*sets, ("ham10000+isic", isic)], None


def intervals(y, probs, y_pred, ci) -> dict | None:
    """The bootstrap intervals of :func:`pipeline.core.metrics.bootstrap_intervals` with
    ``ci = (samples, level, seed)`` (the evaluate stage's knobs and the run's seed); None: none."""
    if ci is None or ci[0] <= 0:
        return None
    from pipeline.core.metrics import bootstrap_intervals

    samples, level, seed = ci
    return {"level": level, "samples": samples, **bootstrap_intervals(y, probs, y_pred, samples, level, seed)}


def versus(y, p_a, pred_a, p_b, pred_b, ci) -> dict | None:
    """Model a minus model b on the same images, paired bootstrap
    (:func:`pipeline.core.metrics.paired_differences`, ``ci`` as in :func:`intervals`)."""
    if ci is None or ci[0] <= 0 or p_a is None or p_b is None:
        return None
    from pipeline.core.metrics import paired_differences

    samples, level, seed = ci
    return {"level": level, "samples": samples,
            **paired_differences(y, p_a, p_b, pred_a, pred_b, samples, level, seed)}  # fmt: skip


def model_report(y, probs, sites, extra_sites: tuple[str, ...] = (), y_pred=None, ci=None) -> dict:
    """Test metrics of one model: overall (with ECE, the confusion matrix and, with ``ci``, the
    bootstrap intervals of :func:`intervals`), per source, and -- when extra training sources are
    present -- ``ham_only`` over the rows of the other sources. ``y_pred``: labels of a decision
    rule (default arg-max)."""
    import numpy as np

    from pipeline.core.evaluation import detail_report
    from pipeline.core.metrics import per_group_metrics, subset_metrics
    from pipeline.labels import CLASSES

    sites = np.asarray([str(s) for s in sites])
    pred = probs.argmax(axis=1) if y_pred is None else np.asarray(y_pred)
    overall = subset_metrics(y, probs, y_pred=pred)
    if ci is not None:
        overall["intervals"] = intervals(y, probs, pred, ci)
    rep = detail_report(CLASSES, overall, per_group_metrics(y, probs, sites, y_pred=pred))
    keep = ~np.isin(sites, list(extra_sites))
    if extra_sites and keep.any():
        rep["ham_only"] = detail_report(CLASSES, subset_metrics(y[keep], probs[keep], y_pred=pred[keep]), {})["overall"]
    return rep


def external_report(y, probs, y_pred=None, ci=None) -> dict:
    """Metrics on the external set (over the classes it has; see pipeline.core.metrics), with the
    bootstrap intervals of :func:`intervals` when ``ci`` is given."""
    from pipeline.core.evaluation import detail_report
    from pipeline.core.metrics import subset_metrics
    from pipeline.labels import CLASSES

    overall = subset_metrics(y, probs, y_pred=y_pred)
    if ci is not None:
        overall["intervals"] = intervals(y, probs, probs.argmax(axis=1) if y_pred is None else y_pred, ci)
    return detail_report(CLASSES, overall, {})["overall"]


RULES: tuple[str, ...] = ("argmax", "balanced", "prior")


def rule_comparison(y_val, p_val, y_test, p_test, y_ext=None, p_ext=None, select=None) -> dict:
    """The three decision rules of :mod:`pipeline.core.decision` on one model's probabilities: each
    fitted on the validation split (``select``: the ``select`` config section for the grids), then
    scored on the test split and, when given, the external set (``select`` None: the defaults).
    ``{rule: {test: {...}, external: {...} | None, val_balanced_accuracy, offsets}}``; BA and
    accuracy only (AUC does not depend on the rule)."""
    from pipeline.config import SelectConfig
    from pipeline.core.decision import apply_offsets, balanced_accuracy, fit_rule

    select = select or SelectConfig()
    fitted = {"argmax": np.zeros(p_val.shape[1])}
    fitted.update({rule: fit_rule(rule, y_val, p_val, select)[0] for rule in RULES[1:]})

    def scores(y, p, off, external: bool = False):
        if y is None or p is None:
            return None
        pred = apply_offsets(p, off)
        if external:  # BA over the classes the external set has (as external_report)
            r = external_report(y, p, pred)
            return {"balanced_accuracy": r["balanced_accuracy"], "accuracy": r["accuracy"]}
        return {"balanced_accuracy": balanced_accuracy(y, pred, p.shape[1]), "accuracy": float(np.mean(pred == y))}

    return {name: {"val_balanced_accuracy": balanced_accuracy(y_val, apply_offsets(p_val, off), p_val.shape[1]),
                   "test": scores(y_test, p_test, off), "external": scores(y_ext, p_ext, off, external=True),
                   "offsets": [float(v) for v in off]}
            for name, off in fitted.items()}  # fmt: skip


def format_rules(runs: list[dict]) -> str:
    """The decision-rule comparison (:func:`rule_comparison`) of every model of every run."""
    lines = [f"{'split':<9} {'train data':<13} {'model':<19} {'rule':<9} {'val BA':>6} {'BA':>6} {'acc':>6} "
             f"{'ext BA':>6} {'ext acc':>7}"]  # fmt: skip
    for run in runs:
        for model, m in run["models"].items():
            for rule, r in (m.get("rules") or {}).items():
                ext = r["external"] or {}
                lines.append(f"{run['split']:<9} {run['train_data']:<13} {model:<19} {rule:<9} "
                             f"{_f(r['val_balanced_accuracy'])} {_f(r['test']['balanced_accuracy'])} "
                             f"{_f(r['test']['accuracy'])} {_f(ext.get('balanced_accuracy'))} "
                             f"{_f(ext.get('accuracy'), 7)}")  # fmt: skip
    return "\n".join(lines)


def configured_rule(select) -> str:
    """The :data:`RULES` name of the config's ``select.decision_rule`` (``none`` is arg-max)."""
    return "argmax" if select.decision_rule == "none" else select.decision_rule


def calibrated(method: str, y_val, p_val, *others):
    """``(p_val, *others)`` under the calibration ``method`` (``select.calibration``) fitted on
    (``y_val``, ``p_val``), as ``select`` calibrates the twin's export; ``none`` returns them as
    they are, and a None in ``others`` stays None."""
    from pipeline.core.calibration import apply_calibration, fit_calibration

    if method == "none":
        return (p_val, *others)
    temperature, bias, _ = fit_calibration(y_val, p_val, method)
    return tuple(None if p is None else apply_calibration(p, temperature, bias) for p in (p_val, *others))


def baseline_report(y_val, p_val, y_test, p_test, sites, extra_sites, y_ext, p_ext, select, ci=None) -> dict:
    """A baseline's figures under the twin's decision rule (``select.decision_rule``), fitted the
    same way on the baseline's own val probabilities, so the headline BA compares models, not rules;
    all three rules in ``rules`` (arg-max included). ``labels``: that rule's test and external
    labels (for :func:`versus`; the caller drops them before writing)."""
    from pipeline.core.decision import apply_offsets

    rules = rule_comparison(y_val, p_val, y_test, p_test, y_ext, p_ext, select)
    offsets = np.asarray(rules[configured_rule(select)]["offsets"])
    pred_test = apply_offsets(p_test, offsets)
    pred_ext = apply_offsets(p_ext, offsets) if p_ext is not None else None
    return {
        "test": model_report(y_test, p_test, sites, extra_sites, pred_test, ci),
        "external": external_report(y_ext, p_ext, pred_ext, ci) if p_ext is not None else None,
        "rules": rules, "decision_rule": configured_rule(select), "labels": (pred_test, pred_ext),
    }  # fmt: skip


def write_predictions(folder: Path, model: str, kind: str, ids, y, probs, pred) -> None:
    """``<folder>/predictions_<model>_<kind>.csv`` (``kind``: ``test`` or ``external``): one row per
    image with the true class, the decided class and every class probability
    (:func:`pipeline.core.evaluation.predictions_frame`), written atomically; nothing when ``probs``
    is None. ``bench/compare.py`` pairs these files of two runs on the same images."""
    if probs is None:
        return
    from pipeline.core.evaluation import predictions_frame
    from pipeline.io.files import write_table

    write_table(folder / f"predictions_{model}_{kind}.csv", predictions_frame(list(ids), y, pred, probs))


def decision_labels(exported, probs):
    """The export's decision-rule labels where the pipeline has one (``predicted_labels``), else arg-max."""
    try:
        from pipeline.core.inference import predicted_labels
    except ImportError:  # no decision rule in this version of the pipeline
        return probs.argmax(axis=1)
    return predicted_labels(exported, probs)


def _f(v, width: int = 6) -> str:
    return f"{v:>{width}.3f}" if isinstance(v, (int, float)) and v is not None else f"{'-':>{width}}"


def _ci(iv: dict | None, key: str) -> str:
    lo, hi = (iv or {}).get(key) or (None, None)
    return f"{'-':>13}" if lo is None or hi is None else f"{lo:.3f}-{hi:.3f}".rjust(13)


def format_intervals(runs: list[dict]) -> list[str]:
    """The bootstrap intervals of each model (test split and external set), then the twin minus
    each baseline on the same images (paired bootstrap: the difference, its interval, and the
    share of resamples in which the twin is ahead)."""
    level = next((r["test"]["overall"]["intervals"]["level"] for run in runs for r in run["models"].values()
                  if r["test"]["overall"].get("intervals")), None)  # fmt: skip
    if level is None:
        return []
    pct = f"{100 * level:g} %"
    lines = [f"{pct} intervals over class-stratified bootstrap resamples of the test images (not over training runs)",
             f"{'split':<9} {'train data':<13} {'model':<19} {'BA':>13} {'mAUC':>13} {'ext BA':>13} {'ext mAUC':>13}"]
    for run in runs:
        for name, r in run["models"].items():
            t, e = r["test"]["overall"].get("intervals"), (r.get("external") or {}).get("intervals")
            lines.append(f"{run['split']:<9} {run['train_data']:<13} {name:<19} {_ci(t, 'balanced_accuracy')} "
                         f"{_ci(t, 'macro_auc')} {_ci(e, 'balanced_accuracy')} {_ci(e, 'macro_auc')}")  # fmt: skip
    rows = []
    for run in runs:
        for name, r in run["models"].items():
            for where, d in (r.get("twin_minus_this") or {}).items():
                if not d:
                    continue
                cells = []
                for key in ("balanced_accuracy", "macro_auc"):
                    lo, hi = d[key]["interval"]
                    cells.append(f"{d[key]['difference']:+.3f} ({lo:+.3f} to {hi:+.3f}) {d[key]['a_better']:>4.0%}")
                rows.append(f"{run['split']:<9} {run['train_data']:<13} {name:<19} {where:<8} {cells[0]:>28} "
                            f"{cells[1]:>28}")  # fmt: skip
    if rows:
        lines += ["", f"twin minus baseline, same images ({pct} interval, share of resamples with the twin ahead)",
                  f"{'split':<9} {'train data':<13} {'baseline':<19} {'set':<8} {'BA':>28} {'mAUC':>28}", *rows]
    return lines


def min_recall(confusion: list[list[int]]) -> float | None:
    """The lowest recall over the classes present in a confusion matrix (rows true, columns predicted)."""
    cm = np.asarray(confusion, dtype=float)
    rows = cm.sum(axis=1)
    present = rows > 0
    return float((np.diag(cm)[present] / rows[present]).min()) if present.any() else None


def format_tables(runs: list[dict]) -> str:
    """The stdout report of :func:`run_split` results: headline table, per-source table, confusion
    matrices (rows true class, columns predicted, class order as in pipeline.labels)."""
    from pipeline.labels import CLASSES

    header = (f"{'split':<9} {'train data':<13} {'model':<19} {'BA':>6} {'acc':>6} {'mAUC':>6} {'ECE':>6} "
              f"{'minrec':>6} {'HAM BA':>6} {'ext BA':>6} {'ext acc':>7} {'ext mAUC':>8} {'params':>9} {'sec':>6}")  # fmt: skip
    lines = [header]
    for run in runs:
        for name, r in run["models"].items():
            o, ext = r["test"]["overall"], r.get("external") or {}
            ham = r["test"].get("ham_only", {}).get("balanced_accuracy")
            lines.append(
                f"{run['split']:<9} {run['train_data']:<13} {name:<19} {_f(o['balanced_accuracy'])} {_f(o['accuracy'])} "
                f"{_f(o['macro_auc'])} {_f(o['ece'])} {_f(min_recall(o['confusion_matrix']))} {_f(ham)} "
                f"{_f(ext.get('balanced_accuracy'))} "
                f"{_f(ext.get('accuracy'), 7)} {_f(ext.get('macro_auc'), 8)} {r['params_inference']:>9,} "
                f"{r['seconds']:>6.0f}"
            )
    lines += ["", f"{'split':<9} {'train data':<13} {'model':<19} {'source':<14} {'n':>5} {'BA':>6} {'acc':>6} {'mAUC':>6}"]
    for run in runs:
        for name, r in run["models"].items():
            for site, m in r["test"]["per_source"].items():
                lines.append(f"{run['split']:<9} {run['train_data']:<13} {name:<19} {site:<14} {m['n']:>5} "
                             f"{_f(m['balanced_accuracy'])} {_f(m['accuracy'])} {_f(m['macro_auc'])}")  # fmt: skip
    lines += ["", *format_intervals(runs)]
    lines += ["", "confusion matrices (test split; rows = true, columns = predicted: " + " ".join(CLASSES) + ")"]
    for run in runs:
        for name, r in run["models"].items():
            cm = r["test"]["overall"]["confusion_matrix"]
            lines.append(f"{run['split']} / {run['train_data']} / {name}:")
            lines += [f"  {c:>5} " + " ".join(f"{v:>5}" for v in row) for c, row in zip(CLASSES, cm, strict=True)]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- IO parts
def read_external(root: Path, limit: int | None, seed: int):
    """(table of the external set with known labels, None) or (None, reason to skip)."""
    from pipeline.errors import DataError
    from pipeline.io.readers import HAM_METADATA, read_ham10000
    from pipeline.labels import CLASSES

    if not (root / HAM_METADATA).is_file():
        return None, f"{root}: no {HAM_METADATA} (external test set not available here)"
    try:
        df = read_ham10000(root)
    except DataError as exc:
        return None, f"{root}: {exc}"
    readable = np.array([(root / p).is_file() for p in df["path"]], dtype=bool)
    df = df[df["label"].isin(CLASSES).to_numpy() & readable].reset_index(drop=True)
    if df.empty:
        return None, f"{root}: no readable images with known labels"
    if limit:
        df = stratified_sample(df.assign(split="all"), limit, seed).reset_index(drop=True)
    return df, None


def run_pipeline(cfg, rows: int | None) -> dict[str, float]:
    """The pipeline's stages on ``cfg`` (``rows``: keep a stratified subsample of the manifest)."""
    import pandas as pd

    from pipeline.io.files import write_table
    from pipeline.layout import Layout
    from pipeline.stages.augment import run_augment
    from pipeline.stages.evaluate import run_evaluate
    from pipeline.stages.ingest import run_ingest
    from pipeline.stages.pairs import run_pairs
    from pipeline.stages.select import run_select
    from pipeline.stages.train import run_train
    from pipeline.stages.validate import run_validate

    times: dict[str, float] = {}
    for name, fn in [("ingest", run_ingest), ("validate", run_validate), ("augment", run_augment),
                     ("pairs", run_pairs), ("train", run_train), ("select", run_select), ("evaluate", run_evaluate)]:
        t0 = time.perf_counter()
        print(f"[quality] {name} ...", flush=True)
        fn(cfg)
        if name == "ingest" and rows:
            path = Layout.from_config(cfg).manifest
            write_table(path, stratified_sample(pd.read_parquet(path), rows, cfg.seed).reset_index(drop=True))
        times[name] = round(time.perf_counter() - t0, 1)
    return times


def run_split(cfg, *, split: str, train_data: str, external, extra_sites: tuple[str, ...], rows: int | None,
              baselines: tuple[str, ...] = BASELINES, on_model=None) -> dict:
    """One split: the twin through the pipeline, the baselines on the same augmented images; every
    model on the test split and the external set. ``on_model(run)`` gets the split's result so far
    after each model (the caller writes it, so a long run that is stopped keeps its finished models)."""
    import pandas as pd
    import torch
    import torchvision

    from pipeline.core.inference import apply_preprocess, predict_batch_uint8, tta_of
    from pipeline.core.model import build_inference, count_parameters
    from pipeline.io.compute import resolve_device
    from pipeline.io.imagecache import load_image_cache
    from pipeline.io.modelstore import load_exported
    from pipeline.io.scoring import load_images
    from pipeline.io.site_metrics import sites_of
    from pipeline.labels import CLASS_TO_INDEX, CLASSES
    from pipeline.layout import Layout

    layout = Layout.from_config(cfg)
    t0 = time.perf_counter()
    times = run_pipeline(cfg, rows)
    twin_seconds = time.perf_counter() - t0
    man = pd.read_parquet(layout.augmented_manifest)
    test = man[man["split"] == "test"].sort_values("image_id").reset_index(drop=True)
    y_te = test["label"].map(CLASS_TO_INDEX).to_numpy()
    sites = sites_of(test, layout)
    exported = load_exported(layout.export_dir)
    size = cfg.augment.image_size

    def arrays(df, name: str):
        paths = [layout.augmented_dir / p for p in df["path"]]
        cache = load_image_cache(list(df["image_id"]), paths, size, layout.cache_dir, name=f"bench_{name}",
                                 workers=cfg.evaluate.cache_workers)
        return cache.array, df["label"].map(CLASS_TO_INDEX).to_numpy()

    x_te, _ = arrays(test, "test")
    ext_x = ext_y = None
    if external is not None:
        ext_x = load_images(external, external.attrs["root"], size, cfg, name="bench_external")
        ext_y = external["label"].map(CLASS_TO_INDEX).to_numpy()
    metrics = json.loads(layout.metrics.read_text())
    best = json.loads((layout.train_dir / "best.json").read_text())
    ci = (cfg.evaluate.bootstrap_samples, cfg.evaluate.ci_level, cfg.seed)
    twin_probs = predict_batch_uint8(exported, x_te, cfg.evaluate.batch_size)
    twin_pred = decision_labels(exported, twin_probs)
    twin_ext = ext_probs = ext_pred = None
    if ext_x is not None:
        ext_probs = predict_batch_uint8(exported, ext_x, cfg.evaluate.batch_size)
        ext_pred = decision_labels(exported, ext_probs)
        twin_ext = external_report(ext_y, ext_probs, ext_pred, ci)
    kept = layout.reports_dir / PREDICTIONS_DIR  # every model's labels and probabilities, for bench/compare.py
    write_predictions(kept, "twin", "test", test["image_id"], y_te, twin_probs, twin_pred)
    if ext_x is not None:
        write_predictions(kept, "twin", "external", external["image_id"], ext_y, ext_probs, ext_pred)
    val = man[man["split"] == "val"].sort_values("image_id").reset_index(drop=True)
    x_val_raw, y_val = arrays(val, "val")
    rules = rule_comparison(y_val, predict_batch_uint8(exported, x_val_raw, cfg.evaluate.batch_size), y_te,
                            twin_probs, ext_y, ext_probs, cfg.select)
    models = {"twin": {
        "test": model_report(y_te, twin_probs, sites, extra_sites, twin_pred, ci),
        "external": twin_ext, "rules": rules,
        "params_inference": metrics["params_inference"], "params_train": metrics["params_train"],
        "selected_branch": metrics["selected_branch"], "seconds": round(twin_seconds, 1), "stage_seconds": times,
        "device": best["device"], "best_epoch": best["epoch"], "calibration": exported.meta.get("calibration"),
        "train_minutes": round(times["train"] / 60, 1), "predict_ms_b1": _latency(cfg),
        "cam_map": exported.meta.get("cam_map"), "cam_position": cam_position(exported, x_te, twin_pred),
        # every epoch's losses and seconds: a run stopped later still says how its twin trained
        "history": json.loads((layout.train_dir / "history.json").read_text()),
    }}  # fmt: skip
    run = {"split": split, "train_data": train_data, "holdout_sources": list(cfg.data.split.holdout_sources),
           "test_images": len(test), "models": models}  # fmt: skip
    if on_model is not None:
        on_model(run)
    if baselines:
        def split_rows(name: str):
            return man[man["split"] == name].sort_values("image_id")

        (x_tr, y_tr), (x_va, y_va) = arrays(split_rows("train"), "train"), (x_val_raw, y_val)
        # the augment stage colour-corrects only the train copies; val, test and external images get
        # the export's colour constancy at scoring (as the twin does in predict_batch_uint8)
        x_va, x_te_b = apply_preprocess(x_va, exported.meta), apply_preprocess(x_te, exported.meta)
        ext_b = apply_preprocess(ext_x, exported.meta) if ext_x is not None else None
        ds = resolve_device(cfg.train)  # the twin's device and precision (train stage)
        def single_branch():  # the twin's backbone as one branch, on the same pretrained weights if any
            if cfg.model.backbone is None:
                return build_inference(cfg.model)
            from pipeline.io.pretrained import load_lite0_weights

            return build_inference(cfg.model, pretrained=load_lite0_weights(include_classifier=False).state_dict)

        makers = {
            "single_branch_ce": single_branch,
            "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(weights=None, num_classes=len(CLASSES)),
        }
        for name, make in makers.items():
            if name not in baselines:
                continue
            print(f"[quality] baseline {name} ...", flush=True)
            t0 = time.perf_counter()
            torch.manual_seed(cfg.seed)
            model, _ = _train_baseline(make(), x_tr, y_tr, x_va, y_va, cfg, cfg.seed, ds)
            tta = tta_of(exported.meta)  # the twin export's views, so both are scored alike
            p_ext = _probs(model, ext_b, ds, tta) if ext_b is not None else None
            p_te = _probs(model, x_te_b, ds, tta)
            # and the twin's calibration method, fitted on the baseline's own val probabilities
            p_va, p_te, p_ext = calibrated(cfg.select.calibration, y_va, _probs(model, x_va, ds, tta), p_te, p_ext)
            report = baseline_report(y_va, p_va, y_te, p_te, sites, extra_sites, ext_y, p_ext, cfg.select, ci)
            pred_te, pred_ext = report.pop("labels")
            write_predictions(kept, name, "test", test["image_id"], y_te, p_te, pred_te)
            if p_ext is not None:
                write_predictions(kept, name, "external", external["image_id"], ext_y, p_ext, pred_ext)
            models[name] = {
                **report,
                # the twin minus this baseline on the same images (paired bootstrap)
                "twin_minus_this": {"test": versus(y_te, twin_probs, twin_pred, p_te, pred_te, ci),
                                    "external": versus(ext_y, ext_probs, ext_pred, p_ext, pred_ext, ci)},
                "params_inference": count_parameters(model), "seconds": round(time.perf_counter() - t0, 1),
                "device": ds.describe(),
            }  # fmt: skip
            if on_model is not None:
                on_model(run)
    return run


def write_results(ns, data, external, skip_reason, isic_skip, rows, overrides_used, runs) -> Path:
    """The JSON result file (rewritten after every finished split)."""
    import torch

    out = {
        "data": str(data),
        "external": str(ns.external) if external is not None else None,
        "external_skipped": skip_reason,
        "isic_skipped": isic_skip,
        "params": str(ns.params),
        "quick": ns.quick,
        "rows": rows,
        "config_overrides": overrides_used,
        "torch_threads": torch.get_num_threads(),
        "runs": runs,
        "targets_twin": {"balanced_accuracy": 0.72, "macro_auc": 0.95, "params_inference": 1_000_000},
    }
    dest = Path(ns.out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2) + "\n")
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=str(DEFAULT_PARAMS), help="params file of the runs (default: params-real.yaml)")
    ap.add_argument("--data", default=str(DEFAULT_DATA / "ham10000-224"), help="HAM10000-layout training data")
    ap.add_argument("--external", default=str(DEFAULT_DATA / "derm7pt-384"), help="external test set (never trained on)")
    ap.add_argument("--isic", default=str(DEFAULT_DATA / "isic-archive-512"), help="extra training source of --with-isic")
    isic = ap.add_mutually_exclusive_group()
    isic.add_argument("--with-isic", action="store_true", help="also run every split with --isic added to the training data")
    isic.add_argument("--isic-only", action="store_true", help="run every split only with --isic added to the training data")
    ap.add_argument("--splits", default=",".join(SPLIT_MODES), help="comma list of: " + ", ".join(SPLIT_MODES))
    ap.add_argument("--holdout", default="vidir_modern", help="comma list of sources held out by the holdout split")
    ap.add_argument("--quick", action="store_true", help="smoke run: few epochs, small images, subsampled data")
    ap.add_argument("--rows", type=int, default=None, help=f"keep this many manifest rows (--quick: {QUICK_ROWS})")
    ap.add_argument("--work", default=str(ROOT / "bench" / "results" / "quality"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "quality.json"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="key=value")
    ap.add_argument("--skip-baselines", action="store_true", help="the twin alone (same as --baselines '')")
    ap.add_argument("--baselines", default=",".join(BASELINES), help="comma list of: " + ", ".join(BASELINES))
    ap.add_argument("--with-scratch", action="store_true",
                    help="also run the from-scratch recipe (SCRATCH_RECIPE over --params) on every split")
    ns = ap.parse_args(argv)
    baselines = () if ns.skip_baselines else tuple(b.strip() for b in ns.baselines.split(",") if b.strip())
    unknown = sorted(set(baselines) - set(BASELINES))
    if unknown:
        ap.error(f"--baselines: unknown {unknown}; known: {list(BASELINES)}")
    data = Path(ns.data)
    if not (data / "HAM10000_metadata.csv").is_file():
        print(f"skip: {data} has no HAM10000_metadata.csv (real data not available here)")
        return 0
    splits = [s.strip() for s in ns.splits.split(",") if s.strip()]
    holdout = [s.strip() for s in ns.holdout.split(",") if s.strip()]
    for s in splits:
        split_overrides(s, holdout)  # unknown split names fail before any work

    import torch

    from pipeline.config import load_config, parse_override

    rows = ns.rows if ns.rows is not None else (QUICK_ROWS if ns.quick else None)
    external, skip_reason = read_external(Path(ns.external), QUICK_EXTERNAL if ns.quick else None, 0)
    if external is not None:
        external.attrs["root"] = str(Path(ns.external))
        print(f"[quality] external test set: {len(external)} images from {ns.external}", flush=True)
    else:
        print(f"[quality] external test set skipped: {skip_reason}", flush=True)
    train_sets, isic_skip = training_sets(Path(ns.isic), with_isic=ns.with_isic, isic_only=ns.isic_only)
    if isic_skip:
        print(f"[quality] {'--isic-only' if ns.isic_only else '--with-isic'} skipped: {isic_skip}", flush=True)
    if not train_sets:
        return 0

    quick = dict(QUICK_OVERRIDES)
    runs, overrides_used = [], {}
    recipes = [("", {})] + ([("scratch:", SCRATCH_RECIPE)] if ns.with_scratch else [])
    for train_name, extra in train_sets:
        for split in splits:
            for prefix, recipe in recipes:
                overrides = dict(BENCH_RUN_OVERRIDES)
                overrides.update(recipe)
                if ns.quick:
                    overrides.update(quick)
                    if load_config(ns.params, recipe).train.swa_start is not None:
                        overrides["train.swa_start"] = 1  # the recipe's averaging, from the first quick epoch
                overrides.update(data_overrides(data, extra))
                overrides.update(split_overrides(split, holdout))
                folder = f"{prefix.rstrip(':')}-" if prefix else ""
                overrides["paths.work_dir"] = str(Path(ns.work) / f"{folder}{train_name}-{split}")
                overrides.update(dict(parse_override(o) for o in ns.overrides))
                cfg = load_config(ns.params, overrides)
                print(f"[quality] === split {split}, training data {prefix}{train_name} ===", flush=True)
                overrides_used = {k: v for k, v in overrides.items() if not k.startswith(("paths.", "data."))}

                def partial(run: dict, used: dict = overrides_used) -> None:
                    write_results(ns, data, external, skip_reason, isic_skip, rows, used, [*runs, run])

                runs.append(run_split(cfg, split=split, train_data=f"{prefix}{train_name}", external=external,
                                      extra_sites=("isic_archive",) if extra else (), rows=rows,
                                      baselines=baselines, on_model=partial))  # fmt: skip
                dest = write_results(ns, data, external, skip_reason, isic_skip, rows, overrides_used, runs)
                print(f"[quality] results so far written to {dest}", flush=True)  # a long run keeps finished splits

    print()
    print(format_tables(runs))
    print()
    print(format_rules(runs))
    if skip_reason:
        print(f"\nexternal test skipped: {skip_reason}")
    print(f"\nwritten {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
