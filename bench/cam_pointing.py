"""Where the CAM points on the synthetic test split: the pointing game against the lesion masks.

Run after ``select`` on a synthetic work folder (the ``synthesize`` stage writes the masks)::

    .venv/bin/python bench/cam_pointing.py [--set paths.work_dir=DIR] [--set ...] [--split test]

Prints, for the correctly classified images of the split (and for all), the share whose CAM
maximum lies inside the lesion mask (pointing game), the mean share of CAM mass inside the mask,
the centre / border mass shares (:func:`pipeline.core.cam.centre_border_mass`), the CAM feature-map
size, and the same pointing game for maps that ignore the image (constant, top-left corner,
picture centre) on the same masks. Writes ``bench/results/cam_pointing.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.app.params import load_params  # noqa: E402
from pipeline.core.cam import cam_map_size, pointing_game  # noqa: E402
from pipeline.core.schema import AUGMENTED_COLUMNS  # noqa: E402
from pipeline.io.explain import localisation_records, mask_paths  # noqa: E402
from pipeline.io.images import load_mask  # noqa: E402
from pipeline.io.manifests import read_parquet, split_rows  # noqa: E402
from pipeline.io.modelstore import load_exported  # noqa: E402
from pipeline.io.scoring import load_images  # noqa: E402
from pipeline.layout import Layout  # noqa: E402


def baselines(masks: list[np.ndarray]) -> dict[str, float]:
    """Pointing game of image-blind maps on the same masks."""
    out = {}
    for name in ("constant", "corner", "centre"):
        cams = []
        for m in masks:
            h, w = m.shape
            c = np.ones((h, w), np.float32)
            if name == "corner":
                c[: max(1, h // 8), : max(1, w // 8)] = 2.0
            elif name == "centre":
                yy, xx = np.mgrid[0:h, 0:w]
                c = np.exp(-(((yy - (h - 1) / 2) / h) ** 2 + ((xx - (w - 1) / 2) / w) ** 2) * 8).astype(np.float32)
            cams.append(c)
        out[name] = pointing_game(cams, masks)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--split", default="test", choices=("val", "test"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cam_pointing.json"))
    args = ap.parse_args()
    cfg = load_params(args.params, args.set)
    layout = Layout.from_config(cfg)
    exported = load_exported(layout.export_dir)
    aug = read_parquet(layout.augmented_manifest, "augment", AUGMENTED_COLUMNS)
    rows = split_rows(aug, args.split, str(layout.augmented_manifest))
    images = load_images(rows, layout.augmented_dir, exported.image_size, cfg, name=f"cam_{args.split}")
    rec = localisation_records(exported, images, rows, cfg)
    if rec.empty:
        raise SystemExit("no lesion masks found (a synthetic data set written by this version's synthesize stage?)")
    ok = rec[rec["correct"]]
    masks = [load_mask(p) for p in mask_paths(rows["source_id"].astype(str).tolist(), cfg) if p is not None]
    ok_masks = [m for m, c in zip(masks, rec["correct"], strict=True) if c]
    result = {
        "work_dir": str(layout.work_dir),
        "split": args.split,
        "image_size": exported.image_size,
        "cam_map_size": list(cam_map_size(exported.model, exported.image_size)),
        "images": len(rec),
        "correct": len(ok),
        "pointing_game_correct": float(ok["hit"].mean()) if len(ok) else None,
        "pointing_game_all": float(rec["hit"].mean()),
        "mass_inside_correct": float(ok["mass_inside"].mean()) if len(ok) else None,
        "mask_share_mean": float(rec["mask_share"].mean()),
        "centre_mass_mean": float(rec["centre"].mean()),
        "border_mass_mean": float(rec["border"].mean()),
        "pointing_game_per_class_correct": {k: float(v) for k, v in ok.groupby("label")["hit"].mean().items()},
        "baselines_correct": baselines(ok_masks) if ok_masks else {},
    }
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
