"""The run report (``reports/run_report.html``) from the files of one run folder.

Written by ``track`` (before the gate) and again by ``register`` (with the gate decision and the
model card); both read the same run folder through :func:`render_run_report`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.core.plots import history_png
from pipeline.core.run_record import build_report
from pipeline.io.files import read_json, read_json_object
from pipeline.io.provenance import validation_result
from pipeline.layout import Layout


def _bytes(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


def training_curves(layout: Layout) -> bytes | None:
    path = layout.train_dir / "history.csv"
    return history_png(pd.read_csv(path)) if path.is_file() else None


def render_run_report(
    layout: Layout,
    run_id: str,
    tags: Mapping[str, str],
    gate: Mapping[str, Any] | None = None,
    card: str | None = None,
) -> str:
    images = {
        "confusion matrix": _bytes(layout.plots_dir / "confusion_matrix.png"),
        "ROC": _bytes(layout.plots_dir / "roc.png"),
        "training curves": training_curves(layout),
        "CAM samples": _bytes(layout.cam_dir / "grid.png"),
    }
    return build_report(
        title=f"skin-twin run {layout.work_dir.resolve().name}",
        run_id=run_id,
        metrics=read_json_object(layout.metrics),
        images=images,
        validation=validation_result(layout),
        pairs_summary=read_json(layout.pairs_summary),
        tags={k: v for k, v in tags.items() if k.startswith(("skin_twin.", "mlflow.source.git"))},
        gate=gate,
        card=card,
    )
