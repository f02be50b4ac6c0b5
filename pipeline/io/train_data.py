"""The train stage's inputs: the augmented manifest's train and val images in a memory-mapped uint8
cache, the pair manifest as row indices per epoch, and the validation pairs
(:class:`pipeline.core.training.TrainData`).

* The image size is the one the images were written at (``meta.json``), never
  ``augment.image_size`` of the current params.
* **Colour constancy.** When ``meta.json`` records one (``augment.color_constancy``), the train
  copies already carry it and the val images are corrected here in memory
  (:class:`pipeline.core.training.CorrectedRows`), as the export's inference will correct them.
* The data digest (part of the checkpoint's resume digest) covers content and relative paths only,
  never where the run folder is: a checkpoint resumes after the folder moves or on another worker
  mounting the same volume elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import Config
from pipeline.core.imaging import color_constancy
from pipeline.core.schema import PAIR_COLUMNS
from pipeline.core.training import CorrectedRows, PairEpoch, TrainData, validation_pairs
from pipeline.errors import DataError
from pipeline.io.imagecache import load_image_cache
from pipeline.io.manifests import check_labels, read_augmented, read_pairs, split_rows
from pipeline.labels import CLASS_TO_INDEX, NUM_CLASSES
from pipeline.layout import Layout

log = logging.getLogger(__name__)


def _label_index(series: pd.Series, where: str) -> np.ndarray:
    check_labels(series.to_frame("label"), where)
    return series.astype(str).map(CLASS_TO_INDEX).to_numpy(dtype=np.int64)


def _frame_digest(df: pd.DataFrame) -> str:
    hashed = pd.util.hash_pandas_object(df.reset_index(drop=True), index=False).to_numpy()
    return hashlib.sha256(hashed.tobytes()).hexdigest()


def _pair_epochs(pairs: pd.DataFrame, train_index: dict[str, int], labels: np.ndarray, where: Path,
                 aug_path: Path) -> list[PairEpoch]:
    """The pair manifest as row indices per epoch, checked against the augmented manifest.
    Pair epochs of fewer than 2 pairs are left out (batch norm needs 2)."""
    for col in ("left_id", "right_id"):
        unknown = sorted(set(pairs[col]) - set(train_index))
        if unknown:
            raise DataError(f"{where}: {col} not among the train images of the augmented manifest: {unknown[:5]}")
    left = pairs["left_id"].map(train_index).to_numpy(dtype=np.int64)
    right = pairs["right_id"].map(train_index).to_numpy(dtype=np.int64)
    if not np.array_equal(labels[left], _label_index(pairs["left_label"], str(where))) or not np.array_equal(
        labels[right], _label_index(pairs["right_label"], str(where))
    ):
        raise DataError(f"{where}: pair labels disagree with {aug_path}")
    same = (labels[left] == labels[right]).astype(np.int64)
    if not np.array_equal(same, pairs["same"].astype(np.int64).to_numpy()):
        log.warning("%s: 'same' column disagrees with the labels; using the labels", where)
    epoch_col = pairs["epoch"].to_numpy()
    out = []
    for ep in sorted(pd.unique(epoch_col)):
        sel = np.flatnonzero(epoch_col == ep)
        if sel.size >= 2:
            out.append(PairEpoch(left[sel], right[sel], same[sel]))
    if not out:
        raise DataError(f"{where}: no pair epoch with at least 2 pairs")
    return out


def load_train_data(cfg: Config, rank: int = 0, barrier: Any = None) -> TrainData:
    """Read the augmented and pair manifests, check them against each other, build (rank 0) or map
    (the other ranks, after ``barrier``) the image cache. Raises :class:`DataError` naming the file."""
    layout = Layout.from_config(cfg)
    aug, meta = read_augmented(layout.augmented_dir)
    pairs = read_pairs(layout.pairs)
    where = str(layout.augmented_manifest)
    train_df = split_rows(aug, "train", where)
    val_df = split_rows(aug, "val", where, "model selection needs the val split")
    used = pd.concat([train_df, val_df], ignore_index=True)
    if used["image_id"].duplicated().any():
        dup = used.loc[used["image_id"].duplicated(), "image_id"].head(5).tolist()
        raise DataError(f"{where}: duplicate image_id(s) {dup}")
    labels = _label_index(used["label"], where)
    paths = [layout.augmented_dir / p for p in used["path"].astype(str)]
    ids = used["image_id"].tolist()
    size = int(meta["image_size"])

    # Rank 0 builds the cache; the other ranks wait for it and then map the same file.
    kwargs = {"workers": cfg.train.cache_workers, "root": layout.augmented_dir}
    if rank == 0:
        cache = load_image_cache(ids, paths, size, layout.cache_dir, name="train", **kwargs)
    if barrier is not None:
        barrier()
    if rank != 0:
        cache = load_image_cache(ids, paths, size, layout.cache_dir, name="train", build=False, **kwargs)

    train_index = {i: r for r, i in enumerate(train_df["image_id"])}
    n_train = len(train_df)
    pairs = pairs.assign(left_id=pairs["left_id"].astype(str), right_id=pairs["right_id"].astype(str))
    pair_epochs = _pair_epochs(pairs, train_index, labels, layout.pairs, layout.augmented_manifest)

    val_rows = np.arange(n_train, len(used), dtype=np.int64)
    pre = dict(meta.get("preprocess") or {})
    images: Any = cache
    if pre.get("color_constancy", "none") != "none":
        corrected = color_constancy(cache.take(val_rows), str(pre["color_constancy"]), float(pre["sog_power"]))
        images = CorrectedRows(cache, n_train, corrected)
    vl, vr, vs = validation_pairs(labels[val_rows], cfg.seed)
    class_counts = np.bincount(labels[:n_train], minlength=NUM_CLASSES)
    digest = hashlib.sha256(
        json.dumps(
            {
                "augmented": str(meta.get("digest", "")),
                "size": size,
                "used": _frame_digest(used[["image_id", "path", "label", "split"]].astype(str)),
                "pairs": _frame_digest(pairs[list(PAIR_COLUMNS)].astype(str)),
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()
    return TrainData(
        images=images,
        labels=labels,
        pair_epochs=pair_epochs,
        val_rows=val_rows,
        val_pairs=PairEpoch(val_rows[vl], val_rows[vr], vs),
        class_counts=class_counts,
        image_size=size,
        digest=digest,
        preprocess=pre,
    )
