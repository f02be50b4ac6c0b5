"""Per-source test metrics for the evaluate stage: which acquisition source each test image came
from, and the ``site_*`` keys / ``metrics_detail.json`` (pure parts in :mod:`pipeline.core.metrics`
and :mod:`pipeline.core.evaluation`).

A test image of the augmented set is mapped to the ``source_site`` of its original (its
``source_id``) in the validated manifest; ``unknown`` when the manifest is absent or lacks it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core.evaluation import detail_report, site_flat_metrics
from pipeline.core.metrics import per_group_metrics, subset_metrics
from pipeline.io.files import write_json
from pipeline.io.manifests import UNKNOWN_SITE, read_manifest
from pipeline.layout import Layout

log = logging.getLogger(__name__)


def sites_of(test: pd.DataFrame, layout: Layout) -> np.ndarray:
    """``source_site`` of each augmented test row (via its ``source_id`` in the validated manifest)."""
    if not layout.validated_manifest.is_file():
        return np.full(len(test), UNKNOWN_SITE, dtype=object)
    manifest = read_manifest(layout.validated_manifest, produced_by="validate")
    site = dict(zip(manifest["image_id"].astype(str), manifest["source_site"].astype(str), strict=True))
    return np.array([site.get(str(i), UNKNOWN_SITE) for i in test["source_id"]], dtype=object)


def write_site_metrics(
    layout: Layout,
    test: pd.DataFrame,
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    y_pred: np.ndarray | None = None,
    intervals: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``metrics_detail.json`` (overall + per source, confusion matrices) and return the flat
    ``site_<site>_<key>`` entries for ``metrics.json``. ``y_pred``: the labels of the export's
    decision rule (default arg-max); ``intervals``: the overall confidence intervals, kept as
    ``overall.intervals``."""
    per_site = per_group_metrics(y_true, probs, sites_of(test, layout), classes, y_pred=y_pred)
    overall = subset_metrics(y_true, probs, classes, y_pred=y_pred)
    if intervals is not None:
        overall["intervals"] = intervals
    write_json(layout.metrics_detail, detail_report(classes, overall, per_site))
    for site, m in per_site.items():
        log.info("test %s: n %d, balanced accuracy %.4f, accuracy %.4f", site, m["n"], m["balanced_accuracy"],
                 m["accuracy"])  # fmt: skip
    return site_flat_metrics(per_site)
