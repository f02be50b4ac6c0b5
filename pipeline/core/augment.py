"""Offline augmentation, the pure part: plan of the outputs, class balancing, seeded transforms.

The ``augment`` stage (:mod:`pipeline.stages.augment`) reads the validated manifest and writes
``data/augmented/`` (one folder, replaced atomically):

* ``train/<id>__a<k>.png`` -- for each train image the resized original as copy 0 (when
  ``augment.keep_original``) and augmented copies ``1..K``;
* ``val/<id>__a0.png``, ``test/<id>__a0.png`` -- only resized (evaluation sees unaltered images;
  colour constancy is applied at scoring time, see below);
* ``manifest.parquet`` with :data:`pipeline.core.schema.AUGMENTED_COLUMNS` and ``meta.json``
  (``image_size`` of the written images: the train stage reads its resolution from there).

Design choices:

* **Same preprocessing as inference.** Every image goes through
  :func:`pipeline.io.images.load_rgb` + :func:`~pipeline.core.imaging.resize_square` first; the
  random transforms then run at the training resolution (cheaper than augmenting full-size
  600x450 images, and the stored copy is exactly what the network sees).
* **Transforms** (torchvision ``transforms.v2`` on uint8 tensors), in this order: colour
  jitter (brightness, contrast, saturation, hue), horizontal / vertical flip, one random affine
  (rotation up to ``rotation`` degrees, translation up to ``translate`` of the side, scale in
  ``[scale_min, scale_max]``, bilinear, black fill -- dermoscopy images already have dark
  vignetted corners; jitter comes first so the fill stays black).
* **Colour constancy** (``color_constancy: shades_of_gray``, :func:`pipeline.core.imaging.shades_of_gray`):
  each train image is corrected after resizing and *before* its random transforms (copy 0 is
  the corrected original). Val and test images are stored **uncorrected** (only resized): the
  export records the method and :mod:`pipeline.core.inference` applies it when scoring, so any
  model -- a champion trained without it included -- is scored on the same files as it would see
  them in deployment; the train stage corrects the val images it computes the validation loss on.
* **Class balancing.** With ``balance``, class ``c`` gets ``round(copies * n_max / n_c)``
  augmented copies per image (round half up), capped at ``max_copies``; ``n`` counts *train*
  images. Without it every class gets ``copies``.
* **Site balancing** (``balance_sites``, with ``balance``; off by default). A class whose train
  images come mostly from one acquisition site (HAM10000: 83 % of the ``nv`` come from
  ``vidir_molemax``, which holds almost nothing else) teaches the network that site's look as the
  class -- the shortcut that reads a new clinic's ``nv`` as ``mel``. With it, the images the class
  balancing gives a class are shared **equally among the sites** that have train images of it,
  as far as ``max_copies`` allows (water-filling): a big site's pictures
  may get no copy, a small site's up to ``max_copies``, and what a capped site cannot take goes to
  the others, so the class keeps its number of images; every picture stays in. With one site this
  is exactly the class balancing above. Sites are the manifest's ``source_site``
  (:func:`copies_per_site`).
* **Determinism.** Copy ``k`` of image ``id`` is transformed under a torch seed derived from
  ``sha256(seed, id, k)``, set in a forked RNG state, so bytes depend only on the seed, the image
  and the config -- not on the worker count, the order of work or other images.
* **Parallelism.** ``workers`` processes (``spawn``: torch and fork do not mix well), each
  with one torch thread; each task is one source image with all its copies. Processes, not
  threads, because v2 transforms draw from torch's global RNG. Scripts calling
  :func:`pipeline.stages.augment.run_augment` need the usual ``if __name__ == "__main__":`` guard (``python -m pipeline``
  is fine); inside a daemonic process (Celery prefork), where children are not allowed, the
  stage runs in-process.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.config import AugmentConfig
from pipeline.core.imaging import shades_of_gray
from pipeline.core.schema import AUGMENTED_COLUMNS, SPLITS
from pipeline.errors import DataError
from pipeline.labels import CLASSES

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


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


def copies_per_site(train_counts: dict[tuple[str, str], int], cfg: AugmentConfig) -> dict[tuple[str, str], int]:
    """Augmented copies per train picture of each (site, class) cell under ``balance_sites`` (see
    the module docstring).

    Class ``c`` keeps the number of images the class balancing gives it, ``B_c = (o + k_c) * n_c``
    (``k_c`` of :func:`copies_per_class`, ``o`` = 1 with ``keep_original``, ``n_c`` its train
    pictures), shared among its sites by water-filling: a picture of site ``s`` gets
    ``clip(share / n_sc, 1, o + max_copies)`` images, with the one ``share`` per site for which
    the class total is ``B_c`` (found by bisection; a site too small to take its share is capped
    and the rest goes to the others, a site too big keeps one image per picture), rounded half up;
    copies = images - ``o``. Every picture stays in. Cells with no train image are left out; with
    one site the result is :func:`copies_per_class`'s."""
    present = {cell: n for cell, n in train_counts.items() if n > 0}
    if not present:
        return {}
    by_class: dict[str, dict[str, int]] = {}
    for (site, c), n in present.items():
        by_class.setdefault(c, {})[site] = n
    per_class = copies_per_class({c: sum(cells.values()) for c, cells in by_class.items()}, cfg)
    o = 1 if cfg.keep_original else 0
    lo, hi = 1.0, float(o + cfg.max_copies)
    out: dict[tuple[str, str], int] = {}
    for c, cells in by_class.items():
        budget = float((o + per_class[c]) * sum(cells.values()))

        def total(share: float, cells: dict[str, int] = cells) -> float:
            return sum(n * min(hi, max(lo, share / n)) for n in cells.values())

        a, b = 0.0, budget
        for _ in range(100):  # total() is non-decreasing in share: bisection
            mid = (a + b) / 2
            a, b = (mid, b) if total(mid) < budget else (a, mid)
        for site, n in cells.items():
            images = min(hi, max(lo, b / n))
            out[(site, c)] = int(math.floor(round(images, 6) + 0.5)) - o
    return out


def copy_seed(seed: int, image_id: str, copy: int) -> int:
    """Torch seed of copy ``copy`` of ``image_id``: 63 bits of sha256 over (seed, id, copy)."""
    digest = hashlib.sha256(f"{seed}\x00{image_id}\x00{copy}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def safe_name(image_id: str) -> str:
    """File-system-safe stem for an image id (characters outside ``[A-Za-z0-9._-]`` -> ``_``)."""
    return _UNSAFE.sub("_", image_id)


def plan_outputs(manifest: pd.DataFrame, cfg: AugmentConfig) -> tuple[pd.DataFrame, dict[str, int]]:
    """One row per image to write: the augmented manifest plus ``source_path`` (relative to the
    data root) and ``source_site`` ("" when the manifest has none). Also returns the copies per
    class of the class balancing (with ``balance_sites`` the copies follow each (site, class) cell,
    :func:`copies_per_site`).

    Raises :class:`DataError` when two outputs would get the same file name.
    """
    train = manifest[manifest["split"] == "train"]
    counts = {c: int((train["label"] == c).sum()) for c in CLASSES}
    per_class = copies_per_class(counts, cfg)
    by_site = cfg.balance and cfg.balance_sites
    if by_site:
        if "source_site" not in manifest.columns:
            raise DataError("augment.balance_sites needs the manifest's source_site column")
        cells = train.groupby(["source_site", "label"]).size()
        per_cell = copies_per_site({(str(s), str(c)): int(n) for (s, c), n in cells.items()}, cfg)
    rows: list[dict[str, Any]] = []
    first_copy = 0 if cfg.keep_original else 1
    for rec in manifest.itertuples(index=False):
        image_id = str(rec.image_id)
        if rec.split != "train":
            n_copies = 0
        elif by_site:
            n_copies = per_cell[(str(rec.source_site), str(rec.label))]
        else:
            n_copies = per_class.get(rec.label, 0)
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
                    "source_site": str(getattr(rec, "source_site", "")),
                }
            )
    plan = pd.DataFrame(rows, columns=[*AUGMENTED_COLUMNS, "source_path", "source_site"])
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


def color_corrected(img: Image.Image, cfg: AugmentConfig) -> Image.Image:
    """``img`` (RGB, already resized) under ``augment.color_constancy`` (``none``: unchanged)."""
    if cfg.color_constancy == "none":
        return img
    return Image.fromarray(shades_of_gray(np.asarray(img, dtype=np.uint8), cfg.sog_power), mode="RGB")


def augment_image(img: Image.Image, transform: Any, seed: int) -> Image.Image:
    """Apply ``transform`` to an RGB image under a fixed torch seed (global RNG state restored)."""
    import torch
    from torchvision.transforms.v2 import functional as F

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = transform(F.pil_to_tensor(img))
    return Image.fromarray(out.permute(1, 2, 0).contiguous().numpy(), mode="RGB")


def summarize(plan: pd.DataFrame, per_class: dict[str, int], cfg: AugmentConfig) -> dict[str, Any]:
    """Counts per split and per (split, class), copies per class; with ``balance_sites`` the
    copies per site and class instead (``copies_per_site``: site -> class -> copies) and the train
    images per site and class (``train_per_site``)."""
    out: dict[str, Any] = {
        "images": {s: int((plan["split"] == s).sum()) for s in SPLITS},
        "per_class": {
            s: {c: int(n) for c, n in plan.loc[plan["split"] == s, "label"].value_counts().sort_index().items()}
            for s in SPLITS
        },
        "copies_per_class": dict(sorted(per_class.items())),
        "keep_original": cfg.keep_original,
        "image_size": cfg.image_size,
    }
    if cfg.balance and cfg.balance_sites:
        train = plan[plan["split"] == "train"]
        del out["copies_per_class"]
        out["copies_per_site"] = {
            str(site): {str(c): int(k) for c, k in g.groupby("label")["copy"].max().sort_index().items()}
            for site, g in train.groupby("source_site")
        }
        out["train_per_site"] = {
            str(site): {str(c): int(n) for c, n in g["label"].value_counts().sort_index().items()}
            for site, g in train.groupby("source_site")
        }
    return out
