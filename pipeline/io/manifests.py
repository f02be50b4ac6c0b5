"""Reading the pipeline's tables back, with one clear error per problem (file named, cause given).

Every stage that consumes another stage's table reads it here, so "not found: run X first",
"cannot read parquet" and the column / label / split checks are written once:

* :func:`read_manifest` -- ``data/manifest.parquet`` (ingest) and ``data/validated.parquet``
  (validate): :data:`~pipeline.core.schema.MANIFEST_COLUMNS`; a manifest written before the
  ``source_site`` column existed reads with ``source_site = "unknown"`` (one site);
* :func:`read_validated` -- the validated manifest with labels, splits and ids checked;
* :func:`read_augmented` -- ``data/augmented/manifest.parquet`` and the folder's ``meta.json``
  (the resolution the images were written at); a manifest written before its ``source_site``
  column existed reads with ``source_site = "unknown"``;
* :func:`read_pairs` -- ``data/pairs.parquet``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.core.schema import AUGMENTED_COLUMNS, MANIFEST_COLUMNS, PAIR_COLUMNS, SPLITS, ensure_columns
from pipeline.errors import DataError
from pipeline.labels import CLASSES

AUGMENTED_META = "meta.json"


def read_parquet(path: Path, produced_by: str, columns: tuple[str, ...] = (), what: str = "") -> pd.DataFrame:
    """A parquet table that stage ``produced_by`` writes; :class:`DataError` when absent or unreadable."""
    path = Path(path)
    if not path.is_file():
        where = f"{path}: {what}" if what else str(path)
        raise DataError(f"{where} not found: run `python -m pipeline {produced_by}` first")
    try:
        df = pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - any parquet failure is bad input
        raise DataError(f"{path}: cannot read parquet: {exc}") from None
    if columns:
        ensure_columns(df, columns, str(path))
    return df


UNKNOWN_SITE = "unknown"  # source_site of rows from a manifest written before the column existed


def read_manifest(path: Path, produced_by: str = "ingest") -> pd.DataFrame:
    df = read_parquet(path, produced_by, (), what="manifest" if produced_by == "ingest" else "")
    if "source_site" not in df.columns:
        df = df.assign(source_site=UNKNOWN_SITE)
    ensure_columns(df, MANIFEST_COLUMNS, str(path))
    return df


def check_labels(df: pd.DataFrame, where: str, column: str = "label") -> None:
    bad = sorted(set(df[column].astype(str)) - set(CLASSES))
    if bad:
        raise DataError(f"{where}: unknown label(s) {bad[:5]}; allowed {list(CLASSES)}")


def read_validated(path: Path) -> pd.DataFrame:
    """The validated manifest, as strings, sorted by image id; labels, splits and ids checked."""
    df = read_manifest(path, produced_by="validate")
    df = df.assign(
        image_id=df["image_id"].astype(str),
        label=df["label"].astype(str),
        split=df["split"].astype(str),
        group_id=df["group_id"].astype(str),
        path=df["path"].astype(str),
    )
    check_labels(df, str(path))
    bad_split = sorted(set(df["split"]) - set(SPLITS))
    if bad_split:
        raise DataError(f"{path}: unknown split(s) {bad_split[:5]}; allowed {list(SPLITS)}")
    if df["image_id"].duplicated().any():
        dup = df.loc[df["image_id"].duplicated(), "image_id"].head(5).tolist()
        raise DataError(f"{path}: duplicate image_id(s) {dup}")
    if not (df["split"] == "train").any():
        raise DataError(f"{path}: no train images")
    return df.sort_values("image_id", kind="stable").reset_index(drop=True)


def read_augmented(folder: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """``(manifest, meta)`` of the augmented folder; ``meta["image_size"]`` is the images' side."""
    folder = Path(folder)
    df = read_parquet(folder / "manifest.parquet", "augment", AUGMENTED_COLUMNS)
    df = df.assign(image_id=df["image_id"].astype(str), split=df["split"].astype(str), path=df["path"].astype(str))
    meta_path = folder / AUGMENTED_META
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        size = int(meta["image_size"])
    except FileNotFoundError:
        raise DataError(f"{meta_path} not found: run `python -m pipeline augment` first") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{meta_path}: unreadable augmented-set metadata ({exc})") from None
    if size < 1:
        raise DataError(f"{meta_path}: image_size must be a positive integer, got {meta['image_size']!r}")
    return df, meta


def split_rows(df: pd.DataFrame, split: str, where: str, why: str = "") -> pd.DataFrame:
    """The rows of one split (index reset); :class:`DataError` when there are none."""
    part = df[df["split"].astype(str) == split].reset_index(drop=True)
    if part.empty:
        raise DataError(f"{where}: no {split} images{' (' + why + ')' if why else ''}")
    return part


def read_pairs(path: Path) -> pd.DataFrame:
    return read_parquet(path, "pairs", PAIR_COLUMNS)
