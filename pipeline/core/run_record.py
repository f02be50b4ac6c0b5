"""What one MLflow run holds, the pure part: params, metric names, the one-page HTML run report.

The ``track`` stage (:mod:`pipeline.stages.track`) logs what these functions compute.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Mapping
from typing import Any

import pandas as pd

from pipeline.config import Config

EPOCH_SKIP = ("epoch",)  # history columns that are not metrics
META_METRICS = {  # metrics.json key -> MLflow metric name (everything else gets "test_")
    "selected_branch": "selected_branch",
    "val_loss_branch1": "best_val_loss_branch1",
    "val_loss_branch2": "best_val_loss_branch2",
    "best_epoch": "best_epoch",
    "params_inference": "params_inference",
    "params_train": "params_train",
    "test_images": "test_images",
}



def param_value(value: Any, limit: int = 6000) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def params_of(cfg: Config, limit: int = 6000) -> dict[str, str]:
    return {k: param_value(v, limit) for k, v in sorted(cfg.flat().items())}


def _finite(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None if v is None else float(v)
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def history_metrics(history: pd.DataFrame) -> list[tuple[str, float, int]]:
    """``(key, value, step)`` for every numeric history column, step = epoch."""
    out: list[tuple[str, float, int]] = []
    if history is None or history.empty or "epoch" not in history.columns:
        return out
    for _, row in history.iterrows():
        step = int(row["epoch"])
        for col in history.columns:
            if col in EPOCH_SKIP:
                continue
            v = _finite(row[col])
            if v is not None:
                out.append((str(col), v, step))
    return out


def final_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """metrics.json -> MLflow metric names (``test_*`` for evaluation results)."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        f = _finite(v)
        if f is None:
            continue
        name = META_METRICS.get(k)
        if name is None:
            name = k if k.startswith("test_") else f"test_{k}"
        out[name] = f
    return out


def _img_tag(png: bytes, title: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(title)}</figcaption></figure>"
    )


def _table(rows: Mapping[str, Any]) -> str:
    body = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in rows.items()
    )
    return f"<table>{body}</table>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if math.isfinite(v) else str(v)
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True, default=str)
    return str(v)


def build_report(
    *,
    title: str,
    run_id: str,
    metrics: Mapping[str, Any],
    images: Mapping[str, bytes | None],
    validation: Mapping[str, Any],
    pairs_summary: Any,
    tags: Mapping[str, str],
    gate: Mapping[str, Any] | None = None,
    card: str | None = None,
) -> str:
    """The one-page HTML run report: everything is passed in; PNG images (title -> bytes, None
    for a missing one) are inlined as base64. ``track`` writes it; ``register`` writes it again
    with the gate decision (``gate``: the register summary) and the model card."""
    headline = {k: metrics[k] for k in ("accuracy", "balanced_accuracy", "macro_auc") if k in metrics}
    meta = {k: metrics[k] for k in META_METRICS if k in metrics}
    per_class = {k: v for k, v in metrics.items() if k not in headline and k not in meta}
    status = validation.get("success")
    badge = {True: ("passed", "#1a7f37"), False: ("FAILED", "#cf222e")}.get(status, ("unknown", "#6e7781"))
    figures = "".join(_img_tag(png, name) for name, png in images.items() if png)
    if gate:
        gate_html = (
            f"<h2>Registry</h2><p>Model <b>{html.escape(str(gate.get('model_name')))}</b> version "
            f"<b>{html.escape(str(gate.get('version')))}</b> &middot; gate decision "
            f"<b>{html.escape(str(gate.get('decision')))}</b> &middot; champion is version "
            f"{html.escape(str(gate.get('champion_version')))}</p><p>{html.escape(str(gate.get('reason')))}</p>"
        )
    else:
        gate_html = "<h2>Registry</h2><p>not registered yet (the register stage adds the gate decision here)</p>"
    card_html = f"<h2>Model card</h2><pre class=\"card\">{html.escape(card)}</pre>" if card else ""
    pairs_html = (
        f"<pre>{html.escape(json.dumps(pairs_summary, indent=2, sort_keys=True, default=str))}</pre>"
        if pairs_summary is not None
        else "<p>no pair-manifest summary</p>"
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:1.5rem;max-width:1200px;color:#1f2328}}
table{{border-collapse:collapse;margin:.5rem 0 1rem}} th,td{{border:1px solid #d0d7de;padding:.2rem .6rem;text-align:left;font-size:.85rem}}
th{{background:#f6f8fa}} figure{{display:inline-block;margin:.5rem;vertical-align:top}} img{{max-width:560px}}
figcaption{{font-size:.8rem;color:#57606a}} .badge{{color:#fff;padding:.1rem .5rem;border-radius:.4rem}}
.cols{{display:flex;gap:2rem;flex-wrap:wrap}} pre{{background:#f6f8fa;padding:.5rem;font-size:.8rem;white-space:pre-wrap}}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>MLflow run <code>{html.escape(run_id)}</code> &middot; validation
<span class="badge" style="background:{badge[1]}">{badge[0]}</span>
(result sha256 <code>{html.escape(str(validation.get("digest")))}</code>)</p>
<div class="cols"><div><h2>Test metrics</h2>{_table(headline)}<h3>Model</h3>{_table(meta)}</div>
<div><h2>Per class</h2>{_table(per_class)}</div></div>
{gate_html}
<h2>Plots</h2>{figures or "<p>no plots</p>"}
<h2>Pair manifest</h2>{pairs_html}
<h2>Lineage</h2>{_table(dict(sorted(tags.items())))}
{card_html}
</body></html>
"""
