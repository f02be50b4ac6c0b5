"""Atomic writes: an artifact is either complete or absent, never half-written."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

log = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` only on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def remove_stale_temps(folder: str | Path) -> list[str]:
    """Delete what :func:`atomic_path` / :func:`atomic_dir` leave when a process is killed mid-write
    (``.<name>.*.tmp`` in ``folder``). Only for a folder one writer owns (e.g. a run's train folder at
    the start of training). Returns the names removed."""
    folder = Path(folder)
    removed = []
    for tmp in sorted(folder.glob(".*.tmp")) if folder.is_dir() else []:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        removed.append(tmp.name)
    return removed


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; it replaces ``target`` only on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old.{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_table(path: str | Path, df: pd.DataFrame) -> None:
    """Write a DataFrame as parquet (or CSV when the name ends in .csv), atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".csv":
            df.to_csv(tmp, index=False)
        else:
            df.to_parquet(tmp, index=False)


def read_table(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (run the stage that produces it first)")
    if path.suffix == ".csv":
        return pd.read_csv(path)
    return pd.read_parquet(path)


def remove(path: str | Path) -> None:
    """Remove a file or folder if present (used to retract outputs on failure)."""
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def read_json(path: str | Path) -> Any:
    """The parsed JSON file, or None when it is absent or unreadable (logged)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable JSON (%s)", path, exc)
        return None


def read_json_object(path: str | Path) -> dict[str, Any]:
    """The JSON object in ``path``; ``{}`` when the file is absent, unreadable or not an object."""
    data = read_json(path)
    return data if isinstance(data, dict) else {}
