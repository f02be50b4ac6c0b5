"""The column contracts of the pipeline's tables (manifest, image facts, augmented set, pairs).

Columns (one row per image):

``image_id`` (str), ``path`` (str, relative to the data root, POSIX separators), ``label``
(one of :data:`pipeline.labels.CLASSES`), ``group_id`` (lesion id where known, else the image
id), ``split`` (``train``/``val``/``test``), ``width``, ``height`` (int), ``sha256`` (hex of
the file bytes), ``source_site`` (str: the acquisition source of the image -- the HAM10000
metadata column ``dataset``, e.g. ``rosendahl``, ``vidir_modern``, ``vidir_molemax``,
``vienna_dias``; where a source has no such column, the name of the configured data source
(entry); used by ``data.split.holdout_sources`` and the per-source metrics of ``evaluate``).
"""

from __future__ import annotations

import pandas as pd

from pipeline.errors import DataError

MANIFEST_COLUMNS: tuple[str, ...] = (
    "image_id", "path", "label", "group_id", "split", "width", "height", "sha256", "source_site",
)  # fmt: skip
SPLITS: tuple[str, ...] = ("train", "val", "test")

# Columns the validate stage's fact gathering (pipeline.io.imagefacts) adds to the manifest, in order.
FACT_COLUMNS: tuple[str, ...] = (
    "exists",  # bool: a regular file is at root/path
    "inside_root",  # bool: relative path that resolves inside the data root
    "decodes",  # bool: header parsed, within max_pixels, every pixel decoded
    "mode",  # str | None: PIL mode (RGB, L, RGBA, I;16, ...) from the header
    "img_width",  # Int64 | NA: width from the file's header
    "img_height",  # Int64 | NA: height from the file's header
    "bytes",  # Int64 | NA: file size
    "file_sha256",  # str | None: sha256 of the file bytes, recomputed
    "phash",  # str | None: 256-bit perceptual hash of the decoded pixels (pipeline.core.imaging.perceptual_hash)
    "error",  # str: short reason the file is unusable, "" when fine
)

# Columns of the augmented-set manifest (pipeline.core.augment): one row per written image.
AUGMENTED_COLUMNS: tuple[str, ...] = (
    "image_id",  # unique id of the written image, e.g. ISIC_0001__aug3
    "source_id",  # image_id of the original it was made from
    "path",  # relative to the augmented folder
    "label",
    "group_id",
    "split",
    "copy",  # 0 = resized original, 1.. = augmented copies
)

# Columns of the pair manifest (pipeline.core.pairs).
PAIR_COLUMNS: tuple[str, ...] = ("epoch", "batch", "left_id", "right_id", "left_label", "right_label", "same", "kind")


def ensure_columns(df: pd.DataFrame, columns: tuple[str, ...], where: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{where}: missing column(s) {missing}")
