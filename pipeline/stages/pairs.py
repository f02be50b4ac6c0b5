"""Stage ``pairs``: train rows of the augmented manifest -> pair manifest + summary.

Train rows are sorted by ``image_id`` before pairing, so the result depends only on the set of train
images, the ``pairs`` config and ``seed`` (not on row order). The generator is the pure
:func:`pipeline.core.pairs.build_pair_manifest`.
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline.config import Config
from pipeline.core.pairs import build_pair_manifest, summarize_pairs
from pipeline.core.schema import AUGMENTED_COLUMNS
from pipeline.errors import DataError
from pipeline.io.files import write_json, write_table
from pipeline.io.manifests import read_parquet, split_rows
from pipeline.layout import Layout

log = logging.getLogger(__name__)


def run_pairs(cfg: Config) -> dict[str, Any]:
    layout = Layout.from_config(cfg)
    src = layout.augmented_manifest
    aug = read_parquet(src, "augment", AUGMENTED_COLUMNS)
    train = split_rows(aug, "train", str(src))
    train = train.assign(image_id=train["image_id"].astype(str), label=train["label"].astype(str))
    if train["image_id"].duplicated().any():
        dup = train.loc[train["image_id"].duplicated(), "image_id"].head(5).tolist()
        raise DataError(f"{src}: duplicate train image_id(s) {dup}")
    train = train.sort_values("image_id", kind="stable")
    try:
        pairs = build_pair_manifest(train["image_id"].to_numpy(), train["label"].to_numpy(), cfg.pairs, cfg.seed)
    except DataError as exc:
        raise DataError(f"{src}: {exc}") from None
    summary = summarize_pairs(pairs)
    summary.update(
        {
            "train_images": int(len(train)),
            "target_positive_fraction": cfg.pairs.positive_fraction,
            "tolerance": cfg.pairs.tolerance,
            "batch_size": cfg.pairs.batch_size,
            "fixed_points": cfg.pairs.fixed_points,
            "seed": cfg.seed,
        }
    )
    write_table(layout.pairs, pairs)
    write_json(layout.pairs_summary, summary)
    log.info(
        "pairs: %d pairs over %d epochs, positive fraction %.3f", len(pairs), cfg.pairs.epochs, summary["positive_fraction"]
    )
    return {
        "pairs": summary["pairs"],
        "epochs": cfg.pairs.epochs,
        "positive_fraction": round(summary["positive_fraction"], 4),
        "kinds": summary["kinds"],
        "out": str(layout.pairs),
    }
