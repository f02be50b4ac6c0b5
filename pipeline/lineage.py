"""Lineage of a model: what code, parameters, data and orchestration run produced it.

Written at tracking time (:func:`lineage_tags`, :func:`split_datasets`) as MLflow run tags and
dataset inputs, and read back for a registered model (:func:`run_lineage`, the ``lineage``
stage), which prints the chain

    model version -> run -> code commit -> params (hash + key values) -> data digests per split
    -> validation result -> pair manifest -> Airflow run (when there was one)

and returns it as a dict.

Sources of each link:

* **code**: ``git rev-parse HEAD`` / ``git status --porcelain`` in the project root; where there is
  no git (a container image), the env vars ``SKIN_TWIN_GIT_COMMIT`` / ``SKIN_TWIN_GIT_DIRTY``
  baked into the image at build time.
* **params**: :meth:`pipeline.config.Config.digest` plus the logged params.
* **data**: per split, the content digest :func:`content_digest` = sha256 over the sorted
  ``(sha256, label)`` rows (the images' bytes and their labels; independent of file names, row
  order and paths).
* **DVC**: the md5 of every stage output in ``dvc.lock`` (project root), when present.
* **validation / pairs**: success flag and sha256 of ``reports/validation/result.json``; sha256
  of ``reports/pairs_summary.json`` (and of ``data/pairs.parquet``).
* **Airflow**: ``AIRFLOW_CTX_DAG_ID``, ``AIRFLOW_CTX_DAG_RUN_ID``, ``AIRFLOW_CTX_TRY_NUMBER`` (set by
  Airflow in every task's environment) or explicit arguments.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

import pipeline
from pipeline.config import Config
from pipeline.digests import file_sha256, path_sha256
from pipeline.errors import PipelineError
from pipeline.layout import Layout
from pipeline.manifest import SPLITS

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
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


# --------------------------------------------------------------------------------------------
# digests (pure)
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------------


def _truthy(text: str | None) -> bool | None:
    if text is None or text == "":
        return None
    return text.strip().lower() in ("1", "true", "yes", "dirty")


def git_info(root: str | Path | None = None) -> dict[str, Any]:
    """``{"commit", "dirty", "source"}`` from git in ``root`` (default: the project root), else
    from the env vars baked into container images."""
    root = PROJECT_ROOT if root is None else root
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
        if commit:
            return {"commit": commit, "dirty": bool(status.strip()), "source": "git"}
    except (OSError, subprocess.SubprocessError):
        pass
    commit = os.environ.get("SKIN_TWIN_GIT_COMMIT") or None
    return {
        "commit": commit or "unknown",
        "dirty": _truthy(os.environ.get("SKIN_TWIN_GIT_DIRTY")),
        "source": "env" if commit else "none",
    }


def dvc_lock_hashes(path: str | Path) -> dict[str, str]:
    """``{"<stage>:<out path>": hash}`` for every stage output in ``dvc.lock`` (empty if absent)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        return {}
    try:
        lock = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        log.warning("%s: unreadable (%s); no DVC hashes recorded", path, exc)
        return {}
    out: dict[str, str] = {}
    for stage, body in (lock.get("stages") or {}).items():
        for o in (body or {}).get("outs") or []:
            if not isinstance(o, Mapping) or "path" not in o:
                continue
            value = o.get("md5") or o.get("hash") or o.get("etag") or o.get("checksum")
            if value is None:
                continue
            out[f"{stage}:{o['path']}"] = str(value)
    return out


def airflow_context(
    dag_id: str | None = None, dag_run_id: str | None = None, try_number: int | str | None = None
) -> dict[str, str]:
    """The Airflow run this process belongs to (explicit values win over ``AIRFLOW_CTX_*``)."""
    ctx = {
        "dag_id": dag_id or os.environ.get("AIRFLOW_CTX_DAG_ID"),
        "dag_run_id": dag_run_id or os.environ.get("AIRFLOW_CTX_DAG_RUN_ID"),
        "try_number": try_number if try_number is not None else os.environ.get("AIRFLOW_CTX_TRY_NUMBER"),
    }
    return {k: str(v) for k, v in ctx.items() if v not in (None, "")}


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable JSON (%s)", path, exc)
        return None


def validation_result(layout: Layout) -> dict[str, Any]:
    """Success flag + digest of ``reports/validation/result.json`` (``success`` None when absent)."""
    path = layout.validation_dir / "result.json"
    data = read_json(path)
    success = None
    if isinstance(data, Mapping):
        raw = data.get("success", data.get("passed"))
        success = bool(raw) if raw is not None else None
    return {"success": success, "digest": file_sha256(path), "path": str(path) if path.is_file() else None}


def split_manifest(layout: Layout) -> tuple[pd.DataFrame, Path]:
    """The manifest with per-image sha256 and split: validated.parquet, else manifest.parquet."""
    for path in (layout.validated_manifest, layout.manifest):
        if path.is_file():
            df = pd.read_parquet(path)
            missing = [c for c in ("sha256", "label", "split") if c not in df.columns]
            if missing:
                raise PipelineError(f"{path}: missing column(s) {missing}")
            return df, path
    raise PipelineError(f"{layout.validated_manifest}: not found (run ingest and validate first)")


def split_datasets(layout: Layout) -> dict[str, dict[str, Any]]:
    """Per split: the rows, their content digest, the source manifest path."""
    df, path = split_manifest(layout)
    out: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        part = df[df["split"].astype(str) == split].reset_index(drop=True)
        if part.empty:
            continue
        digest = content_digest(part)
        out[split] = {
            "df": part,
            "digest": digest,
            # MLflow caps dataset digests at 36 characters: the first 32 hex digits (128 bits).
            "dataset_digest": digest[:DATASET_DIGEST_CHARS],
            "source": path.resolve().as_uri(),
            "rows": len(part),
        }
    return out


def lineage_tags(
    cfg: Config,
    *,
    datasets: Mapping[str, Mapping[str, Any]] | None = None,
    airflow: Mapping[str, str] | None = None,
    project_root: str | Path | None = None,
) -> dict[str, str]:
    """Every lineage fact of this pipeline run as MLflow tags (string values; unknowns left out)."""
    project_root = PROJECT_ROOT if project_root is None else project_root
    layout = Layout.from_config(cfg)
    git = git_info(project_root)
    tags: dict[str, Any] = {
        f"{TAG}git_commit": git["commit"],
        f"{TAG}git_dirty": git["dirty"],
        f"{TAG}git_source": git["source"],
        f"{TAG}params_digest": cfg.digest(),
        f"{TAG}version": pipeline.__version__,
        f"{TAG}work_dir": str(layout.work_dir.resolve()),
        f"{TAG}export_digest": path_sha256(layout.export_dir),
    }
    if git["commit"] != "unknown":
        tags["mlflow.source.git.commit"] = git["commit"]
    for split, info in (datasets or {}).items():
        tags[f"{TAG}data_digest.{split}"] = info["digest"]
        tags[f"{TAG}data_rows.{split}"] = info["rows"]
    val = validation_result(layout)
    tags[f"{TAG}validation.success"] = val["success"]
    tags[f"{TAG}validation.digest"] = val["digest"]
    tags[f"{TAG}pairs.summary_digest"] = file_sha256(layout.pairs_summary)
    tags[f"{TAG}pairs.manifest_digest"] = file_sha256(layout.pairs)
    lock_path = Path(project_root) / "dvc.lock"
    tags[f"{TAG}dvc.lock_digest"] = file_sha256(lock_path)
    for key, value in dvc_lock_hashes(lock_path).items():
        stage, _, out = key.partition(":")
        tags[f"{TAG}dvc.{stage}.{out}"] = value
    for key, value in (airflow or {}).items():
        tags[f"{TAG}airflow.{key}"] = value
    return {k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in tags.items() if v not in (None, "")}


# --------------------------------------------------------------------------------------------
# reading a model's lineage back
# --------------------------------------------------------------------------------------------


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


def run_lineage(cfg: Config, model: str) -> dict[str, Any]:
    """The ``lineage`` stage: print and return the chain of ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``."""
    from pipeline.registry import resolve_version
    from pipeline.tracking import client_for

    client = client_for(cfg)
    version = resolve_version(client, model)
    if not version.run_id:
        raise PipelineError(f"{model}: version {version.version} has no source run; no lineage recorded")
    run = client.get_run(version.run_id)
    datasets = list(run.inputs.dataset_inputs) if run.inputs else []
    chain = lineage_chain(version, run, datasets)
    print(format_chain(chain))
    return chain
