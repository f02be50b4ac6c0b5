"""Glue between the Airflow DAG (``dags/skin_twin.py``) and the pipeline stages.

The DAG file only wires tasks; everything a task does lives here:

* :func:`load_base_config` — the parse-time config (``SKIN_TWIN_PARAMS`` or ``params.yaml`` at the
  project root). Cheap: YAML + pydantic, nothing heavy.
* :func:`run_dir_for` — every DAG run works in ``<airflow.runs_dir>/<sanitised run_id>``; the name is
  deterministic (re-runs and retries of one DAG run reuse it) and unique (a hash of the raw run id is
  appended, so two run ids that sanitise alike never share a folder).
* :func:`build_run_config` — the per-run config: params file + run-time Airflow params (data source,
  data root, CSV, a dict of dotted-key overrides) + ``paths.work_dir`` forced to the run folder.
  The first task freezes it in ``<run_dir>/run_config.json``; later tasks (and their retries) read the
  frozen copy, so editing ``params.yaml`` mid-run cannot mix two configurations in one run.
* :func:`run_stage` — runs one stage by name through :data:`pipeline.cli.STAGES` and returns a small,
  JSON-able summary for XCom (paths, digests, ids; never data).
* :func:`asset_extra` — the extras of the Asset event a task emits (output digests, run id, config
  digest, headline metrics).

Deterministic failures (bad data, failed validation, bad parameters) become
``AirflowFailException`` so Airflow fails the task at once instead of retrying it; retries with
exponential backoff are for transient problems (a lost worker, CUDA out of memory, a busy database).

This module must stay import-light: the DAG imports it at parse time (no torch, pandas, mlflow, GX).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.config import Config, ConfigError, load_config
from pipeline.digests import path_sha256
from pipeline.errors import PipelineError
from pipeline.layout import Layout

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PARAMS_ENV = "SKIN_TWIN_PARAMS"
DAG_ID = "skin_twin"
RUN_CONFIG_FILE = "run_config.json"

# Airflow tasks in order; each runs the pipeline stages listed (ingest also synthesizes the
# project's synthetic data set when data.source=synthetic and no data.root is given).
TASKS: tuple[str, ...] = ("ingest", "validate", "augment", "pairs", "train", "select", "evaluate", "track", "register")

# Assets: the raw data set (schedule trigger) and the outputs tasks emit events for.
# Names are stable identifiers; the per-run location of an output travels in the event extras.
ASSETS: dict[str, dict[str, str]] = {
    "raw_data": {"name": "skin_twin.raw_data", "uri": "x-skin-twin://raw-data"},
    "validated_manifest": {"name": "skin_twin.validated_manifest", "uri": "x-skin-twin://validated-manifest"},
    "model": {"name": "skin_twin.model", "uri": "x-skin-twin://model"},
    "metrics": {"name": "skin_twin.metrics", "uri": "x-skin-twin://metrics"},
}
# Which task emits which asset.
TASK_OUTLETS: dict[str, str] = {"validate": "validated_manifest", "select": "model", "evaluate": "metrics"}

# Run-time Airflow params (name -> dotted config key) an operator may set when triggering a run.
PARAM_KEYS: dict[str, str] = {"data_source": "data.source", "data_root": "data.root", "data_csv": "data.csv"}
# Keys decided by the deployment / at DAG parse time, never by one run's overrides.
_FORBIDDEN_PREFIXES = ("paths.work_dir", "airflow")
# Keys holding file system paths; relative values are resolved against the params file's folder
# so that a task does not depend on the worker's current directory.
_PATH_KEYS = ("data.root", "data.csv")

_HEAVY_FREE_MAX_SCALAR = 200  # longest string copied from a stage result into XCom / extras


# --------------------------------------------------------------------------- config


def params_file() -> Path:
    """The params file: ``$SKIN_TWIN_PARAMS`` or ``params.yaml`` at the project root."""
    env = os.environ.get(PARAMS_ENV)
    return Path(env).expanduser().resolve() if env else PROJECT_ROOT / "params.yaml"


def load_base_config(path: str | Path | None = None) -> Config:
    """The config as read from the params file, without run-time overrides (cheap)."""
    return load_config(path or params_file())


def sanitize_run_id(run_id: str) -> str:
    """A folder name for ``run_id``: safe characters only, plus a short hash of the raw id."""
    if not run_id:
        raise ValueError("empty run_id")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", run_id).strip("._-")[:80] or "run"
    return f"{safe}-{hashlib.sha256(run_id.encode()).hexdigest()[:8]}"


def runs_dir(cfg: Config, base: Path) -> Path:
    path = Path(cfg.airflow.runs_dir).expanduser()
    return path if path.is_absolute() else (base / path)


def run_dir_for(run_id: str, cfg: Config, base: Path) -> Path:
    return (runs_dir(cfg, base) / sanitize_run_id(run_id)).resolve()


def run_overrides(params: Mapping[str, Any] | None, trigger_extras: list[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Dotted-key overrides from a run's Airflow params (and triggering raw-data Asset events).

    Precedence (later wins): asset event extras (``data_source``/``data_root``/``data_csv`` of the
    newest triggering event) < ``data_*`` params < ``overrides`` param.
    """
    params = dict(params or {})
    out: dict[str, Any] = {}
    for extra in trigger_extras or []:
        for name, key in PARAM_KEYS.items():
            if extra.get(name) not in (None, ""):
                out[key] = extra[name]
    for name, key in PARAM_KEYS.items():
        if params.get(name) not in (None, ""):
            out[key] = params[name]
    overrides = params.get("overrides") or {}
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"params.overrides: expected a mapping of dotted keys, got {type(overrides).__name__}")
    for key, value in overrides.items():
        key = str(key).strip()
        if any(key == p or key.startswith(p + ".") for p in _FORBIDDEN_PREFIXES):
            raise ConfigError(
                f"params.overrides.{key}: set by the deployment (params file / DAG), not per run; "
                "each DAG run works in <airflow.runs_dir>/<run_id>"
            )
        out[key] = value
    return out


def _resolve_paths(overrides: dict[str, Any], base: Path) -> dict[str, Any]:
    out = dict(overrides)
    for key in _PATH_KEYS:
        value = out.get(key)
        if isinstance(value, str) and value:
            p = Path(value).expanduser()
            out[key] = str(p if p.is_absolute() else (base / p).resolve())
    return out


def build_run_config(
    run_id: str,
    params: Mapping[str, Any] | None = None,
    *,
    trigger_extras: list[Mapping[str, Any]] | None = None,
    path: str | Path | None = None,
) -> Config:
    """The config of one DAG run: params file + run-time overrides, ``paths.work_dir`` = run folder."""
    pfile = Path(path) if path else params_file()
    base_dir = pfile.resolve().parent
    base = load_base_config(pfile)
    overrides = _resolve_paths(run_overrides(params, trigger_extras), base_dir)
    # data.root in the params file itself, when relative, is relative to the params file too.
    if "data.root" not in overrides and base.data.root and not Path(base.data.root).is_absolute():
        overrides["data.root"] = str((base_dir / base.data.root).resolve())
    if "data.csv" not in overrides and base.data.csv and not Path(base.data.csv).is_absolute():
        overrides["data.csv"] = str((base_dir / base.data.csv).resolve())
    overrides["paths.work_dir"] = str(run_dir_for(run_id, base, base_dir))
    return base.with_overrides(overrides)


def _write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True, default=str)
        fh.write("\n")
    os.replace(tmp, path)


def freeze_run_config(cfg: Config, run_id: str, params: Mapping[str, Any] | None = None) -> Path:
    """Write the run's resolved config to ``<run_dir>/run_config.json`` (first task)."""
    target = Path(cfg.paths.work_dir) / RUN_CONFIG_FILE
    _write_json_atomic(
        target,
        {
            "run_id": run_id,
            "params_file": str(params_file()),
            "params": dict(params or {}),
            "config_digest": cfg.digest(),
            "config": cfg.to_dict(),
            "git_commit": os.environ.get("SKIN_TWIN_GIT_COMMIT"),
        },
    )
    return target


def run_config(
    run_id: str,
    params: Mapping[str, Any] | None = None,
    *,
    trigger_extras: list[Mapping[str, Any]] | None = None,
    fresh: bool = False,
) -> Config:
    """The frozen config of this run if the first task wrote one (and ``fresh`` is false), else built."""
    built = build_run_config(run_id, params, trigger_extras=trigger_extras)
    frozen = Path(built.paths.work_dir) / RUN_CONFIG_FILE
    if not fresh and frozen.is_file():
        data = json.loads(frozen.read_text(encoding="utf-8"))
        if data.get("run_id") == run_id:
            return Config.model_validate(data["config"])
    return built


# --------------------------------------------------------------------------- outputs


def stage_outputs(task: str, layout: Layout) -> dict[str, Path]:
    """The outputs of a task whose digests go to XCom and Asset extras (small files/folders only)."""
    return {
        "ingest": {"manifest": layout.manifest},
        "validate": {"validated_manifest": layout.validated_manifest},
        "augment": {"augmented_manifest": layout.augmented_manifest},
        "pairs": {"pairs": layout.pairs},
        "train": {},
        "select": {"model": layout.export_dir},
        "evaluate": {"metrics": layout.metrics},
        "track": {"tracking_record": layout.tracking_record},
        "register": {"tracking_record": layout.tracking_record},
    }[task]


# --------------------------------------------------------------------------- running


def _small(obj: Any, depth: int = 0) -> Any:
    """A JSON-able, small copy of a stage result for XCom (long strings cut, depth limited)."""
    if isinstance(obj, (bool, int, float)) or obj is None:
        return obj
    if isinstance(obj, str):
        return obj if len(obj) <= _HEAVY_FREE_MAX_SCALAR else obj[:_HEAVY_FREE_MAX_SCALAR] + "..."
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Mapping) and depth < 3:
        return {str(k): _small(v, depth + 1) for k, v in list(obj.items())[:50]}
    if isinstance(obj, (list, tuple)) and depth < 3:
        return [_small(v, depth + 1) for v in list(obj)[:50]]
    return _small(str(obj), depth)


def _stage_fn(name: str):
    from pipeline.cli import STAGES  # light: cli imports heavy modules only when a stage runs

    return STAGES[name].load()


def stages_for(task: str, cfg: Config) -> list[str]:
    """Pipeline stages a task runs, in order."""
    if task not in TASKS:
        raise KeyError(f"unknown task {task!r}; expected one of {TASKS}")
    if task == "ingest":
        return ["synthesize", "ingest"] if cfg.data.source == "synthetic" and not cfg.data.root else ["ingest"]
    return [task]


def _fail_fast(task: str, exc: BaseException) -> BaseException:
    """Wrap a deterministic failure so Airflow does not retry it (plain exception outside Airflow)."""
    try:
        from airflow.sdk.exceptions import AirflowFailException
    except ImportError:  # pragma: no cover - outside Airflow
        return exc
    return AirflowFailException(f"{task}: {type(exc).__name__}: {exc}")


def run_stage(
    task: str,
    run_id: str,
    params: Mapping[str, Any] | None = None,
    *,
    trigger_extras: list[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run one DAG task's stage(s) for ``run_id``; return a small JSON-able summary for XCom.

    ``ingest`` (the first task) builds the run config from the params file and the run's params,
    creates the run folder and freezes the config there; the other tasks read the frozen config.
    Deterministic failures raise ``AirflowFailException`` (no retry), others propagate (retried).
    """
    first = task == TASKS[0]
    try:
        cfg = run_config(run_id, params, trigger_extras=trigger_extras, fresh=first)
    except ConfigError as exc:
        raise _fail_fast(task, exc) from exc
    layout = Layout.from_config(cfg)
    layout.work_dir.mkdir(parents=True, exist_ok=True)
    if first:
        freeze_run_config(cfg, run_id, params)
    log.info("task %s of run %s in %s (config %s)", task, run_id, layout.work_dir, cfg.digest()[:12])

    results: dict[str, Any] = {}
    t0 = time.perf_counter()
    for stage in stages_for(task, cfg):
        try:
            res = _stage_fn(stage)(cfg)
        except (PipelineError, ConfigError) as exc:
            log.error("stage %s failed on its input: %s", stage, exc)
            raise _fail_fast(task, exc) from exc
        results[stage] = _small(res or {})
        log.info("stage %s: %s", stage, json.dumps(results[stage], default=str)[:2000])
    outputs = stage_outputs(task, layout)
    summary = {
        "task": task,
        "run_id": run_id,
        "run_dir": str(layout.work_dir),
        "config_digest": cfg.digest(),
        "seconds": round(time.perf_counter() - t0, 3),
        "outputs": {k: str(p) for k, p in outputs.items()},
        "digests": {k: path_sha256(p) for k, p in outputs.items()},
        "result": results[task] if len(results) == 1 and task in results else results,
    }
    return json.loads(json.dumps(summary, default=str))


def _scalars(d: Any) -> dict[str, Any]:
    if not isinstance(d, Mapping):
        return {}
    return {str(k): v for k, v in d.items() if isinstance(v, (bool, int, float, str)) and len(str(v)) <= 200}


def asset_extra(task: str, summary: Mapping[str, Any]) -> dict[str, Any]:
    """Extras of the Asset event ``task`` emits: output digests, location, run id, config digest."""
    extra: dict[str, Any] = {
        "run_id": summary.get("run_id"),
        "run_dir": summary.get("run_dir"),
        "config_digest": summary.get("config_digest"),
        "outputs": dict(summary.get("outputs") or {}),
        "digests": dict(summary.get("digests") or {}),
        "result": _scalars(summary.get("result")),
    }
    if task == "evaluate":
        metrics_path = Path((summary.get("outputs") or {}).get("metrics", ""))
        if metrics_path.is_file():
            try:
                extra["metrics"] = _scalars(json.loads(metrics_path.read_text(encoding="utf-8")))
            except (OSError, ValueError):
                pass
    git = os.environ.get("SKIN_TWIN_GIT_COMMIT")
    if git:
        extra["git_commit"] = git
    return json.loads(json.dumps(extra, default=str))


def trigger_extras_from(events: Any) -> list[dict[str, Any]]:
    """Extras of the raw-data Asset events that triggered a run (oldest first), as plain dicts."""
    out: list[dict[str, Any]] = []
    if not events:
        return out
    try:
        groups = events.values() if hasattr(events, "values") else []
        for evs in groups:
            for ev in evs or []:
                extra = getattr(ev, "extra", None)
                if isinstance(extra, Mapping):
                    out.append(dict(extra))
    except Exception as exc:  # an accessor we do not understand: log, run with params only
        log.warning("could not read triggering asset events: %s", exc)
    return out
