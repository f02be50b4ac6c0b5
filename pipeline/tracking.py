"""The ``track`` stage: one MLflow run per pipeline run, with everything needed to trust it.

Tracking store
    ``MLFLOW_TRACKING_URI`` wins, else ``mlflow.tracking_uri`` from params. The embedded default
    is a SQLite store (``sqlite:///mlflow/mlflow.db``; a relative path is resolved against the
    current working directory, i.e. the project root for ``dvc repro`` and the CLI; the folder is
    created) with artifacts in the local folder ``mlflow.artifact_root``. The experiment is
    created with that artifact location; against a tracking *server* the server decides where
    artifacts go (``--serve-artifacts`` / ``--artifacts-destination``). MLflow's own logging is
    turned down to warnings, its telemetry and progress bars off.

What one run holds (:func:`run_track`)
    * **params**: every key of :meth:`Config.flat` (values over MLflow's limit truncated), batch-logged.
    * **metrics**: the per-epoch history (``train_loss``, ``val_loss_branch1``/``2``,
      ``val_loss_discriminator``, ``val_loss_total``, ``lr``, ``seconds``... with ``step=epoch``),
      the test metrics of ``reports/metrics.json`` as ``test_*`` (step 0, so they are also linked to
      the logged model), ``selected_branch``, ``best_val_loss_branch1``/``2``, ``best_epoch``,
      ``params_inference``/``params_train``, timings (``train_seconds``, ``track_seconds.*``).
    * **datasets**: the train/val/test manifests (``mlflow.data.from_pandas``) with the content
      digest of :func:`pipeline.lineage.content_digest`, logged as inputs with context
      ``training``/``validation``/``testing``.
    * **tags**: the lineage of :func:`pipeline.lineage.lineage_tags` (git commit + dirty flag, DVC
      lock hashes, params digest, package version, validation/pairs digests, Airflow run).
    * **artifacts**: ``plots/`` (confusion matrix, ROC, training curves), ``cam/`` (grid + samples),
      ``validation/`` (result JSON + HTML), ``pairs/pairs_summary.json``, ``reports/metrics.json``,
      ``train/history.csv``, ``export/config.json``, ``lineage/dvc.lock`` and ``run_report.html``
      (the one-page report: metrics table, plots embedded as base64, validation status, pairs
      summary, lineage tags; also written to ``reports/run_report.html``).
    * **model**: ``model`` — one MLflow 3 LoggedModel with a ``pytorch`` flavour (pt2) and a
      ``python_function`` flavour taking uint8 images (:mod:`pipeline.pyfunc`).

Idempotence
    ``reports/mlflow.json`` (:attr:`Layout.tracking_record`) names the run. A re-run with the same
    work dir, tracking store and config digest reopens that run and adds only what is missing
    (metrics already there, datasets already linked and an unchanged model are not logged again);
    a changed config starts a new run.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import os
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pandas as pd

from pipeline.config import Config
from pipeline.digests import path_sha256
from pipeline.errors import PipelineError
from pipeline.fileio import write_json, write_text
from pipeline.layout import Layout

log = logging.getLogger(__name__)

MODEL_NAME = "model"  # name of the LoggedModel inside the run
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
_QUIET_LOGGERS = ("mlflow", "alembic", "urllib3", "databricks", "git", "matplotlib")


# --------------------------------------------------------------------------------------------
# store / client
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# pure helpers
# --------------------------------------------------------------------------------------------


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


def _img_tag(path: Path, title: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
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
    images: Mapping[str, Path],
    validation: Mapping[str, Any],
    pairs_summary: Any,
    tags: Mapping[str, str],
) -> str:
    """The one-page HTML run report (pure: everything is passed in; images are inlined)."""
    headline = {k: metrics[k] for k in ("accuracy", "balanced_accuracy", "macro_auc") if k in metrics}
    meta = {k: metrics[k] for k in META_METRICS if k in metrics}
    per_class = {k: v for k, v in metrics.items() if k not in headline and k not in meta}
    status = validation.get("success")
    badge = {True: ("passed", "#1a7f37"), False: ("FAILED", "#cf222e")}.get(status, ("unknown", "#6e7781"))
    figures = "".join(_img_tag(p, name) for name, p in images.items() if Path(p).is_file())
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
.cols{{display:flex;gap:2rem;flex-wrap:wrap}} pre{{background:#f6f8fa;padding:.5rem;font-size:.8rem}}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>MLflow run <code>{html.escape(run_id)}</code> &middot; validation
<span class="badge" style="background:{badge[1]}">{badge[0]}</span>
(result sha256 <code>{html.escape(str(validation.get("digest")))}</code>)</p>
<div class="cols"><div><h2>Test metrics</h2>{_table(headline)}<h3>Model</h3>{_table(meta)}</div>
<div><h2>Per class</h2>{_table(per_class)}</div></div>
<h2>Plots</h2>{figures or "<p>no plots</p>"}
<h2>Pair manifest</h2>{pairs_html}
<h2>Lineage</h2>{_table(dict(sorted(tags.items())))}
</body></html>
"""


def plot_history(history: pd.DataFrame, path: Path) -> bool:
    """Training curves (losses per epoch for both branches, discriminator, total)."""
    cols = [c for c in ("train_loss", "val_loss_branch1", "val_loss_branch2", "val_loss_discriminator", "val_loss_total") if c in history.columns]
    if history.empty or not cols or "epoch" not in history.columns:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for c in cols:
        ax.plot(history["epoch"], history[c], marker="o", ms=3, label=c)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title("Training curves")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = round(time.perf_counter() - t0, 4)


def read_record(layout: Layout) -> dict[str, Any]:
    path = layout.tracking_record
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _reusable_run(client: Any, record: Mapping[str, Any], layout: Layout, uri: str, digest: str) -> str | None:
    run_id = record.get("run_id")
    if not run_id:
        return None
    same = (
        record.get("work_dir") == str(layout.work_dir.resolve())
        and record.get("tracking_uri") == redact(uri)
        and record.get("config_digest") == digest
    )
    if not same:
        return None
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None
    return run_id if run.info.lifecycle_stage == "active" else None


def _require(path: Path, what: str) -> None:
    if not path.exists():
        raise PipelineError(f"{path}: not found ({what})")


def run_track(
    cfg: Config,
    *,
    dag_id: str | None = None,
    dag_run_id: str | None = None,
    try_number: int | str | None = None,
) -> dict[str, Any]:
    """The ``track`` stage. Returns ``{run_id, experiment_id, model_uri, ...}`` (also in the record)."""
    from pipeline import lineage, pyfunc

    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    layout = Layout.from_config(cfg)
    _require(layout.export_dir / "config.json", "run the select stage first")
    _require(layout.metrics, "run the evaluate stage first")

    with _timed(timings, "setup"):
        client = client_for(cfg)
        import mlflow
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        uri = resolve_tracking_uri(cfg)
        experiment_id = ensure_experiment(client, cfg, uri)
        record = read_record(layout)
        digest = cfg.digest()
        run_id = _reusable_run(client, record, layout, uri, digest)
        reused = run_id is not None
        airflow = lineage.airflow_context(dag_id, dag_run_id, try_number)
        if run_id is None:
            name = f"{layout.work_dir.resolve().name}-{digest[:8]}"
            if airflow.get("dag_run_id"):
                name = f"{airflow.get('dag_id', 'dag')}-{airflow['dag_run_id']}"
            run_id = client.create_run(experiment_id, run_name=name[:250]).info.run_id
        existing = client.get_run(run_id)
        have_metrics = set(existing.data.metrics)
        have_inputs = {
            (d.dataset.name, d.dataset.digest, {t.key: t.value for t in d.tags}.get("mlflow.data.context"))
            for d in (existing.inputs.dataset_inputs if existing.inputs else [])
        }
    log.info("MLflow %s run %s (%s) in experiment %s", redact(uri), run_id, "reused" if reused else "new", experiment_id)

    metrics_json = json.loads(layout.metrics.read_text(encoding="utf-8"))
    history_path = layout.train_dir / "history.csv"
    history = pd.read_csv(history_path) if history_path.is_file() else pd.DataFrame()
    export_digest = path_sha256(layout.export_dir)

    with mlflow.start_run(run_id=run_id):
        # params
        with _timed(timings, "params"):
            params = [Param(k, v) for k, v in params_of(cfg, MAX_PARAM_VAL_LENGTH).items()]
            if set(existing.data.params) != {p.key for p in params}:
                for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
                    client.log_batch(run_id, params=params[i : i + MAX_PARAMS_TAGS_PER_BATCH])

        # datasets + lineage tags
        with _timed(timings, "datasets"):
            splits = lineage.split_datasets(layout)
            for split, info in splits.items():
                context = lineage.SPLIT_CONTEXT[split]
                if (split, info["dataset_digest"], context) in have_inputs:
                    continue
                with warnings.catch_warnings():  # schema hints about int columns, source ambiguity
                    warnings.simplefilter("ignore", UserWarning)
                    ds = mlflow.data.from_pandas(
                        info["df"], source=info["source"], name=split, digest=info["dataset_digest"], targets="label"
                    )
                    mlflow.log_input(ds, context=context)
        with _timed(timings, "tags"):
            tags = lineage.lineage_tags(cfg, datasets=splits, airflow=airflow)
            tags["skin_twin.selected_branch"] = str(metrics_json.get("selected_branch", ""))
            tag_list = [RunTag(k, v[:8000]) for k, v in tags.items()]
            for i in range(0, len(tag_list), MAX_PARAMS_TAGS_PER_BATCH):
                client.log_batch(run_id, tags=tag_list[i : i + MAX_PARAMS_TAGS_PER_BATCH])

        # metrics
        with _timed(timings, "metrics"):
            now = int(time.time() * 1000)
            ms = [Metric(k, v, now, step) for k, v, step in history_metrics(history) if k not in have_metrics]
            finals = final_metrics(metrics_json)
            if "seconds" in history.columns:
                finals["train_seconds"] = float(pd.to_numeric(history["seconds"], errors="coerce").fillna(0).sum())
            ms += [Metric(k, v, now, 0) for k, v in finals.items() if k not in have_metrics]
            for i in range(0, len(ms), 1000):
                client.log_batch(run_id, metrics=ms[i : i + 1000])

        # artifacts + report
        with _timed(timings, "artifacts"), tempfile.TemporaryDirectory() as tmp:
            tmpd = Path(tmp)
            curves = tmpd / "training_curves.png"
            plot_history(history, curves)
            for folder, dest in ((layout.plots_dir, "plots"), (layout.cam_dir, "cam"), (layout.validation_dir, "validation")):
                if folder.is_dir():
                    client.log_artifacts(run_id, str(folder), dest)
            if curves.is_file():
                client.log_artifact(run_id, str(curves), "plots")
            for path, dest in (
                (layout.pairs_summary, "pairs"),
                (layout.metrics, "reports"),
                (history_path, "train"),
                (layout.train_dir / "best.json", "train"),
                (layout.export_dir / "config.json", "export"),
                (lineage.PROJECT_ROOT / "dvc.lock", "lineage"),
            ):
                if path.is_file():
                    client.log_artifact(run_id, str(path), dest)
            images = {
                "confusion matrix": layout.plots_dir / "confusion_matrix.png",
                "ROC": layout.plots_dir / "roc.png",
                "training curves": curves,
                "CAM samples": layout.cam_dir / "grid.png",
            }
            report = build_report(
                title=f"skin-twin run {layout.work_dir.resolve().name}",
                run_id=run_id,
                metrics=metrics_json,
                images=images,
                validation=lineage.validation_result(layout),
                pairs_summary=lineage.read_json(layout.pairs_summary),
                tags=tags,
            )
            write_text(layout.reports_dir / "run_report.html", report)
            client.log_artifact(run_id, str(layout.reports_dir / "run_report.html"))

        # model (two flavours in one LoggedModel)
        with _timed(timings, "model"):
            model_id = record.get("model_id") if reused and record.get("export_digest") == export_digest else None
            if model_id:
                try:
                    client.get_logged_model(model_id)
                except Exception:  # noqa: BLE001 - gone: log again
                    model_id = None
            if not model_id:
                info = pyfunc.log_model(
                    layout.export_dir,
                    name=MODEL_NAME,
                    metadata={"export_digest": export_digest, "config_digest": digest},
                )
                model_id = info.model_id

        timings["total"] = round(time.perf_counter() - t_all, 4)
        client.log_batch(
            run_id,
            metrics=[Metric(f"track_seconds.{k}", v, int(time.time() * 1000), 0) for k, v in timings.items()],
        )

    out = {
        "run_id": run_id,
        "experiment_id": experiment_id,
        "tracking_uri": redact(uri),
        "work_dir": str(layout.work_dir.resolve()),
        "config_digest": digest,
        "export_digest": export_digest,
        "model_id": model_id,
        "model_uri": f"models:/{model_id}",
        "run_model_uri": f"runs:/{run_id}/{MODEL_NAME}",
        "reused_run": reused,
        "timings": timings,
    }
    if reused and "registry" in record:
        out["registry"] = record["registry"]
    write_json(layout.tracking_record, out)
    log.info("tracked run %s in %.2fs (model %s)", run_id, timings["total"], out["model_uri"])
    return {k: v for k, v in out.items() if k != "registry"}
