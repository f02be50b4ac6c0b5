"""Report figures as PNG bytes (matplotlib, Agg backend): confusion matrix, ROC, training curves,
CAM grid. Pure: data in, bytes out; the stages write the files.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core.metrics import roc_curves

HISTORY_CURVES: tuple[str, ...] = (
    "train_loss", "val_loss_branch1", "val_loss_branch2", "val_loss_discriminator", "val_loss_total",
)  # fmt: skip


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any, dpi: int) -> bytes:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def confusion_png(cm: np.ndarray, classes: Sequence[str]) -> bytes:
    """Counts in the cells, colour = share of the row (the actual class)."""
    plt = _pyplot()
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
            colour = "white" if norm[i, j] > 0.5 else "black"
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", color=colour, fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return _png(fig, 110)


def roc_png(y_true: np.ndarray, probs: np.ndarray, metrics: dict[str, Any] | None = None) -> bytes:
    """One-vs-rest ROC per class; the legend shows ``auc_<cls>`` from ``metrics`` when given."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, (fpr, tpr) in roc_curves(y_true, probs).items():
        auc = float("nan")
        if metrics is not None and metrics.get(f"auc_{name}") is not None:
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
    return _png(fig, 110)


def history_png(history: pd.DataFrame) -> bytes | None:
    """Training curves (losses per epoch for both branches, discriminator, total); None without data."""
    cols = [c for c in HISTORY_CURVES if c in history.columns]
    if history.empty or not cols or "epoch" not in history.columns:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for c in cols:
        ax.plot(history["epoch"], history[c], marker="o", ms=3, label=c)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title("Training curves")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig, 100)


def grid_png(tiles: list[tuple[np.ndarray, str]]) -> bytes:
    """Images with titles in a grid (the CAM sample sheet): up to 6 columns of square tiles, fewer
    of wider ones (e.g. the side-by-side CAM pictures: 3 columns, each tile as wide as its aspect)."""
    plt = _pyplot()
    n = max(1, len(tiles))
    aspect = max((img.shape[1] / max(1, img.shape[0]) for img, _ in tiles), default=1.0)
    aspect = float(min(max(aspect, 1.0), 3.0))
    cols = min(max(1, int(6 // aspect)), n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * aspect * cols, 2.3 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (img, title) in zip(axes.ravel(), tiles, strict=False):
        ax.imshow(img)
        ax.set_title(title, fontsize=7)
    if not tiles:
        axes[0, 0].text(0.5, 0.5, "no CAM samples", ha="center", va="center")
    fig.suptitle("CAM samples (title: the true class; caption: predicted, probability, class of the map)", fontsize=9)
    fig.tight_layout()
    return _png(fig, 100)
