"""Stage ``ingest``: the configured data source -> one manifest with lesion-grouped splits.

The source's reader (:mod:`pipeline.io.readers`) lists ``image_id, path, label, group_id``;
:func:`build_manifest` adds per-file facts (``width``, ``height``, ``sha256``, from headers and bytes
on ``data.workers`` threads) and the split (:func:`pipeline.core.splits.assign_splits`); the
manifest is written atomically, rows sorted by ``image_id``. With
``data.split.group_near_duplicates`` (and ``validate.near_duplicate_distance`` >= 0) every image is
also decoded once for its perceptual hash (:func:`pipeline.io.imagefacts.inspect_image`, the
validate stage's own function: same hash, same bomb guard), so that near-duplicate pictures are
split together (:func:`pipeline.core.splits.near_duplicate_groups`).

Ingest records, validate judges: a listed image that is missing or unreadable keeps its row with
``width = height = 0`` (and ``sha256 = ""`` when its bytes cannot be read) so that ``validate``
reports every bad file at once; what makes the source itself unusable is an error here.

Besides the manifest, ingest writes its summary (rows per label, split and site, the sources and
the near-duplicate joins, each lesion group that follows another's split with the group it
follows) to ``reports/ingest_summary.json`` (:attr:`Layout.ingest_summary`); ``track`` logs it to
MLflow (``data/ingest_summary.json``, tags ``skin_twin.ingest.*``) for the lineage an auditor reads.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import Config
from pipeline.core.schema import MANIFEST_COLUMNS, SPLITS
from pipeline.core.splits import assign_splits, near_duplicate_groups
from pipeline.errors import DataError
from pipeline.io.files import write_json, write_table
from pipeline.io.imagefacts import inspect_image
from pipeline.io.images import file_facts
from pipeline.io.readers import (
    MULTI,
    READER_COLUMNS,
    SITE_COLUMN,
    check_source_config,
    csv_path,
    data_root,
    read_entries,
)
from pipeline.layout import Layout

log = logging.getLogger(__name__)


def read_source(cfg: Config) -> tuple[Path, pd.DataFrame]:
    """(data root, reader table) for ``cfg.data.source``; for ``multi`` the entries of
    ``data.sources`` concatenated below their common root (:func:`pipeline.io.readers.read_entries`)."""
    spec = check_source_config(cfg)
    if spec is MULTI:
        return read_entries(cfg)
    root = data_root(cfg)
    if spec.generated and not root.is_dir():
        raise DataError(f"{root}: {spec.name} data set not found (run `python -m pipeline synthesize` first)")
    return root, spec.load(root, csv_path(cfg))


def with_sites(table: pd.DataFrame, default: str) -> pd.DataFrame:
    """``table`` with a ``source_site`` column: the reader's value where given and not blank, else
    ``default`` (the data source's name)."""
    out = table.copy()
    given = out[SITE_COLUMN].astype(str).str.strip() if SITE_COLUMN in out.columns else pd.Series("", index=out.index)
    out[SITE_COLUMN] = given.where(given.str.len() > 0, default)
    return out


def build_manifest(table: pd.DataFrame, root: Path, cfg: Config) -> pd.DataFrame:
    """Reader table -> full manifest (facts + splits), sorted by ``image_id``.

    ``source_site`` is the reader's where given, else ``cfg.data.source`` (see :func:`with_sites`)."""
    return manifest_and_joins(table, root, cfg)[0]


def manifest_and_joins(table: pd.DataFrame, root: Path, cfg: Config) -> tuple[pd.DataFrame, dict[str, str]]:
    """:func:`build_manifest` and the lesion groups whose split follows another group's because of a
    near-duplicate picture (group -> the group it follows; see :func:`split_keys`)."""
    table = with_sites(table, cfg.data.source)
    cols = [*READER_COLUMNS, SITE_COLUMN]
    df = table.loc[:, cols].astype(str).sort_values("image_id", kind="stable").reset_index(drop=True)
    with ThreadPoolExecutor(max_workers=cfg.data.workers) as pool:
        facts = list(pool.map(file_facts, (root / p for p in df["path"])))
    df["width"] = np.array([f[0] for f in facts], dtype=np.int64)
    df["height"] = np.array([f[1] for f in facts], dtype=np.int64)
    df["sha256"] = [f[2] for f in facts]
    keys = split_keys(df, root, cfg)
    df["split"] = assign_splits(df["label"].to_numpy(), keys, cfg.data.split, cfg.seed, df[SITE_COLUMN].to_numpy())
    joins = dict(sorted({g: k for g, k in zip(df["group_id"].astype(str), keys, strict=True) if k != g}.items()))
    if joins:
        log.info("ingest: %d lesion group(s) follow the split of another lesion with a near-duplicate picture",
                 len(joins))
    return df.loc[:, list(MANIFEST_COLUMNS)], joins


def split_keys(df: pd.DataFrame, root: Path, cfg: Config) -> list[str]:
    """The group each row's split follows: ``group_id``, merged across near-duplicate pictures when
    ``data.split.group_near_duplicates`` is on (decodes every image once, on ``data.workers`` threads;
    an image that cannot be decoded keeps its own group and validate reports it)."""
    groups = df["group_id"].astype(str).tolist()
    distance = cfg.validate_cfg.near_duplicate_distance
    if not cfg.data.split.group_near_duplicates or distance < 0:
        return groups
    resolved = root.resolve()
    hash_of = partial(inspect_image, root=resolved, max_pixels=cfg.validate_cfg.max_pixels)
    with ThreadPoolExecutor(max_workers=cfg.data.workers) as pool:
        hashes = [f["phash"] for f in pool.map(hash_of, df["path"])]
    return near_duplicate_groups(groups, hashes, distance)


def summarize(df: pd.DataFrame) -> dict[str, Any]:
    return {
        "rows": len(df),
        "groups": int(df["group_id"].nunique()),
        "per_label": {k: int(v) for k, v in df["label"].value_counts().sort_index().items()},
        "per_split": {s: int((df["split"] == s).sum()) for s in SPLITS},
        "per_site": {k: int(v) for k, v in df[SITE_COLUMN].value_counts().sort_index().items()},
        "unreadable": int((df["width"] == 0).sum()),
    }


def run_ingest(cfg: Config) -> dict[str, Any]:
    root, table = read_source(cfg)
    manifest, joins = manifest_and_joins(table, root, cfg)
    layout = Layout.from_config(cfg)
    out = layout.manifest
    write_table(out, manifest)
    summary = {"source": cfg.data.source, "root": str(root), "manifest": str(out), **summarize(manifest)}
    # lesions split with another lesion because one of their pictures is a near-duplicate of its
    summary["near_duplicate_joins"] = {"lesions": len(joins), "examples": dict(list(joins.items())[:10])}
    if cfg.data.sources:
        summary["sources"] = [{"name": e.label, "source": e.source, "root": e.root} for e in cfg.data.sources]
    # the record `track` logs for the auditor: the summary with every join, not only the first 10
    write_json(layout.ingest_summary, {**summary, "near_duplicate_joins": {
        **summary["near_duplicate_joins"], "all": joins}})
    if summary["unreadable"]:
        log.warning("ingest: %d image(s) missing or unreadable (validate reports them)", summary["unreadable"])
    log.info("ingest: %d rows, %d groups -> %s", summary["rows"], summary["groups"], out)
    return summary
