"""Provenance facts gathered at tracking time: code, data, DVC, validation, pairs, Airflow.

Written as MLflow run tags and dataset inputs by the ``track`` stage; read back by ``lineage``.
Sources of each link:

* **code**: ``git rev-parse HEAD`` / ``git status --porcelain`` in the project root; where there is
  no git (a container image), the env vars ``SKIN_TWIN_GIT_COMMIT`` / ``SKIN_TWIN_GIT_DIRTY``
  baked into the image at build time.
* **params**: :meth:`pipeline.config.Config.digest` plus the logged params.
* **data**: per split, the content digest :func:`pipeline.core.lineage.content_digest` = sha256 over
  the sorted ``(sha256, label)`` rows (the images' bytes and their labels; independent of file
  names, row order and paths).
* **DVC**: the md5 of every stage output in ``dvc.lock`` -- only when the run really is a
  ``dvc repro`` of that lock (``DVC_STAGE``/``DVC_ROOT`` are set by DVC for its stage commands);
  an Airflow run or a plain CLI run records none, never a stale lock that happens to lie in the
  checkout.
* **who / where**: the triggering user (Airflow's ``dag_run.triggering_user_name``, frozen in
  ``run_config.json`` by the first task; the OS user for CLI runs), the host, worker and queue of
  each Airflow task (``reports/tasks/<task>.json``, written by the orchestrator), the host and
  device of training (``models/train/best.json``).
* **environment**: sha256 of ``requirements.lock``, Python and platform, and the installed package
  list (:func:`installed_packages`, logged as an artifact).
* **ingest / validation / pairs**: sha256 of ``reports/ingest_summary.json`` and its count of
  near-duplicate joins (lesion groups split with another group); success flag and sha256 of
  ``reports/validation/result.json``; sha256 of ``reports/pairs_summary.json`` (and of
  ``data/pairs.parquet``).
* **Airflow**: ``AIRFLOW_CTX_DAG_ID``, ``AIRFLOW_CTX_DAG_RUN_ID``, ``AIRFLOW_CTX_TRY_NUMBER`` (set by
  Airflow in every task's environment) or explicit arguments.
"""

from __future__ import annotations

import getpass
import hashlib
import importlib.metadata
import logging
import os
import platform
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

import pipeline
from pipeline.config import Config
from pipeline.core.lineage import DATASET_DIGEST_CHARS, TAG, content_digest
from pipeline.core.schema import SPLITS
from pipeline.errors import PipelineError
from pipeline.io.digests import file_sha256, path_sha256
from pipeline.io.files import read_json
from pipeline.io.readers import data_root
from pipeline.layout import Layout

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]



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


def validation_result(layout: Layout) -> dict[str, Any]:
    """Success flag + digest of ``reports/validation/result.json`` (``success`` None when absent)."""
    path = layout.validation_dir / "result.json"
    data = read_json(path)
    success = None
    if isinstance(data, Mapping):
        raw = data.get("success", data.get("passed"))
        success = bool(raw) if raw is not None else None
    return {"success": success, "digest": file_sha256(path), "path": str(path) if path.is_file() else None}


MANIFEST_COLUMNS_LOGGED: tuple[str, ...] = ("image_id", "path", "label", "group_id", "sha256")


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
    """Per split: the manifest rows (``image_id, path`` -- relative to the data root --, ``label,
    group_id, sha256``), their content digest (:func:`~pipeline.core.lineage.content_digest`, the same
    for DVC and Airflow runs) and the number of rows."""
    df, _ = split_manifest(layout)
    out: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        part = df[df["split"].astype(str) == split].reset_index(drop=True)
        if part.empty:
            continue
        cols = [c for c in MANIFEST_COLUMNS_LOGGED if c in part.columns]
        out[split] = {"df": part[cols].astype(str), "digest": content_digest(part), "rows": len(part)}
    return out


def dataset_digest(content: str, source: str) -> str:
    """The MLflow dataset digest: content *and* where the run's manifest is, so a dataset entity is
    reused only for the same rows from the same place (MLflow keeps the first source it saw)."""
    return hashlib.sha256(f"{content}\0{source}".encode()).hexdigest()[:DATASET_DIGEST_CHARS]


def dvc_context() -> dict[str, str] | None:
    """``{"stage", "root", "lock"}`` when this process is a stage command of ``dvc repro``, else None."""
    stage, root = os.environ.get("DVC_STAGE"), os.environ.get("DVC_ROOT")
    if not stage or not root:
        return None
    return {"stage": stage, "root": root, "lock": str(Path(root) / "dvc.lock")}


def triggered_by(layout: Layout) -> dict[str, str]:
    """Who started this pipeline run: the Airflow user frozen in ``run_config.json``, else the OS user."""
    frozen = read_json(layout.work_dir / "run_config.json")
    if isinstance(frozen, Mapping) and frozen.get("triggered_by"):
        return {"user": str(frozen["triggered_by"]), "via": "airflow"}
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return {"user": user, "via": "cli"}


def task_facts(layout: Layout) -> dict[str, dict[str, Any]]:
    """``reports/tasks/<task>.json`` of an Airflow run: host, worker, queue, try of each task."""
    folder = layout.reports_dir / "tasks"
    out: dict[str, dict[str, Any]] = {}
    for f in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        data = read_json(f)
        if isinstance(data, Mapping):
            out[f.stem] = dict(data)
    return out


def installed_packages() -> list[str]:
    """``name==version`` of every installed distribution, sorted (the exact environment)."""
    seen: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata.get("Name")
        if name:
            seen.setdefault(name.lower(), f"{name}=={dist.version}")
    return [seen[k] for k in sorted(seen)]


def environment_facts(project_root: Path) -> dict[str, str | None]:
    return {
        "requirements_lock_sha256": file_sha256(project_root / "requirements.lock"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host": platform.node(),
    }


def lineage_tags(
    cfg: Config,
    *,
    datasets: Mapping[str, Mapping[str, Any]] | None = None,
    airflow: Mapping[str, str] | None = None,
    project_root: str | Path | None = None,
) -> dict[str, str]:
    """Every lineage fact of this pipeline run as MLflow tags (string values; unknowns left out)."""
    project_root = Path(PROJECT_ROOT if project_root is None else project_root)
    layout = Layout.from_config(cfg)
    git = git_info(project_root)
    who = triggered_by(layout)
    tags: dict[str, Any] = {
        f"{TAG}git_commit": git["commit"],
        f"{TAG}git_dirty": git["dirty"],
        f"{TAG}git_source": git["source"],
        f"{TAG}params_digest": cfg.digest(),
        f"{TAG}version": pipeline.__version__,
        f"{TAG}work_dir": str(layout.work_dir.resolve()),
        f"{TAG}export_digest": path_sha256(layout.export_dir),
        f"{TAG}export.weights_sha256": file_sha256(layout.export_dir / "weights.pt"),
        f"{TAG}data_source": cfg.data.source,
        f"{TAG}data_root": str(data_root(cfg)),
        # several sources (data.source: multi): every entry, name=source:root; data_root is their common root
        f"{TAG}data_roots": "; ".join(f"{e.label}={e.source}:{e.root}" for e in cfg.data.sources),
        f"{TAG}triggered_by": who["user"],
        f"{TAG}triggered_via": who["via"],
    }
    for key, value in environment_facts(project_root).items():
        tags[f"{TAG}env.{key}"] = value
    if git["commit"] != "unknown":
        tags["mlflow.source.git.commit"] = git["commit"]
    for split, info in (datasets or {}).items():
        tags[f"{TAG}data_digest.{split}"] = info["digest"]
        tags[f"{TAG}data_rows.{split}"] = info["rows"]
    val = validation_result(layout)
    tags[f"{TAG}validation.success"] = val["success"]
    tags[f"{TAG}validation.digest"] = val["digest"]
    ingest = read_json(layout.ingest_summary)
    tags[f"{TAG}ingest.summary_digest"] = file_sha256(layout.ingest_summary)
    if isinstance(ingest, Mapping) and isinstance(ingest.get("near_duplicate_joins"), Mapping):
        # lesion groups split with another group because of a near-duplicate picture (list: the artifact)
        tags[f"{TAG}ingest.near_duplicate_joins"] = ingest["near_duplicate_joins"].get("lesions")
    tags[f"{TAG}pairs.summary_digest"] = file_sha256(layout.pairs_summary)
    tags[f"{TAG}pairs.manifest_digest"] = file_sha256(layout.pairs)
    best = read_json(layout.train_dir / "best.json")
    if isinstance(best, Mapping):
        for key in ("host", "device", "world_size"):
            tags[f"{TAG}train.{key}"] = best.get(key)
    dvc = dvc_context()
    if dvc is not None:  # a dvc repro of this very lock: its hashes are this run's
        lock_path = Path(dvc["lock"])
        tags[f"{TAG}dvc.lock_digest"] = file_sha256(lock_path)
        tags[f"{TAG}dvc.stage"] = dvc["stage"]
        for key, value in dvc_lock_hashes(lock_path).items():
            stage, _, out = key.partition(":")
            tags[f"{TAG}dvc.{stage}.{out}"] = value
    for key, value in (airflow or {}).items():
        tags[f"{TAG}airflow.{key}"] = value
    for task, facts in task_facts(layout).items():
        for key in ("host", "worker", "queue", "try_number"):
            tags[f"{TAG}airflow.task.{task}.{key}"] = facts.get(key)
    return {k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in tags.items() if v not in (None, "")}
