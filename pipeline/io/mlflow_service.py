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
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pipeline.config import Config
from pipeline.errors import PipelineError, ServiceUnavailable

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


def resolve_tracking_uri(cfg: Config, create: bool = True) -> str:
    """``MLFLOW_TRACKING_URI`` or the configured URI; a relative sqlite path becomes absolute
    (against the current directory) and its folder is created (unless ``create`` is false)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.mlflow.tracking_uri
    if uri.startswith("sqlite:///"):
        db = uri[len("sqlite:///") :]
        if db and db != ":memory:":
            path = Path(db)
            if not path.is_absolute():
                path = Path.cwd() / path
            if create:
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


def configure_http(cfg: Config) -> None:
    """Bound every MLflow HTTP call by ``mlflow.http_timeout_s`` and ``mlflow.http_retries``
    (MLflow's own defaults retry for about four minutes)."""
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, int(round(cfg.mlflow.http_timeout_s))))
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(cfg.mlflow.http_retries)
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"


def check_reachable(uri: str, cfg: Config) -> None:
    """An MLflow server must answer ``/health`` within the HTTP budget; :class:`ServiceUnavailable` otherwise."""
    if urlsplit(uri).scheme not in ("http", "https"):
        return
    import requests

    url = uri.rstrip("/") + "/health"
    last: Exception | None = None
    for attempt in range(cfg.mlflow.http_retries + 1):
        try:
            resp = requests.get(url, timeout=cfg.mlflow.http_timeout_s)
            if resp.status_code == 200:
                return
            last = RuntimeError(f"HTTP {resp.status_code} {resp.text[:120]!r}")
            if resp.status_code < 500:
                break  # a 4xx (e.g. 403 Invalid Host header) will not heal by retrying
        except requests.RequestException as exc:
            last = exc
        if attempt < cfg.mlflow.http_retries:
            time.sleep(min(2.0**attempt, 5.0))
    text = " ".join(str(last).split()) if last else "no answer"
    errno_text = re.search(r"\[Errno -?\d+\][^)'\"]*", text)  # "[Errno 111] Connection refused"
    cause = errno_text.group(0).strip() if errno_text else ("timed out" if "timed out" in text.lower() else text[:200])
    raise ServiceUnavailable(
        f"MLflow tracking server {redact(uri)} unreachable: {cause} "
        f"(mlflow.http_timeout_s={cfg.mlflow.http_timeout_s}, mlflow.http_retries={cfg.mlflow.http_retries})"
    )


def client_for(cfg: Config, create: bool = True):
    """Point MLflow (tracking + registry) at the store; return an ``MlflowClient``.

    ``create=False`` (reading a registered model: predict, lineage) refuses a SQLite store that does
    not exist instead of creating an empty one as a side effect. A tracking server is checked to
    answer first, so an unreachable one fails in seconds with a clear message.
    """
    quiet_mlflow()
    configure_http(cfg)
    uri = resolve_tracking_uri(cfg, create=create)
    if not create and uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        if not db.is_file():
            raise PipelineError(
                f"{uri}: no MLflow store there (nothing was ever tracked to it); check mlflow.tracking_uri "
                "or MLFLOW_TRACKING_URI"
            )
    check_reachable(uri, cfg)
    import mlflow

    quiet_mlflow()  # again: importing mlflow configures its logger
    # mlflow.set_*_uri also export MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI, which would then win
    # over the params of every later config in this process and leak into child processes: restore them.
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
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


def manifest_source(tracking_uri: str, artifact_uri: str, run_id: str, artifact_path: str) -> tuple[Any, str]:
    """The MLflow dataset source of a manifest logged as a run artifact, and its address: the
    file on a local artifact store, else the tracking server's download URL of that artifact."""
    from urllib.parse import quote

    if artifact_uri.startswith("file:"):
        uri = f"{artifact_uri.rstrip('/')}/{artifact_path}"
        return uri, uri  # MLflow resolves a file:// string to its local artifact source
    from mlflow.data.http_dataset_source import HTTPDatasetSource

    base = tracking_uri.rstrip("/") if urlsplit(tracking_uri).scheme in ("http", "https") else artifact_uri
    url = f"{base}/get-artifact?path={quote(artifact_path)}&run_uuid={run_id}"
    return HTTPDatasetSource(url=url), url
