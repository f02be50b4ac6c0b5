"""Data-source readers and their registry: each source is one decorated function here.

A reader is a function of the data root (and, for CSV-labelled sources, the CSV) returning a table
with ``image_id, path, label, group_id`` (and optionally ``source_site``, the acquisition source of
each image; blank or absent -> the data source's name, filled in by ingest); ``path`` is relative to
the data root, POSIX style. The
``ingest`` stage (:mod:`pipeline.stages.ingest`) adds per-file facts (``width``, ``height``,
``sha256``) and the split and writes the manifest.

**Adding a data source** is one function in this module, decorated with :func:`source`: its name
becomes a valid ``data.source`` (checked when parameters are loaded, with ``data.csv`` required
when ``needs_csv``), a choice of the DAG's ``data_source`` run parameter, and the generated
``dvc.yaml`` declares its root (and CSV) as dependencies of ``ingest``. This module stays
import-light (pandas is imported inside the readers) because the Airflow DAG reads
the registry at parse time.

Design choices:

* **Ingest records, validate judges.** A listed image that is missing or unreadable does not
  stop ingest: its row is kept with ``width = height = 0`` (and ``sha256 = ""`` when the file
  bytes cannot be read at all), and a metadata row whose image is not found anywhere keeps the
  path it would conventionally have (``images/<id>.jpg`` for HAM10000, ``<id>.jpg`` for ISIC),
  so the validate stage reports every problem by file name in one report. Unknown labels pass
  through the same way. What makes the *source itself* unusable is a :class:`DataError` here:
  missing root / metadata / CSV, required columns absent, no rows, a duplicated image id, two
  files with the same image stem, an ISIC row that is not exactly one-hot, an unknown class
  folder.
* **Images are found by file stem.** The data root is indexed once (O(n), hidden folders such
  as in-progress atomic writes skipped), so the official HAM10000 download
  (``HAM10000_images_part_1/`` + ``_part_2/``), the flat ``images/`` layout and anything else
  all work. Byte-identical copies of one image are tolerated (first sorted path wins).
* **Cheap facts.** Width/height come from the image header (PIL opens lazily, no decode);
  ``sha256`` is of the file bytes. Full decoding is the validate stage's job.
* **Stable output.** Rows are sorted by ``image_id``; the split is order-invariant.
* **Several sources in one run** (``data.source: multi`` + ``data.sources: [{source, root, csv,
  name}, ...]``): each entry is read by its own reader on its own root and the tables are
  concatenated (:func:`combine_sources`). The manifest's ``path`` is then relative to the entries'
  **common root** (the deepest folder holding every root, :func:`data_root`), so every stage after
  ingest resolves ``data_root(cfg) / path`` exactly as with one source. An image id (or lesion id)
  found in more than one entry is made unique as ``<entry name>__<id>`` in every entry that has it;
  a row without a ``source_site`` gets its entry's name.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import MULTI_SOURCE, Config, ConfigError, SourceEntry
from pipeline.errors import DataError
from pipeline.io.images import IMAGE_SUFFIXES
from pipeline.labels import CLASSES, ISIC_COLUMNS
from pipeline.layout import Layout

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

log = logging.getLogger(__name__)

HAM_METADATA = "HAM10000_metadata.csv"
READER_COLUMNS: tuple[str, ...] = ("image_id", "path", "label", "group_id")
SITE_COLUMN = "source_site"  # optional reader column: where the image was acquired (HAM10000: `dataset`)


# ----------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Source:
    """One data source: its reader and what it needs from ``data.*``."""

    name: str
    read: Callable[..., "pd.DataFrame"]
    needs_csv: bool = False  # data.csv is required (reader called as read(csv, root))
    generated: bool = False  # the `synthesize` stage makes it when data.root is null
    description: str = ""

    def load(self, root: Path, csv: Path | None) -> "pd.DataFrame":
        return self.read(csv, root) if self.needs_csv else self.read(root)


SOURCES: dict[str, Source] = {}


def source(name: str, *, needs_csv: bool = False, generated: bool = False, description: str = ""):
    """Register the decorated reader as data source ``name`` (see the module docstring)."""

    def register(fn: Callable[..., "pd.DataFrame"]) -> Callable[..., "pd.DataFrame"]:
        if name in SOURCES:
            raise ValueError(f"data source {name!r} registered twice")
        SOURCES[name] = Source(name, fn, needs_csv, generated, description or (fn.__doc__ or "").split("\n")[0])
        return fn

    return register


# What data.source=multi stands for (not a registered reader: each entry of data.sources has one).
MULTI = Source(MULTI_SOURCE, lambda *_: None, description="several sources (data.sources), concatenated")


def check_entry(entry: SourceEntry, i: int) -> Source:
    """The reader of ``data.sources[i]``; :class:`ConfigError` naming the key when it does not fit."""
    spec = SOURCES.get(entry.source)
    if spec is None:
        raise ConfigError(f"data.sources[{i}].source: unknown source {entry.source!r}; known: {sorted(SOURCES)}")
    if spec.needs_csv and not entry.csv:
        raise ConfigError(f"data.sources[{i}].csv: must be set for source {entry.source!r}")
    return spec


def check_source_config(cfg: Config) -> Source:
    """The configured source; :class:`ConfigError` naming the key when ``data.*`` does not fit it.

    ``data.source: multi`` returns :data:`MULTI` after checking every entry of ``data.sources``."""
    if cfg.data.source == MULTI_SOURCE:
        for i, entry in enumerate(cfg.data.sources):
            check_entry(entry, i)
        return MULTI
    spec = SOURCES.get(cfg.data.source)
    if spec is None:
        raise ConfigError(f"data.source: unknown source {cfg.data.source!r}; known: {sorted(SOURCES)}")
    if spec.needs_csv and not cfg.data.csv:
        raise ConfigError(f"data.csv: must be set for data.source={cfg.data.source!r}")
    if not spec.generated and not cfg.data.root:
        raise ConfigError(f"data.root: must be set for data.source={cfg.data.source!r}")
    return spec


def data_root(cfg: Config) -> Path:
    """The folder the manifest's ``path`` column is relative to.

    ``data.root`` when set; for a generated source (``synthetic``) with no root, the folder the
    ``synthesize`` stage writes, ``<work_dir>/data/synthetic``.
    """
    spec = check_source_config(cfg)
    if spec is MULTI:
        return common_root([Path(e.root) for e in cfg.data.sources])
    if cfg.data.root:
        return Path(cfg.data.root)
    assert spec.generated
    return Layout.from_config(cfg).synthetic_dir


def common_root(roots: list[Path]) -> Path:
    """The deepest folder holding every one of ``roots`` (absolute; the root itself for one)."""
    return Path(os.path.commonpath([str(r.resolve()) for r in roots]))


def entry_csv(entry: SourceEntry) -> Path | None:
    """An entry's CSV as a path; a relative CSV that is not found is looked up below its root."""
    if not entry.csv:
        return None
    csv, root = Path(entry.csv), Path(entry.root)
    if not csv.is_absolute() and not csv.is_file() and (root / csv).is_file():
        csv = root / csv
    return csv


def combine_sources(parts: list[tuple[str, str, "pd.DataFrame"]]) -> "pd.DataFrame":
    """Concatenate reader tables of several entries: ``(entry name, root relative to the common root
    (POSIX, "" for the common root itself), table)``.

    Paths get the root's prefix; a missing/blank ``source_site`` becomes the entry name; image ids
    and group ids found in more than one entry become ``<entry name>__<id>`` in each of them
    (:class:`DataError` if ids are still not unique after that)."""
    import pandas as pd

    tables = []
    for name, prefix, table in parts:
        t = table.copy()
        t["path"] = [f"{prefix}/{p}" if prefix else str(p) for p in t["path"].astype(str)]
        given = t[SITE_COLUMN].astype(str).str.strip() if SITE_COLUMN in t.columns else pd.Series("", index=t.index)
        t[SITE_COLUMN] = given.where(given.str.len() > 0, name)
        t["_entry"] = name
        tables.append(t.loc[:, [*READER_COLUMNS, SITE_COLUMN, "_entry"]].astype(str))
    df = pd.concat(tables, ignore_index=True)
    for col in ("image_id", "group_id"):
        entries_per_id = df.groupby(col)["_entry"].nunique()
        shared = set(entries_per_id[entries_per_id > 1].index)
        if shared:
            hit = df[col].isin(shared)
            df.loc[hit, col] = df.loc[hit, "_entry"] + "__" + df.loc[hit, col]
            log.warning("%d %s value(s) found in several sources, prefixed with the entry name", len(shared), col)
    _check_unique(df["image_id"], Path("data.sources"))
    return df.drop(columns="_entry")


def read_entries(cfg: Config) -> tuple[Path, "pd.DataFrame"]:
    """``data.source: multi``: (common root, combined reader table)."""
    root = data_root(cfg)
    parts = []
    for i, entry in enumerate(cfg.data.sources):
        spec = check_entry(entry, i)
        eroot = Path(entry.root).resolve()
        table = spec.load(eroot, entry_csv(entry))
        prefix = eroot.relative_to(root).as_posix()
        parts.append((entry.label, "" if prefix == "." else prefix, table))
        log.info("ingest: %s (%s, %s): %d rows", entry.label, entry.source, eroot, len(table))
    return root, combine_sources(parts)


def csv_path(cfg: Config) -> Path | None:
    """``data.csv`` as a path; a relative CSV that is not found is looked up below the data root."""
    if not cfg.data.csv:
        return None
    csv = Path(cfg.data.csv)
    root = data_root(cfg)
    if not csv.is_absolute() and not csv.is_file() and (root / csv).is_file():
        csv = root / csv
    return csv


# ----------------------------------------------------------------------------- helpers
def _require_dir(root: Path) -> None:
    if not root.is_dir():
        raise DataError(f"{root}: data root not found (or not a folder)")


def index_images(root: Path) -> dict[str, str]:
    """Image file stem -> path relative to ``root`` (POSIX), for every image below ``root``.

    Hidden files and folders (names starting with ``.``) are skipped. Two files with the same
    stem raise :class:`DataError` naming both, unless their bytes are identical (some HAM10000
    redistributions ship every image twice, e.g. ``HAM10000_images_part_1/`` and
    ``ham10000_images_part_1/``): then the first path in sorted order is used.
    """
    found: dict[str, str] = {}
    identical = 0
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if not p.is_file():
            continue
        if p.stem in found:
            if _same_bytes(root / found[p.stem], p):
                identical += 1
                continue
            raise DataError(f"{root}: image id {p.stem!r} found twice: {found[p.stem]} and {rel.as_posix()}")
        found[p.stem] = rel.as_posix()
    if identical:
        log.info("%s: %d byte-identical duplicate image file(s) ignored", root, identical)
    return found


def _same_bytes(a: Path, b: Path) -> bool:
    try:
        return a.stat().st_size == b.stat().st_size and a.read_bytes() == b.read_bytes()
    except OSError:
        return False


def _read_csv(path: Path, required: tuple[str, ...]) -> "pd.DataFrame":
    import pandas as pd

    if not path.is_file():
        raise DataError(f"{path}: metadata file not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable CSV: {exc}") from None
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing} (has {list(df.columns)})")
    if df.empty:
        raise DataError(f"{path}: no rows")
    return df


def _check_unique(ids: "pd.Series", where: Path) -> None:
    dup = ids[ids.duplicated()].unique().tolist()
    if dup:
        raise DataError(f"{where}: duplicated image id(s) {dup[:5]}{' ...' if len(dup) > 5 else ''}")


def _blank_to(values: "pd.Series", fallback: "pd.Series") -> "pd.Series":
    return values.where(values.str.len() > 0, fallback)


# ----------------------------------------------------------------------------- readers
@source("synthetic", generated=True, description="the project's SYNTHETIC data set (HAM10000 layout)")
@source("ham10000", description="HAM10000_metadata.csv + images anywhere below the root")
def read_ham10000(root: Path) -> "pd.DataFrame":
    """HAM10000 layout: ``HAM10000_metadata.csv`` + images anywhere below ``root``.

    ``label`` = ``dx`` (stripped, lower case); ``group_id`` = ``lesion_id`` when present and not
    blank, else the image id; ``source_site`` = the ``dataset`` column (stripped; blank when the
    column is absent -- ingest then uses the source's name). An image not found keeps the path
    ``images/<image_id>.jpg``.
    """
    import numpy as np
    import pandas as pd

    _require_dir(root)
    meta_path = root / HAM_METADATA
    meta = _read_csv(meta_path, ("image_id", "dx"))
    ids = meta["image_id"].str.strip()
    if (ids == "").any():
        rows = (np.flatnonzero(ids == "") + 2).tolist()
        raise DataError(f"{meta_path}: empty image_id on line(s) {rows[:5]}")
    _check_unique(ids, meta_path)
    found = index_images(root)
    lesions = meta["lesion_id"].str.strip() if "lesion_id" in meta.columns else pd.Series("", index=meta.index)
    sites = meta["dataset"].str.strip() if "dataset" in meta.columns else pd.Series("", index=meta.index)
    return pd.DataFrame(
        {
            "image_id": ids,
            "path": [found.get(i, f"images/{i}.jpg") for i in ids],
            "label": meta["dx"].str.strip().str.lower(),
            "group_id": _blank_to(lesions, ids),
            SITE_COLUMN: sites,
        }
    )


@source("isic_csv", needs_csv=True, description="ISIC ground-truth CSV (one-hot MEL NV BCC AKIEC BKL DF VASC)")
def read_isic_csv(csv_path: Path, root: Path) -> "pd.DataFrame":
    """ISIC 2018 task 3 ground truth: ``image`` + one-hot ``MEL NV BCC AKIEC BKL DF VASC``.

    Each row must have exactly one 1 (others 0) among the seven columns, else :class:`DataError`
    naming the CSV, line and image. ``group_id`` = ``lesion_id`` column if present, else image id.
    An image not found keeps the path ``<image>.jpg``.
    """
    import numpy as np
    import pandas as pd

    _require_dir(root)
    df = _read_csv(csv_path, ("image", *ISIC_COLUMNS))
    ids = df["image"].str.strip()
    _check_unique(ids, csv_path)
    onehot = df[list(ISIC_COLUMNS)].apply(lambda s: pd.to_numeric(s.str.strip(), errors="coerce"))
    values = onehot.to_numpy(dtype=np.float64)
    ok = np.isin(values, (0.0, 1.0)).all(axis=1) & ((values == 1.0).sum(axis=1) == 1)
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        raw = {c: df[c].iloc[i] for c in ISIC_COLUMNS}
        raise DataError(
            f"{csv_path}: line {i + 2} (image {ids.iloc[i]!r}) is not one-hot over {list(ISIC_COLUMNS)}: {raw}"
            f" ({int((~ok).sum())} bad row(s) in all)"
        )
    codes = np.array(list(ISIC_COLUMNS.values()))
    found = index_images(root)
    lesions = df["lesion_id"].str.strip() if "lesion_id" in df.columns else pd.Series("", index=df.index)
    return pd.DataFrame(
        {
            "image_id": ids,
            "path": [found.get(i, f"{i}.jpg") for i in ids],
            "label": codes[values.argmax(axis=1)],
            "group_id": _blank_to(lesions, ids),
        }
    )


@source("imagefolder", description="one sub-folder per class")
def read_imagefolder(root: Path) -> "pd.DataFrame":
    """One sub-folder per class (name = class code, any case); images below it (recursive).

    ``image_id`` = file stem (unique across the tree), ``group_id`` = image id. Hidden folders
    are skipped; files directly in ``root`` are ignored.
    """
    import pandas as pd

    _require_dir(root)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [p.name for p in folders if p.name.lower() not in CLASSES]
    if unknown:
        raise DataError(f"{root}: unknown class folder(s) {unknown}; expected names from {list(CLASSES)}")
    rows = []
    seen: dict[str, str] = {}
    for folder in folders:
        for rel_id, rel in index_images(folder).items():
            path = f"{folder.name}/{rel}"
            if rel_id in seen:
                raise DataError(f"{root}: image id {rel_id!r} found twice: {seen[rel_id]} and {path}")
            seen[rel_id] = path
            rows.append({"image_id": rel_id, "path": path, "label": folder.name.lower(), "group_id": rel_id})
    if not rows:
        raise DataError(f"{root}: no images in class folders")
    return pd.DataFrame(rows, columns=list(READER_COLUMNS))
