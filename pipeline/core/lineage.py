"""Lineage, the pure part: the content digest of a data split and the chain of a model version.

The facts are gathered at tracking time (:mod:`pipeline.io.provenance`) as MLflow run tags and
dataset inputs; for a registered version, :func:`lineage_chain` assembles them into

    model version -> run -> code commit -> params (hash + key values) -> data digests per split
    -> validation result -> pair manifest -> Airflow run (when there was one)

and :func:`format_chain` prints it (the ``lineage`` stage, :mod:`pipeline.stages.lineage`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import pandas as pd

from pipeline.errors import PipelineError

TAG = "skin_twin."  # prefix of every lineage tag
DATASET_DIGEST_CHARS = 32
SPLIT_CONTEXT: dict[str, str] = {"train": "training", "val": "validation", "test": "testing"}
# Parameters echoed in the printed chain (the full set is in the run's params).
KEY_PARAMS: tuple[str, ...] = (
    "seed",
    "data.source",
    "augment.image_size",
    "train.epochs",
    "train.batch_size",
    "train.lr",
    "loss.A",
    "loss.B",
    "loss.C",
    "pairs.positive_fraction",
)



def content_digest(df: pd.DataFrame) -> str:
    """sha256 over the sorted ``(sha256, label)`` rows: what the images are and how they are labelled."""
    missing = [c for c in ("sha256", "label") if c not in df.columns]
    if missing:
        raise PipelineError(f"manifest: missing column(s) {missing} for the content digest")
    rows = sorted(zip(df["sha256"].astype(str), df["label"].astype(str), strict=True))
    h = hashlib.sha256()
    for sha, label in rows:
        h.update(f"{sha}\t{label}\n".encode())
    return h.hexdigest()



def _tag(tags: Mapping[str, str], key: str) -> str | None:
    v = tags.get(f"{TAG}{key}")
    return v if v not in (None, "") else None


def _source_uri(source: str | None) -> str | None:
    """The ``uri`` of a dataset source JSON (``{"uri": ...}``), else the text itself."""
    try:
        data = json.loads(source or "")
    except ValueError:
        return source
    return data.get("uri", source) if isinstance(data, dict) else source


def _model_id(version: Any) -> str | None:
    mid = getattr(version, "model_id", None)
    if mid:
        return mid
    src = str(getattr(version, "source", "") or "")
    return src.removeprefix("models:/") if src.startswith("models:/m-") else None


def lineage_chain(version: Any, run: Any, datasets: list[Any]) -> dict[str, Any]:
    """The chain dict from a ModelVersion, its Run and the run's dataset inputs (pure)."""
    tags = dict(run.data.tags)
    params = dict(run.data.params)
    data: dict[str, Any] = {}
    for split, context in SPLIT_CONTEXT.items():
        entry: dict[str, Any] = {"tag_digest": _tag(tags, f"data_digest.{split}"), "rows": _tag(tags, f"data_rows.{split}")}
        for di in datasets:
            ctx = {t.key: t.value for t in di.tags}.get("mlflow.data.context")
            if ctx == context or di.dataset.name == split:
                entry.update(dataset=di.dataset.name, digest=di.dataset.digest, source=_source_uri(di.dataset.source), context=ctx)
        data[split] = entry
    chain: dict[str, Any] = {
        "model": {
            "name": version.name,
            "version": str(version.version),
            "aliases": sorted(getattr(version, "aliases", []) or []),
            "source": version.source,
            "model_id": _model_id(version),
            "gate": {k.removeprefix("gate."): v for k, v in (version.tags or {}).items() if k.startswith("gate.")},
        },
        "run": {
            "run_id": run.info.run_id,
            "experiment_id": run.info.experiment_id,
            "status": run.info.status,
            "work_dir": _tag(tags, "work_dir"),
        },
        "code": {
            "commit": _tag(tags, "git_commit"),
            "dirty": _tag(tags, "git_dirty"),
            "source": _tag(tags, "git_source"),
            "package_version": _tag(tags, "version"),
        },
        "params": {
            "digest": _tag(tags, "params_digest"),
            "values": {k: params[k] for k in KEY_PARAMS if k in params},
        },
        "data": data,
        "dvc": {k.removeprefix(f"{TAG}dvc."): v for k, v in tags.items() if k.startswith(f"{TAG}dvc.")},
        "validation": {"success": _tag(tags, "validation.success"), "digest": _tag(tags, "validation.digest")},
        "pairs": {
            "summary_digest": _tag(tags, "pairs.summary_digest"),
            "manifest_digest": _tag(tags, "pairs.manifest_digest"),
        },
        "export_digest": _tag(tags, "export_digest"),
    }
    airflow = {k.removeprefix(f"{TAG}airflow."): v for k, v in tags.items() if k.startswith(f"{TAG}airflow.")}
    if airflow:
        chain["airflow"] = airflow
    return chain


def format_chain(chain: Mapping[str, Any]) -> str:
    """The human-readable chain, one link per line (pure)."""
    m, r, c, p = chain["model"], chain["run"], chain["code"], chain["params"]
    dirty = {"true": " (uncommitted changes)", "false": ""}.get(str(c.get("dirty")), " (dirty: unknown)")
    lines = [
        f"model    {m['name']} v{m['version']} aliases={','.join(m['aliases']) or '-'} (id {m.get('model_id')})",
        f"  gate   {m['gate'].get('decision', '-')}: {m['gate'].get('reason', '')}".rstrip(),
        f"-> run   {r['run_id']} (experiment {r['experiment_id']}, {r['status']}) work_dir={r['work_dir']}",
        f"-> code  {c['commit']}{dirty} [{c['source']}] skin-twin {c['package_version']}",
        f"-> params {p['digest']}",
    ]
    lines += [f"     {k} = {v}" for k, v in p["values"].items()]
    lines.append("-> data")
    for split, d in chain["data"].items():
        lines.append(f"     {split:5s} {d.get('digest') or d.get('tag_digest')} ({d.get('rows')} images) from {d.get('source')}")
    for k, v in chain.get("dvc", {}).items():
        lines.append(f"     dvc {k} = {v}")
    v = chain["validation"]
    lines.append(f"-> validation success={v['success']} result sha256 {v['digest']}")
    pr = chain["pairs"]
    lines.append(f"-> pairs summary sha256 {pr['summary_digest']} manifest sha256 {pr['manifest_digest']}")
    if "airflow" in chain:
        a = chain["airflow"]
        lines.append(f"-> airflow dag {a.get('dag_id')} run {a.get('dag_run_id')} try {a.get('try_number')}")
    else:
        lines.append("-> airflow (not run under Airflow)")
    return "\n".join(lines)
