"""The manifest table every data source produces, and its checks.

Columns (one row per image):

``image_id`` (str), ``path`` (str, relative to the data root, POSIX separators), ``label``
(one of :data:`pipeline.labels.CLASSES`), ``group_id`` (lesion id where known, else the image
id), ``split`` (``train``/``val``/``test``), ``width``, ``height`` (int), ``sha256`` (hex of
the file bytes).
"""

from __future__ import annotations

import pandas as pd

MANIFEST_COLUMNS: tuple[str, ...] = ("image_id", "path", "label", "group_id", "split", "width", "height", "sha256")
SPLITS: tuple[str, ...] = ("train", "val", "test")

# Columns of the augmented-set manifest (pipeline.augment): one row per written image.
AUGMENTED_COLUMNS: tuple[str, ...] = (
    "image_id",  # unique id of the written image, e.g. ISIC_0001__aug3
    "source_id",  # image_id of the original it was made from
    "path",  # relative to the augmented folder
    "label",
    "group_id",
    "split",
    "copy",  # 0 = resized original, 1.. = augmented copies
)

# Columns of the pair manifest (pipeline.pairs).
PAIR_COLUMNS: tuple[str, ...] = ("epoch", "batch", "left_id", "right_id", "left_label", "right_label", "same", "kind")


def ensure_columns(df: pd.DataFrame, columns: tuple[str, ...], where: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        from pipeline.errors import DataError

        raise DataError(f"{where}: missing column(s) {missing}")
