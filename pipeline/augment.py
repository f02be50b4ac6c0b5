"""Offline augmentation: the ``augment`` stage.

Reads the validated manifest and writes ``data/augmented/`` (one folder, replaced atomically):

* ``train/<id>__a<k>.png`` -- for each train image the resized original as copy 0 (when
  ``augment.keep_original``) and augmented copies ``1..K``;
* ``val/<id>__a0.png``, ``test/<id>__a0.png`` -- only resized (evaluation sees unaltered images);
* ``manifest.parquet`` with :data:`pipeline.manifest.AUGMENTED_COLUMNS`.

Design choices:

* **Same preprocessing as inference.** Every image goes through
  :func:`pipeline.preprocess.load_rgb` + :func:`~pipeline.preprocess.resize_square` first; the
  random transforms then run at the training resolution (cheaper than augmenting full-size
  600x450 images, and the stored copy is exactly what the network sees).
* **Transforms** (torchvision ``transforms.v2`` on uint8 tensors), in this order: colour
  jitter (brightness, contrast, saturation, hue), horizontal / vertical flip, one random affine
  (rotation up to ``rotation`` degrees, translation up to ``translate`` of the side, scale in
  ``[scale_min, scale_max]``, bilinear, black fill -- dermoscopy images already have dark
  vignetted corners; jitter comes first so the fill stays black).
* **Class balancing.** With ``balance``, class ``c`` gets ``round(copies * n_max / n_c)``
  augmented copies per image (round half up), capped at ``max_copies``; ``n`` counts *train*
  images. Without it every class gets ``copies``.
* **Determinism.** Copy ``k`` of image ``id`` is transformed under a torch seed derived from
  ``sha256(seed, id, k)``, set in a forked RNG state, so bytes depend only on the seed, the image
  and the config -- not on the worker count, the order of work or other images.
* **Parallelism.** ``workers`` processes (``spawn``: torch and fork do not mix well), each
  with one torch thread; each task is one source image with all its copies. Processes, not
  threads, because v2 transforms draw from torch's global RNG. Scripts calling
  :func:`run_augment` need the usual ``if __name__ == "__main__":`` guard (``python -m pipeline``
  is fine); inside a daemonic process (Celery prefork), where children are not allowed, the
  stage runs in-process.
"""

from __future__ import annotations

import hashlib
import logging
import math
import multiprocessing
import re
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.config import AugmentConfig, Config
from pipeline.errors import DataError
from pipeline.fileio import atomic_dir
from pipeline.labels import CLASSES
from pipeline.layout import Layout, data_root
from pipeline.manifest import AUGMENTED_COLUMNS, MANIFEST_COLUMNS, SPLITS, ensure_columns
from pipeline.preprocess import load_rgb, resize_square

log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


# ----------------------------------------------------------------------------------------------
# Pure domain functions
# ----------------------------------------------------------------------------------------------


def copies_per_class(train_counts: dict[str, int], cfg: AugmentConfig) -> dict[str, int]:
    """Augmented copies per train image of each class (not counting the kept original).

    ``copies`` for every class, or with ``balance`` ``round(copies * n_max / n_class)`` (round
    half up), capped at ``max_copies``. Classes with no train image are left out.
    """
    present = {c: n for c, n in train_counts.items() if n > 0}
    if not present:
        return {}
    if not cfg.balance:
        return {c: cfg.copies for c in present}
    n_max = max(present.values())
    return {c: min(cfg.max_copies, int(math.floor(cfg.copies * n_max / n + 0.5))) for c, n in present.items()}


def copy_seed(seed: int, image_id: str, copy: int) -> int:
    """Torch seed of copy ``copy`` of ``image_id``: 63 bits of sha256 over (seed, id, copy)."""
    digest = hashlib.sha256(f"{seed}\x00{image_id}\x00{copy}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def safe_name(image_id: str) -> str:
    """File-system-safe stem for an image id (characters outside ``[A-Za-z0-9._-]`` -> ``_``)."""
    return _UNSAFE.sub("_", image_id)


def plan_outputs(manifest: pd.DataFrame, cfg: AugmentConfig) -> tuple[pd.DataFrame, dict[str, int]]:
    """One row per image to write: the augmented manifest plus ``source_path`` (relative to the
    data root) and ``seed`` (only read for copies >= 1). Also returns the copies per class.

    Raises :class:`DataError` when two outputs would get the same file name.
    """
    train = manifest[manifest["split"] == "train"]
    counts = {c: int((train["label"] == c).sum()) for c in CLASSES}
    per_class = copies_per_class(counts, cfg)
    rows: list[dict[str, Any]] = []
    first_copy = 0 if cfg.keep_original else 1
    for rec in manifest.itertuples(index=False):
        image_id = str(rec.image_id)
        n_copies = per_class.get(rec.label, 0) if rec.split == "train" else 0
        copy_range: Iterable[int] = range(first_copy, n_copies + 1) if rec.split == "train" else (0,)
        for k in copy_range:
            new_id = f"{image_id}__a{k}"
            rows.append(
                {
                    "image_id": new_id,
                    "source_id": image_id,
                    "path": f"{rec.split}/{safe_name(new_id)}.png",
                    "label": str(rec.label),
                    "group_id": str(rec.group_id),
                    "split": str(rec.split),
                    "copy": k,
                    "source_path": str(rec.path),
                }
            )
    plan = pd.DataFrame(rows, columns=[*AUGMENTED_COLUMNS, "source_path"])
    plan["copy"] = plan["copy"].astype(np.int64)
    dup = plan["path"].duplicated(keep=False)
    if dup.any():
        raise DataError(f"image ids map to the same output file: {plan.loc[dup, 'image_id'].head(5).tolist()}")
    return plan, per_class


def build_transform(cfg: AugmentConfig) -> Any:
    """The random v2 transform applied to a uint8 (3, H, W) tensor at training resolution."""
    from torchvision.transforms import InterpolationMode, v2

    ops: list[Any] = []
    # Colour first, geometry second: the affine's black fill stays black (jitter after it would
    # turn the corners grey through contrast / brightness).
    if any(v > 0 for v in (cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)):
        ops.append(
            v2.ColorJitter(
                brightness=cfg.brightness or None,
                contrast=cfg.contrast or None,
                saturation=cfg.saturation or None,
                hue=cfg.hue or None,
            )
        )
    if cfg.hflip > 0:
        ops.append(v2.RandomHorizontalFlip(cfg.hflip))
    if cfg.vflip > 0:
        ops.append(v2.RandomVerticalFlip(cfg.vflip))
    ops.append(
        v2.RandomAffine(
            degrees=cfg.rotation,
            translate=(cfg.translate, cfg.translate) if cfg.translate > 0 else None,
            scale=(cfg.scale_min, cfg.scale_max),
            interpolation=InterpolationMode.BILINEAR,
            fill=0,
        )
    )
    return v2.Compose(ops)


def augment_image(img: Image.Image, transform: Any, seed: int) -> Image.Image:
    """Apply ``transform`` to an RGB image under a fixed torch seed (global RNG state restored)."""
    import torch
    from torchvision.transforms.v2 import functional as F

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = transform(F.pil_to_tensor(img))
    return Image.fromarray(out.permute(1, 2, 0).contiguous().numpy(), mode="RGB")


# ----------------------------------------------------------------------------------------------
# Work unit (runs in worker processes)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Task:
    source: str  # absolute path of the source image
    outputs: tuple[tuple[str, int, int], ...]  # (absolute output path, copy, seed)


_TRANSFORM: Any = None
_CFG: AugmentConfig | None = None


def _init_worker(cfg_json: str) -> None:
    import torch

    global _TRANSFORM, _CFG
    torch.set_num_threads(1)
    _CFG = AugmentConfig.model_validate_json(cfg_json)
    _TRANSFORM = build_transform(_CFG)


def _process(task: _Task) -> str | None:
    """Write every output of one source image; returns an error message instead of raising."""
    assert _CFG is not None
    try:
        base = resize_square(load_rgb(task.source), _CFG.image_size)
    except Exception as exc:  # noqa: BLE001 - any decode failure is bad input
        return f"{task.source}: cannot read image: {exc}"
    try:
        for out, copy, seed in task.outputs:
            img = base if copy == 0 else augment_image(base, _TRANSFORM, seed)
            img.save(out, format="PNG")
    except OSError as exc:
        return f"{task.source}: cannot write augmented image: {exc}"
    return None


def _run_tasks(tasks: list[_Task], cfg: AugmentConfig) -> list[str]:
    cfg_json = cfg.model_dump_json()
    daemon = multiprocessing.current_process().daemon
    if daemon and cfg.workers > 1:
        log.warning("augment: running inside a daemonic process (e.g. a Celery worker); using 1 worker")
    if cfg.workers <= 1 or len(tasks) <= 1 or daemon:
        _init_worker(cfg_json)
        return [e for e in map(_process, tasks) if e]
    chunk = max(1, len(tasks) // (cfg.workers * 8))
    with ProcessPoolExecutor(
        max_workers=cfg.workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(cfg_json,),
    ) as pool:
        return [e for e in pool.map(_process, tasks, chunksize=chunk) if e]


# ----------------------------------------------------------------------------------------------
# Stage
# ----------------------------------------------------------------------------------------------


def _read_validated(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path} not found: run `python -m pipeline validate` first")
    try:
        df = pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{path}: cannot read parquet: {exc}") from None
    ensure_columns(df, MANIFEST_COLUMNS, str(path))
    df = df.assign(
        image_id=df["image_id"].astype(str),
        label=df["label"].astype(str),
        split=df["split"].astype(str),
        group_id=df["group_id"].astype(str),
        path=df["path"].astype(str),
    )
    bad_label = sorted(set(df["label"]) - set(CLASSES))
    if bad_label:
        raise DataError(f"{path}: unknown label(s) {bad_label[:5]}; allowed {list(CLASSES)}")
    bad_split = sorted(set(df["split"]) - set(SPLITS))
    if bad_split:
        raise DataError(f"{path}: unknown split(s) {bad_split[:5]}; allowed {list(SPLITS)}")
    if df["image_id"].duplicated().any():
        dup = df.loc[df["image_id"].duplicated(), "image_id"].head(5).tolist()
        raise DataError(f"{path}: duplicate image_id(s) {dup}")
    if not (df["split"] == "train").any():
        raise DataError(f"{path}: no train images")
    return df.sort_values("image_id", kind="stable").reset_index(drop=True)


def summarize(plan: pd.DataFrame, per_class: dict[str, int], cfg: AugmentConfig) -> dict[str, Any]:
    """Counts per split and per (split, class), copies per class."""
    return {
        "images": {s: int((plan["split"] == s).sum()) for s in SPLITS},
        "per_class": {
            s: {c: int(n) for c, n in plan.loc[plan["split"] == s, "label"].value_counts().sort_index().items()}
            for s in SPLITS
        },
        "copies_per_class": dict(sorted(per_class.items())),
        "keep_original": cfg.keep_original,
        "image_size": cfg.image_size,
    }


def run_augment(cfg: Config) -> dict[str, Any]:
    """Stage ``augment``: validated manifest -> ``data/augmented/`` (images + manifest.parquet)."""
    layout = Layout.from_config(cfg)
    manifest = _read_validated(layout.validated_manifest)
    root = data_root(cfg)
    plan, per_class = plan_outputs(manifest, cfg.augment)
    with atomic_dir(layout.augmented_dir) as tmp:
        for split in SPLITS:
            (tmp / split).mkdir()
        tasks = [
            _Task(
                source=str(root / src),
                outputs=tuple(
                    (str(tmp / p), int(k), copy_seed(cfg.seed, sid, int(k)))
                    for p, k, sid in zip(g["path"], g["copy"], g["source_id"])
                ),
            )
            for src, g in plan.groupby("source_path", sort=False)
        ]
        errors = _run_tasks(tasks, cfg.augment)
        if errors:
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise DataError(errors[0] + more)
        out = plan[list(AUGMENTED_COLUMNS)].reset_index(drop=True)
        out.to_parquet(tmp / layout.augmented_manifest.name, index=False)
    summary = summarize(plan, per_class, cfg.augment)
    log.info("augment: %s images written to %s", summary["images"], layout.augmented_dir)
    return {**summary, "out": str(layout.augmented_dir)}
