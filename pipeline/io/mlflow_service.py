"""The MLflow service: one place that points MLflow at the store and hands out the client.

Tracking store: ``MLFLOW_TRACKING_URI`` wins, else ``mlflow.tracking_uri`` from params. The
embedded default is a SQLite store (``sqlite:///mlflow/mlflow.db``; a relative path is resolved
against the current working directory, i.e. the project root for ``dvc repro`` and the CLI; the
folder is created) with artifacts in the local folder ``mlflow.artifact_root``. Experiments are
created with that artifact location; against a tracking *server* the server decides where
artifacts go. MLflow's own logging is turned down to warnings, its telemetry and progress bars off.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pipeline.config import Config

_QUIET_LOGGERS = ("mlflow", "alembic", "urllib3", "databricks", "git", "matplotlib")



def quiet_mlflow() -> None:
    """Keep MLflow's logging to warnings; no telemetry, no progress bars."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def _is_local_store(uri: str) -> bool:
    scheme = urlsplit(uri).scheme
    return scheme in ("sqlite", "file", "") or uri.startswith(("postgresql", "mysql", "mssql"))


def resolve_tracking_uri(cfg: Config) -> str:
    """``MLFLOW_TRACKING_URI`` or the configured URI; a relative sqlite path becomes absolute
    (against the current directory) and its folder is created."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.mlflow.tracking_uri
    if uri.startswith("sqlite:///"):
        db = uri[len("sqlite:///") :]
        if db and db != ":memory:":
            path = Path(db)
            if not path.is_absolute():
                path = Path.cwd() / path
            path.parent.mkdir(parents=True, exist_ok=True)
            uri = "sqlite:///" + str(path.resolve())
    return uri


def artifact_location(cfg: Config, tracking_uri: str) -> str | None:
    """Artifact location for a new experiment: the local folder for a database store, the
    server's choice (None) for an http(s) tracking server."""
    if not _is_local_store(tracking_uri):
        return None
    root = Path(cfg.mlflow.artifact_root).expanduser()
    if not root.is_absolute():
        root = Path.cwd() / root
    root.mkdir(parents=True, exist_ok=True)
    return root.resolve().as_uri()


def redact(uri: str) -> str:
    """The URI without user:password (safe to write into records and logs)."""
    parts = urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return uri


def client_for(cfg: Config):
    """Point MLflow (tracking + registry) at the store; return an ``MlflowClient``."""
    quiet_mlflow()
    import mlflow

    uri = resolve_tracking_uri(cfg)
    quiet_mlflow()  # again: importing mlflow configures its logger
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(client: Any, cfg: Config, uri: str | None = None) -> str:
    uri = uri or resolve_tracking_uri(cfg)
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(cfg.mlflow.experiment, artifact_location=artifact_location(cfg, uri))
    except MlflowException:  # created concurrently by another task
        exp = client.get_experiment_by_name(cfg.mlflow.experiment)
        if exp is None:
            raise
        return exp.experiment_id
