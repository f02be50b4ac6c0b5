"""Lineage, the pure part: the content digest of a data split and the chain of a model version.

The facts are gathered at tracking time (:mod:`pipeline.io.provenance`) as MLflow run tags and
dataset inputs; for a registered version, :func:`lineage_chain` assembles them into

    model version -> run -> code commit -> params (hash + key values) -> data digests per split
    (and the ingest summary: near-duplicate joins of the split) -> validation result -> pair manifest
    -> Airflow run (when there was one)

and :func:`format_chain` prints it (the ``lineage`` stage, :mod:`pipeline.stages.lineage`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import pandas as pd

from pipeline.core.schema import SPLITS
from pipeline.errors import PipelineError

TAG = "skin_twin."  # prefix of every lineage tag
MANIFESTS = "lineage/manifests"  # run artifact folder: <split>.csv, the source of each MLflow dataset
ARTIFACT_INDEX = "lineage/artifacts.json"  # run artifact: artifact path -> sha256, written by track
GATE_INDEX = "lineage/gate_artifacts.json"  # the same for what register adds (model card, final report)
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
    """The address in a dataset source JSON (``{"uri": ...}`` for files, ``{"url": ...}`` for a
    tracking server's download link), else the text itself."""
    try:
        data = json.loads(source or "")
    except ValueError:
        return source
    return (data.get("uri") or data.get("url") or source) if isinstance(data, dict) else source


def _model_id(version: Any) -> str | None:
    mid = getattr(version, "model_id", None)
    if mid:
        return mid
    src = str(getattr(version, "source", "") or "")
    return src.removeprefix("models:/") if src.startswith("models:/m-") else None


def _prefixed(tags: Mapping[str, str], prefix: str) -> dict[str, str]:
    return {k.removeprefix(prefix): v for k, v in tags.items() if k.startswith(prefix)}


def lineage_chain(version: Any, run: Any, datasets: list[Any]) -> dict[str, Any]:
    """The chain dict from a ModelVersion, its Run and the run's dataset inputs (pure)."""
    tags = dict(run.data.tags)
    params = dict(run.data.params)
    data: dict[str, Any] = {
        "source": _tag(tags, "data_source"),
        "root": _tag(tags, "data_root"),
        "ingest_summary_digest": _tag(tags, "ingest.summary_digest"),
        "near_duplicate_joins": _tag(tags, "ingest.near_duplicate_joins"),
    }
    for split, context in SPLIT_CONTEXT.items():
        entry: dict[str, Any] = {
            "tag_digest": _tag(tags, f"data_digest.{split}"),
            "rows": _tag(tags, f"data_rows.{split}"),
            "manifest_sha256": _tag(tags, f"data_manifest_sha256.{split}"),
        }
        for di in datasets:
            ctx = {t.key: t.value for t in di.tags}.get("mlflow.data.context")
            if ctx == context or di.dataset.name == split:
                entry.update(dataset=di.dataset.name, digest=di.dataset.digest, source=_source_uri(di.dataset.source), context=ctx)
        data[split] = entry
    airflow = {k: v for k, v in _prefixed(tags, f"{TAG}airflow.").items() if not k.startswith("task.")}
    tasks: dict[str, dict[str, str]] = {}
    for key, value in _prefixed(tags, f"{TAG}airflow.task.").items():
        task, _, field = key.partition(".")
        tasks.setdefault(task, {})[field] = value
    vtags = dict(version.tags or {})
    chain: dict[str, Any] = {
        "model": {
            "name": version.name,
            "version": str(version.version),
            "aliases": sorted(getattr(version, "aliases", []) or []),
            "source": version.source,
            "model_id": _model_id(version),
            "gate": _prefixed(vtags, "gate."),
            "model_card": vtags.get(f"{TAG}model_card"),
        },
        "run": {
            "run_id": run.info.run_id,
            "experiment_id": run.info.experiment_id,
            "status": run.info.status,
            "work_dir": _tag(tags, "work_dir"),
            "user": getattr(run.info, "user_id", None) or tags.get("mlflow.user"),
            "triggered_by": _tag(tags, "triggered_by"),
            "triggered_via": _tag(tags, "triggered_via"),
        },
        "code": {
            "commit": _tag(tags, "git_commit"),
            "dirty": _tag(tags, "git_dirty"),
            "source": _tag(tags, "git_source"),
            "package_version": _tag(tags, "version"),
        },
        "environment": _prefixed(tags, f"{TAG}env."),
        "params": {
            "digest": _tag(tags, "params_digest"),
            "values": {k: params[k] for k in KEY_PARAMS if k in params},
        },
        "data": data,
        "dvc": _prefixed(tags, f"{TAG}dvc."),
        "validation": {"success": _tag(tags, "validation.success"), "digest": _tag(tags, "validation.digest")},
        "pairs": {
            "summary_digest": _tag(tags, "pairs.summary_digest"),
            "manifest_digest": _tag(tags, "pairs.manifest_digest"),
        },
        "train": {**_prefixed(tags, f"{TAG}train."), **{k: v for k, v in tasks.get("train", {}).items()}},
        "export_digest": _tag(tags, "export_digest"),
        "export_weights_sha256": _tag(tags, "export.weights_sha256"),
        "artifacts": {"index_sha256": _tag(tags, "artifacts_digest"), "gate_index_sha256": _tag(tags, "gate_artifacts_digest")},
    }
    if airflow:
        chain["airflow"] = airflow
    if tasks:
        chain["airflow_tasks"] = tasks
    return chain


def format_chain(chain: Mapping[str, Any]) -> str:
    """The human-readable chain, one link per line (pure)."""
    m, r, c, p, d = chain["model"], chain["run"], chain["code"], chain["params"], chain["data"]
    dirty = {"true": " (uncommitted changes)", "false": ""}.get(str(c.get("dirty")), " (dirty: unknown)")
    gate = m["gate"]
    env = chain.get("environment") or {}
    lines = [
        f"model      {m['name']} v{m['version']}  aliases {','.join(m['aliases']) or '-'}  (logged model {m.get('model_id')})",
        f"  gate     {gate.get('decision', '-')}: {gate.get('reason', '')}".rstrip(),
        f"  card     {m.get('model_card') or '-'}",
        f"-> run     {r['run_id']}  experiment {r['experiment_id']}, {r['status']}, triggered by "
        f"{r.get('triggered_by') or r.get('user') or '?'} ({r.get('triggered_via') or '?'})",
        f"-> code    {c['commit']}{dirty} [{c['source']}]  skin-twin {c['package_version']}",
        f"-> env     requirements.lock sha256 {env.get('requirements_lock_sha256')}  Python {env.get('python')}",
        f"-> params  sha256 {p['digest']}",
    ]
    lines += [f"           {k} = {v}" for k, v in p["values"].items()]
    lines.append(f"-> data    {d.get('source')} from {d.get('root')}")
    if d.get("ingest_summary_digest"):
        lines.append(f"           split: {d.get('near_duplicate_joins') or '?'} lesion group(s) joined to another's for a "
                     f"near-duplicate picture (data/ingest_summary.json, sha256 {d['ingest_summary_digest']})")
    else:
        lines.append("           split: no ingest summary recorded")
    for split in SPLITS:
        e = d.get(split) or {}
        lines.append(f"           {split:5s} content {e.get('tag_digest')} ({e.get('rows')} images)")
        lines.append(f"                 manifest {e.get('source')}")
    for k, v in chain.get("dvc", {}).items():
        lines.append(f"           dvc {k} = {v}")
    v = chain["validation"]
    lines.append(f"-> checks  validation success={v['success']}, result sha256 {v['digest']}")
    pr = chain["pairs"]
    lines.append(f"-> pairs   summary sha256 {pr['summary_digest']}, manifest sha256 {pr['manifest_digest']}")
    t = chain.get("train") or {}
    lines.append(f"-> train   on {t.get('host', '?')} ({t.get('device', '?')}), queue {t.get('queue', '-')}, "
                 f"worker {t.get('worker', '-')}")  # fmt: skip
    lines.append(f"-> export  weights sha256 {chain.get('export_weights_sha256')}")
    if "airflow" in chain:
        a = chain["airflow"]
        lines.append(f"-> airflow dag {a.get('dag_id')} run {a.get('dag_run_id')} try {a.get('try_number')}")
    else:
        lines.append("-> airflow (not run under Airflow)")
    return "\n".join(lines)


def format_checks(checks: list[Mapping[str, Any]]) -> str:
    """``--verify`` results, one line each."""
    bad = [ch for ch in checks if not ch["ok"]]
    lines = [f"verify    {len(checks) - len(bad)} of {len(checks)} checks passed"]
    lines += [f"  {'ok  ' if ch['ok'] else 'FAIL'}   {ch['check']}: {ch['detail']}" for ch in checks]
    return "\n".join(lines)
