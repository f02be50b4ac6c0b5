"""Loading the parameters the way every entry point does (CLI, DAG, Celery workers, ``lineage``,
``make run``): schema (:func:`pipeline.config.load_config`), relative paths made absolute against
the params file's folder (:func:`resolve_paths`), then the rules that depend on the registered data
sources (:func:`pipeline.io.readers.check_source_config`).

Paths are resolved here, once, so that nothing below (``pipeline.io``, the stages) depends on the
current directory: a worker or a ``lineage`` call started in another folder reads the same MLflow
store, data and run folders as the CLI in the project root.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import Config, load_config
from pipeline.io.readers import check_source_config

# Keys holding a file system path: a relative value is relative to the params file's folder (so are
# the root and csv of each entry of data.sources).
# (``paths.work_dir`` keeps its meaning for DVC: relative to the folder DVC runs in, the project root.)
PATH_KEYS: tuple[str, ...] = ("data.root", "data.csv", "mlflow.artifact_root", "airflow.runs_dir")
SQLITE = "sqlite:///"


def check(cfg: Config) -> Config:
    """Cross-registry rules of a loaded config; :class:`~pipeline.config.ConfigError` names the key."""
    check_source_config(cfg)
    return cfg


def _absolute(value: str, base: Path) -> str | None:
    """``value`` made absolute against ``base``, or None when it already is absolute."""
    path = Path(value).expanduser()
    return None if path.is_absolute() else str((base / path).resolve())


def resolve_paths(cfg: Config, base: Path) -> Config:
    """``cfg`` with relative paths (:data:`PATH_KEYS` and a ``sqlite:///`` store in
    ``mlflow.tracking_uri``) made absolute against ``base``."""
    flat = cfg.flat()
    changes: dict[str, Any] = {}
    for key in PATH_KEYS:
        value = flat.get(key)
        if isinstance(value, str) and value and (resolved := _absolute(value, base)):
            changes[key] = resolved
    if cfg.data.sources:  # each entry's root and csv, like data.root / data.csv
        entries = []
        for entry in cfg.data.sources:
            e = entry.model_dump(mode="json")
            for key in ("root", "csv"):
                if isinstance(e[key], str) and e[key] and (resolved := _absolute(e[key], base)):
                    e[key] = resolved
            entries.append(e)
        if entries != [e.model_dump(mode="json") for e in cfg.data.sources]:
            changes["data.sources"] = entries
    uri = cfg.mlflow.tracking_uri
    if uri.startswith(SQLITE):
        db = uri[len(SQLITE) :]
        if db and db != ":memory:" and (resolved := _absolute(db, base)):
            changes["mlflow.tracking_uri"] = SQLITE + resolved
    return cfg.with_overrides(changes) if changes else cfg


def load_params(path: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """The config of ``path`` plus ``overrides``; relative paths (in the file or the overrides)
    resolved against the params file's folder; source rules checked."""
    cfg = load_config(path, overrides)
    return check(resolve_paths(cfg, Path(path).resolve().parent))
