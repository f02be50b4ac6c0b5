"""Stage ``evaluate``: the exported model on the test split -- metrics, plots, CAM samples (S3 + S4).

Writes

* ``reports/metrics.json`` (:attr:`Layout.metrics`): flat keys ``accuracy``,
  ``balanced_accuracy``, ``macro_auc``, the per-class ``precision_/recall_/f1_/auc_/support_<cls>``
  of :func:`pipeline.core.metrics.classification_metrics`, plus ``params_inference``,
  ``params_train``, ``selected_branch``, ``val_loss_branch1``, ``val_loss_branch2``, ``best_epoch``
  and ``test_images`` (from the export's ``config.json``, so evaluate depends only on the export and
  the data). Non-finite values (e.g. the AUC of a class absent from the test split) are written as
  ``null`` so the file stays strict JSON for DVC.
* ``reports/plots/``: ``confusion_matrix.png``, ``roc.png`` and the DVC plot data ``confusion.csv``
  (``actual,predicted`` per test image). The training curves are plotted by DVC straight from
  ``models/train/history.csv`` (declared in the stage table), not copied here.
* per acquisition source (the validated manifest's ``source_site`` of each test image's original,
  :mod:`pipeline.io.site_metrics`): ``site_<site>_<n|balanced_accuracy|accuracy|macro_auc|ece>`` in
  ``metrics.json``, and ``reports/metrics_detail.json`` with per-class recall (classes present)
  and the confusion matrix, overall and per source (metrics over only the classes a source has,
  see :mod:`pipeline.core.metrics`).
* with ``evaluate.bootstrap_samples`` > 0: ``<balanced_accuracy|accuracy|macro_auc>_ci_low`` /
  ``_ci_high`` and ``ci_level`` in ``metrics.json``: the ``evaluate.ci_level`` interval over class-stratified bootstrap
  resamples of the test images (seeded by ``seed``; :func:`pipeline.core.metrics.bootstrap_intervals`),
  under the export's decision rule; the same with the level and resamples in ``metrics_detail.json``
  (``overall.intervals``). They say how much the figure depends on which test images were drawn.
* ``reports/cam/``: up to ``evaluate.cam_per_class`` CAM pictures per class for correct and for
  wrong predictions, ``<cls>_<correct|wrong>_<image_id>.png``, and ``grid.png`` with all of them:
  per true class the most confident correct and the most confident wrong predictions
  (:func:`pipeline.core.evaluation.select_cam_samples`). Each is drawn like ``predict --cam-dir``
  (:func:`pipeline.io.overlays.explanation_panel`): the original picture the test image was resized
  from (the validated manifest's path of its ``source_id`` below the data root, at its own
  resolution) beside it with the map, captioned with the reported label, its probability and the
  class the map is for; where that file is not available, the stored (square) test image.
* ``reports/predictions_test.csv``: ``image_id, label, predicted, correct`` and one probability
  column per class.

Labels (``predicted``, the confusion matrix, the label metrics) follow the export's decision rule
(:func:`pipeline.core.inference.predicted_labels`; arg-max for an export without one) -- what the
pyfunc and the gate use; ``metrics.json`` adds ``argmax_accuracy``, ``argmax_balanced_accuracy``
and ``argmax_macro_f1`` of plain arg-max. Probabilities include the export's colour constancy and
test-time augmentation (:func:`pipeline.io.scoring.score_model`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import Config
from pipeline.core.evaluation import flat_metrics, interval_flat_metrics, predictions_frame, select_cam_samples
from pipeline.core.inference import Model, cam_of, predicted_labels
from pipeline.core.metrics import bootstrap_intervals, confusion_matrix
from pipeline.core.plots import confusion_png, grid_png, roc_png
from pipeline.core.schema import AUGMENTED_COLUMNS
from pipeline.errors import PipelineError
from pipeline.io.files import atomic_dir, write_json, write_table
from pipeline.io.manifests import read_parquet, split_rows
from pipeline.io.modelstore import load_exported
from pipeline.io.explain import load_original, original_paths
from pipeline.io.images import save_png
from pipeline.io.overlays import caption, explanation_panel
from pipeline.io.scoring import label_index, load_images, score_model
from pipeline.io.site_metrics import write_site_metrics
from pipeline.labels import CLASSES
from pipeline.layout import Layout

log = logging.getLogger(__name__)


def write_cam_samples(
    exported: Model,
    images: np.ndarray,
    ids: Sequence[str],
    y_true: np.ndarray,
    probs: np.ndarray,
    per_class: int,
    folder: Path,
    alpha: float,
    y_pred: np.ndarray | None = None,
    originals: Sequence[Path | None] | None = None,
) -> list[str]:
    """CAM pictures of the selected samples + ``grid.png`` into ``folder``; returns file names.
    The map is of the reported label (``y_pred``, default arg-max), computed on the stored image
    and drawn on its original (``originals``: the source file per row, ``None`` = the stored image)."""
    tiles: list[tuple[np.ndarray, str]] = []
    names: list[str] = []
    y_pred = probs.argmax(axis=1) if y_pred is None else y_pred
    for c, kind, row in select_cam_samples(y_true, probs, per_class, y_pred):
        original = load_original(originals[row]) if originals is not None else None
        img = original if original is not None else np.ascontiguousarray(images[row].transpose(1, 2, 0))
        pred = int(y_pred[row])
        cam, _, _ = cam_of(exported, images[row], pred, img.shape[:2])
        name = f"{CLASSES[c]}_{kind}_{ids[row]}.png"
        panel = explanation_panel(img, cam, alpha, caption(CLASSES[pred], float(probs[row, pred]), CLASSES[pred]))
        save_png(folder / name, panel)
        names.append(name)
        tiles.append((panel, f"true {CLASSES[c]}"))
    (folder / "grid.png").write_bytes(grid_png(tiles))
    return names


def run_evaluate(cfg: Config) -> dict[str, Any]:
    layout = Layout.from_config(cfg)
    if not (layout.export_dir / "config.json").is_file():
        raise PipelineError(f"{layout.export_dir}: no exported model (run the select stage first)")
    exported = load_exported(layout.export_dir)
    aug = read_parquet(layout.augmented_manifest, "augment", AUGMENTED_COLUMNS)
    test = split_rows(aug, "test", str(layout.augmented_manifest))

    metrics, probs = score_model(exported, test, layout.augmented_dir, cfg)
    y_true = label_index(test, str(layout.augmented_manifest))
    y_pred = predicted_labels(exported, probs)  # the export's decision rule (arg-max without one)
    ids = test["image_id"].astype(str).tolist()
    cm = np.asarray(confusion_matrix(y_true, y_pred, len(exported.classes)))

    with atomic_dir(layout.plots_dir) as tmp:
        (tmp / "confusion_matrix.png").write_bytes(confusion_png(cm, exported.classes))
        (tmp / "roc.png").write_bytes(roc_png(y_true, probs, metrics))
        pd.DataFrame(
            {"actual": [CLASSES[i] for i in y_true], "predicted": [CLASSES[i] for i in y_pred]}
        ).to_csv(tmp / "confusion.csv", index=False)

    images = load_images(test, layout.augmented_dir, exported.image_size, cfg)
    ev = cfg.evaluate
    with atomic_dir(layout.cam_dir) as tmp:
        cam_files = write_cam_samples(exported, images, ids, y_true, probs, ev.cam_per_class, tmp, cfg.cam.alpha,
                                       y_pred, original_paths(test, cfg))

    write_table(layout.predictions, predictions_frame(ids, y_true, y_pred, probs))

    flat = flat_metrics(metrics, exported.meta, len(test))
    detail: dict[str, Any] | None = None
    if ev.bootstrap_samples > 0:
        ci = bootstrap_intervals(y_true, probs, y_pred, ev.bootstrap_samples, ev.ci_level, cfg.seed)
        flat.update(interval_flat_metrics(ci, ev.ci_level))
        detail = {"level": ev.ci_level, "samples": ev.bootstrap_samples, **ci}
    flat.update(write_site_metrics(layout, test, y_true, probs, exported.classes, y_pred, detail))
    write_json(layout.metrics, flat)
    log.info(
        "test: accuracy %.4f, balanced accuracy %.4f, macro AUC %s on %d images (branch %s)",
        flat.get("accuracy") or 0.0, flat.get("balanced_accuracy") or 0.0, flat.get("macro_auc"), len(test),
        flat.get("selected_branch"),
    )  # fmt: skip
    if detail is not None:
        log.info("test: %.0f%% interval of balanced accuracy %.4f-%.4f, macro AUC %s-%s (%d resamples)",
                 100 * ev.ci_level, *detail["balanced_accuracy"], *detail["macro_auc"], ev.bootstrap_samples)
    return {
        "accuracy": flat.get("accuracy"),
        "balanced_accuracy": flat.get("balanced_accuracy"),
        "macro_auc": flat.get("macro_auc"),
        "selected_branch": flat.get("selected_branch"),
        "test_images": len(test),
        "cam_files": len(cam_files),
        "metrics": str(layout.metrics),
    }
