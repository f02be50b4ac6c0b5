"""Stage ``augment``: validated manifest -> ``data/augmented/`` (images, manifest.parquet, meta.json).

Reads the validated manifest, plans the outputs (:func:`pipeline.core.augment.plan_outputs`) and
writes them through :mod:`pipeline.io.augment_writer` into one folder that replaces the old one
atomically. ``meta.json`` records the side of the written images, which is what ``train`` trains at,
and (``preprocess``, only when not ``none``) the colour constancy of the train copies, which
``train`` applies to the val images and records in ``best.pt`` for the export.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import pandas as pd

from pipeline.config import Config
from pipeline.core.augment import copy_seed, plan_outputs, summarize
from pipeline.core.schema import AUGMENTED_COLUMNS, SPLITS
from pipeline.errors import DataError, StorageError
from pipeline.io.augment_writer import STORAGE, WriteTask, write_all
from pipeline.io.files import atomic_dir
from pipeline.io.manifests import AUGMENTED_META, read_validated
from pipeline.io.readers import data_root
from pipeline.layout import Layout

log = logging.getLogger(__name__)


def augmented_digest(manifest: pd.DataFrame, cfg: Config) -> str:
    """What the written images are a pure function of: the source images' content and labels, the
    split, the seed and the augment settings (the train stage keys its checkpoints on it)."""
    rows = manifest[["image_id", "sha256", "label", "split"]].astype(str).sort_values("image_id").to_numpy().tolist()
    settings = cfg.augment.model_dump(mode="json", exclude={"workers"})  # workers change nothing written
    payload = {"seed": cfg.seed, "augment": settings, "rows": rows}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def run_augment(cfg: Config) -> dict[str, Any]:
    layout = Layout.from_config(cfg)
    manifest = read_validated(layout.validated_manifest)
    root = data_root(cfg)
    plan, per_class = plan_outputs(manifest, cfg.augment)
    with atomic_dir(layout.augmented_dir) as tmp:
        for split in SPLITS:
            (tmp / split).mkdir()
        tasks = [
            WriteTask(
                source=str(root / src),
                outputs=tuple(
                    (str(tmp / p), int(k), copy_seed(cfg.seed, sid, int(k)))
                    for p, k, sid in zip(g["path"], g["copy"], g["source_id"], strict=True)
                ),
                color=cfg.augment.color_constancy != "none" and bool((g["split"] == "train").all()),
            )
            for src, g in plan.groupby("source_path", sort=False)
        ]
        errors = write_all(tasks, cfg.augment)
        if errors:
            storage = [e.removeprefix(STORAGE) for e in errors if e.startswith(STORAGE)]
            if storage:
                raise StorageError(storage[0] + (f" (and {len(storage) - 1} more)" if len(storage) > 1 else ""))
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise DataError(errors[0] + more)
        out = plan[list(AUGMENTED_COLUMNS)].reset_index(drop=True)
        out.to_parquet(tmp / layout.augmented_manifest.name, index=False)
        meta = {"format": 1, "image_size": cfg.augment.image_size, "images": len(out),
                "digest": augmented_digest(manifest, cfg)}
        if cfg.augment.color_constancy != "none":  # absent = none (meta.json of older runs, unchanged default)
            # train copies are corrected; val/test are not (the export applies it when scoring)
            meta["preprocess"] = {"color_constancy": cfg.augment.color_constancy, "sog_power": cfg.augment.sog_power}
        (tmp / AUGMENTED_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    summary = summarize(plan, per_class, cfg.augment)
    log.info("augment: %s images written to %s", summary["images"], layout.augmented_dir)
    return {**summary, "out": str(layout.augmented_dir)}
