"""Score the exported inference model on the test split: metrics, plots, CAM samples (S3 + S4).

``run_evaluate(cfg)`` writes

* ``reports/metrics.json`` (:attr:`Layout.metrics`): flat keys ``accuracy``,
  ``balanced_accuracy``, ``macro_auc``, the per-class ``precision_/recall_/f1_/auc_/support_<cls>``
  of :func:`pipeline.metrics.classification_metrics`, plus ``params_inference``, ``params_train``,
  ``selected_branch``, ``val_loss_branch1``, ``val_loss_branch2``, ``best_epoch`` and
  ``test_images`` (from the export's ``config.json``, so evaluate depends only on the export and
  the data). Non-finite values (e.g. the AUC of a class absent from the test split) are written
  as ``null`` so the file stays strict JSON for DVC.
* ``reports/plots/``: ``confusion_matrix.png``, ``roc.png`` (matplotlib, Agg backend) and the
  DVC plot data ``confusion.csv`` (``actual,predicted`` per test image). The training curves are
  plotted by DVC straight from ``models/train/history.csv`` (declared in ``dvc.yaml``); they are
  not copied here, so this stage does not depend on the train folder.
* ``reports/cam/``: up to ``evaluate.cam_per_class`` CAM overlays per class for correct and for
  wrong predictions, ``<cls>_<correct|wrong>_<image_id>.png``, and ``grid.png`` with all of them.
  Choice of samples: per true class, the most confident correct predictions and the most
  confident wrong predictions (the most instructive failures), ties by manifest order.
* ``reports/predictions_test.csv``: ``image_id, label, predicted, correct`` and one probability
  column per class.

:func:`score_model` is the reusable part (the MLflow champion/challenger gate scores both models
on the same test manifest with it).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import Config
from pipeline.errors import DataError, PipelineError
from pipeline.export import ExportedModel, load_exported
from pipeline.fileio import atomic_dir, write_json, write_table
from pipeline.imagecache import load_image_cache
from pipeline.labels import CLASS_TO_INDEX, CLASSES
from pipeline.layout import Layout
from pipeline.manifest import AUGMENTED_COLUMNS, ensure_columns
from pipeline.predict import predict_batch_uint8

log = logging.getLogger(__name__)

META_KEYS: tuple[str, ...] = (
    "params_inference",
    "params_train",
    "selected_branch",
    "val_loss_branch1",
    "val_loss_branch2",
    "best_epoch",
)


def _labels(df: pd.DataFrame, where: str) -> np.ndarray:
    bad = sorted(set(df["label"].astype(str)) - set(CLASSES))
    if bad:
        raise DataError(f"{where}: unknown label(s) {bad[:5]}")
    return df["label"].astype(str).map(CLASS_TO_INDEX).to_numpy(dtype=np.int64)


def load_images(manifest_df: pd.DataFrame, images_root: str | Path, size: int, cfg: Config, name: str = "eval") -> np.ndarray:
    """uint8 (N, 3, size, size) for the manifest rows, through the decode-once cache."""
    root = Path(images_root)
    ids = manifest_df["image_id"].astype(str).tolist()
    paths = [root / p for p in manifest_df["path"].astype(str)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"{len(missing)} image file(s) listed in the manifest are missing, e.g. {missing[:3]}")
    cache = load_image_cache(ids, paths, size, Layout.from_config(cfg).cache_dir, name=name)
    return np.asarray(cache.array)


def score_model(
    exported: ExportedModel, manifest_df: pd.DataFrame, images_root: str | Path, cfg: Config
) -> tuple[dict[str, Any], np.ndarray]:
    """Metrics of ``exported`` on ``manifest_df`` (columns image_id, path, label) -> (metrics, probs).

    Images are preprocessed like training (resized to the model's ``image_size``); probabilities
    are in :data:`CLASSES` order. Every metric of :func:`pipeline.metrics.classification_metrics`.
    """
    from pipeline.metrics import classification_metrics

    ensure_columns(manifest_df, ("image_id", "path", "label"), "manifest")
    if manifest_df.empty:
        raise DataError("no images to score (empty manifest)")
    y_true = _labels(manifest_df, "manifest")
    images = load_images(manifest_df, images_root, exported.image_size, cfg)
    probs = predict_batch_uint8(exported, images, cfg.evaluate.batch_size)
    metrics = classification_metrics(y_true, probs)
    return dict(metrics), probs


def select_cam_samples(y_true: np.ndarray, probs: np.ndarray, per_class: int) -> list[tuple[int, str, int]]:
    """(true class, 'correct'|'wrong', row) of the CAM samples: per class the most confident
    correct and the most confident wrong predictions, up to ``per_class`` each (pure)."""
    y_pred = probs.argmax(axis=1)
    conf = probs.max(axis=1)
    out: list[tuple[int, str, int]] = []
    if per_class <= 0:
        return out
    for c in range(probs.shape[1]):
        for kind, mask in (("correct", (y_true == c) & (y_pred == c)), ("wrong", (y_true == c) & (y_pred != c))):
            rows = np.flatnonzero(mask)
            rows = rows[np.argsort(-conf[rows], kind="stable")][:per_class]
            out.extend((c, kind, int(r)) for r in rows)
    return out


def _finite(v: Any) -> Any:
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(float(v)) else None
    if isinstance(v, np.integer):
        return int(v)
    return v


def flat_metrics(metrics: dict[str, Any], meta: dict[str, Any], n_test: int) -> dict[str, Any]:
    """The ``metrics.json`` content: metrics + export facts, strict-JSON values (pure)."""
    out = {k: _finite(v) for k, v in metrics.items() if not isinstance(v, (list, dict, np.ndarray))}
    for k in META_KEYS:
        if k in meta:
            out[k] = _finite(meta[k])
    out["test_images"] = int(n_test)
    return out


def plot_confusion(cm: np.ndarray, classes: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    row = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, row, out=np.zeros_like(cm, dtype=float), where=row > 0)
    fig, ax = plt.subplots(figsize=(6, 5.2))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title("Test confusion matrix (counts; colour = row share)")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", color="white" if norm[i, j] > 0.5 else "black", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _roc_points(y_true: np.ndarray, probs: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """class -> (fpr, tpr, auc) from :func:`pipeline.metrics.roc_curves`, tolerant of its exact shape."""
    from pipeline.metrics import roc_curves

    raw = roc_curves(y_true, probs)
    out: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
    items = raw.items() if isinstance(raw, dict) else enumerate(raw)
    for key, val in items:
        name = CLASSES[key] if isinstance(key, (int, np.integer)) else str(key)
        if val is None:
            continue
        if isinstance(val, dict):
            fpr, tpr = val.get("fpr"), val.get("tpr")
            auc = val.get("auc", float("nan"))
        else:
            fpr, tpr, *rest = val
            auc = rest[0] if rest else float("nan")
        if fpr is None or tpr is None:
            continue
        out[name] = (np.asarray(fpr, dtype=float), np.asarray(tpr, dtype=float), float(auc) if auc is not None else float("nan"))
    return out


def plot_roc(y_true: np.ndarray, probs: np.ndarray, path: Path, metrics: dict[str, Any] | None = None) -> None:
    """One-vs-rest ROC per class; the legend shows ``auc_<cls>`` from ``metrics`` when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, (fpr, tpr, auc) in _roc_points(y_true, probs).items():
        if not math.isfinite(auc) and metrics is not None and metrics.get(f"auc_{name}") is not None:
            auc = float(metrics[f"auc_{name}"])
        label = f"{name} (AUC {auc:.3f})" if math.isfinite(auc) else f"{name} (AUC n/a)"
        ax.plot(fpr, tpr, lw=1.4, label=label)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("Test ROC, one-vs-rest")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_cam_samples(
    exported: ExportedModel,
    images: np.ndarray,
    ids: Sequence[str],
    y_true: np.ndarray,
    probs: np.ndarray,
    per_class: int,
    folder: Path,
) -> list[str]:
    """CAM overlays of the selected samples + ``grid.png`` into ``folder``; returns file names."""
    import torch

    from pipeline.cam import cam_for, overlay, save_overlay_png
    from pipeline.preprocess import to_model_input

    samples = select_cam_samples(y_true, probs, per_class)
    tiles: list[tuple[np.ndarray, str]] = []
    names: list[str] = []
    for c, kind, row in samples:
        img = np.ascontiguousarray(images[row].transpose(1, 2, 0))
        x = to_model_input(torch.from_numpy(np.array(images[row][None])))
        cam, pred, p = cam_for(exported.model, x)
        name = f"{CLASSES[c]}_{kind}_{ids[row]}.png"
        save_overlay_png(folder / name, img, cam)
        names.append(name)
        pred_i = int(pred)
        conf = float(np.asarray(p.detach().cpu() if hasattr(p, "detach") else p).reshape(-1)[pred_i])
        tiles.append((overlay(img, cam), f"{CLASSES[c]} -> {CLASSES[pred_i]} ({conf:.2f})"))
    _grid(tiles, folder / "grid.png")
    return names


def _grid(tiles: list[tuple[np.ndarray, str]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(tiles))
    cols = min(6, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, 2.3 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (img, title) in zip(axes.ravel(), tiles, strict=False):
        ax.imshow(img)
        ax.set_title(title, fontsize=7)
    if not tiles:
        axes[0, 0].text(0.5, 0.5, "no CAM samples", ha="center", va="center")
    fig.suptitle("CAM (true -> predicted (confidence))", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_evaluate(cfg: Config) -> dict[str, Any]:
    """The ``evaluate`` stage. Returns the headline metrics."""
    from pipeline.metrics import confusion_matrix

    layout = Layout.from_config(cfg)
    if not (layout.export_dir / "config.json").is_file():
        raise PipelineError(f"{layout.export_dir}: no exported model (run the select stage first)")
    exported = load_exported(layout.export_dir)
    try:
        aug = pd.read_parquet(layout.augmented_manifest)
    except FileNotFoundError:
        raise DataError(f"{layout.augmented_manifest}: not found (run the augment stage first)") from None
    ensure_columns(aug, AUGMENTED_COLUMNS, str(layout.augmented_manifest))
    test = aug[aug["split"].astype(str) == "test"].reset_index(drop=True)
    if test.empty:
        raise DataError(f"{layout.augmented_manifest}: no test images")

    metrics, probs = score_model(exported, test, layout.augmented_dir, cfg)
    y_true = _labels(test, str(layout.augmented_manifest))
    y_pred = probs.argmax(axis=1)
    ids = test["image_id"].astype(str).tolist()
    n_cls = len(exported.classes)
    cm = np.asarray(confusion_matrix(y_true, y_pred, n_cls))

    with atomic_dir(layout.plots_dir) as tmp:
        plot_confusion(cm, exported.classes, tmp / "confusion_matrix.png")
        plot_roc(y_true, probs, tmp / "roc.png", metrics)
        pd.DataFrame(
            {"actual": [CLASSES[i] for i in y_true], "predicted": [CLASSES[i] for i in y_pred]}
        ).to_csv(tmp / "confusion.csv", index=False)

    images = load_images(test, layout.augmented_dir, exported.image_size, cfg)
    with atomic_dir(layout.cam_dir) as tmp:
        cam_files = write_cam_samples(exported, images, ids, y_true, probs, cfg.evaluate.cam_per_class, tmp)

    pred_df = pd.DataFrame(probs, columns=list(exported.classes))
    pred_df.insert(0, "correct", (y_true == y_pred).astype(int))
    pred_df.insert(0, "predicted", [CLASSES[i] for i in y_pred])
    pred_df.insert(0, "label", [CLASSES[i] for i in y_true])
    pred_df.insert(0, "image_id", ids)
    write_table(layout.reports_dir / "predictions_test.csv", pred_df)

    flat = flat_metrics(metrics, exported.meta, len(test))
    write_json(layout.metrics, flat)
    log.info(
        "test: accuracy %.4f, balanced accuracy %.4f, macro AUC %s on %d images (branch %s)",
        flat.get("accuracy") or 0.0,
        flat.get("balanced_accuracy") or 0.0,
        flat.get("macro_auc"),
        len(test),
        flat.get("selected_branch"),
    )
    return {
        "accuracy": flat.get("accuracy"),
        "balanced_accuracy": flat.get("balanced_accuracy"),
        "macro_auc": flat.get("macro_auc"),
        "selected_branch": flat.get("selected_branch"),
        "test_images": len(test),
        "cam_files": len(cam_files),
        "metrics": str(layout.metrics),
    }
