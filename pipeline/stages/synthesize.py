"""Stage ``synthesize``: write the project's SYNTHETIC data set (the default data source).

The images come from the pure generator :mod:`pipeline.core.synthetic`; this stage writes them in
the HAM10000 layout into one folder replaced atomically::

    HAM10000_metadata.csv                     lesion_id,image_id,dx,dx_type,age,sex,localization,dataset
    README.txt                                starts with SYNTHETIC DATA; how the set was made
    images/SYN_0000001.jpg ...                the images (JPEG, synthetic.image_size square)
    masks/SYN_0000001_segmentation.png ...    per image its lesion mask: uint8 greyscale PNG, same
                                              size, 255 = lesion, 0 = skin (same seed, same bytes)
 It writes into ``data.root`` (or the
default ``<work_dir>/data/synthetic``) only for ``data.source: synthetic``; with any other source it
writes to the default folder, never into a real data root, and refuses to replace a folder that is
not a synthetic data set.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.config import Config, SyntheticConfig
from pipeline.core.synthetic import (
    METADATA_COLUMNS,
    MASK_SUFFIX,
    MASKS_DIR,
    METADATA_NAME,
    README_MARKER,
    README_NAME,
    encode_jpeg,
    generate_image,
    generate_mask,
    metadata_row,
    plan,
    readme_text,
)
from pipeline.errors import DataError
from pipeline.io.files import atomic_dir
from pipeline.io.images import save_mask_png
from pipeline.io.readers import SOURCES, data_root
from pipeline.layout import Layout

log = logging.getLogger(__name__)


def write_dataset(target: Path, cfg: SyntheticConfig, seed: int) -> pd.DataFrame:
    """Generate the data set into ``target`` (replaced atomically). Returns the metadata table."""
    if target.exists() and any(target.iterdir()):
        readme = target / README_NAME
        if not (readme.is_file() and readme.read_text(encoding="utf-8", errors="replace").startswith(README_MARKER)):
            raise DataError(f"{target}: exists and is not a synthetic data set folder; refusing to replace it")
    items = plan(cfg)
    rows = []
    with atomic_dir(target) as tmp:
        images = tmp / "images"
        images.mkdir()
        masks = tmp / MASKS_DIR
        masks.mkdir()
        for item in items:
            arr, lesion = generate_image(seed, item, cfg.image_size)
            (images / f"{item.image_id}.jpg").write_bytes(encode_jpeg(arr, cfg.jpeg_quality))
            save_mask_png(masks / f"{item.image_id}{MASK_SUFFIX}", generate_mask(seed, item, cfg.image_size))
            rows.append(metadata_row(item, lesion, cfg.sites))
        meta = pd.DataFrame(rows, columns=list(METADATA_COLUMNS))
        meta.to_csv(tmp / METADATA_NAME, index=False)
        (tmp / README_NAME).write_text(readme_text(cfg, seed, len(items)), encoding="utf-8")
    return meta


def output_dir(cfg: Config) -> Path:
    """Where ``synthesize`` writes: the data root for a generated source, else the default folder."""
    spec = SOURCES.get(cfg.data.source)
    if spec is not None and spec.generated:
        return data_root(cfg)
    return Layout.from_config(cfg).synthetic_dir


def run_synthesize(cfg: Config) -> dict[str, Any]:
    target = output_dir(cfg)
    meta = write_dataset(target, cfg.synthetic, cfg.seed)
    per_class = {c: int(n) for c, n in meta["dx"].value_counts().sort_index().items()}
    log.info("synthesize: %d SYNTHETIC images (%d lesions) -> %s", len(meta), meta["lesion_id"].nunique(), target)
    return {
        "folder": str(target),
        "images": len(meta),
        "lesions": int(meta["lesion_id"].nunique()),
        "per_class": per_class,
        "image_size": cfg.synthetic.image_size,
    }
