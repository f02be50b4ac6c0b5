"""Offline augmentation: train-only copies, balancing, sizes, determinism, errors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.config import AugmentConfig, load_config
from pipeline.core.augment import copies_per_class, copies_per_site, copy_seed, plan_outputs
from pipeline.core.schema import AUGMENTED_COLUMNS
from pipeline.errors import DataError
from pipeline.io.images import load_resized
from pipeline.layout import Layout
from pipeline.stages.augment import run_augment

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"

# label, split per source image: train nv x4, mel x2, df x1; val nv; test mel, bcc
SOURCES = [("nv", "train")] * 4 + [("mel", "train")] * 2 + [("df", "train"), ("nv", "val"), ("mel", "test"),
                                                                ("bcc", "test")]


def _image(i: int) -> Image.Image:
    """A structured (not symmetric) 50x40 image, so flips and rotations change pixels."""
    y, x = np.mgrid[0:40, 0:50]
    arr = np.stack([(x * 5 + i * 20) % 256, (y * 6) % 256, ((x + 2 * y) * 3 + i) % 256], axis=-1)
    arr[5:15, 5:25] = (200, 30, 30)
    return Image.fromarray(arr.astype(np.uint8))


def _setup(tmp_path: Path, sites: list[str] | None = None, **over) -> object:
    root = tmp_path / "raw"
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (label, split) in enumerate(SOURCES):
        path = f"{label}/img{i}.png"
        (root / label).mkdir(exist_ok=True)
        _image(i).save(root / path)
        rows.append({"image_id": f"ISIC_{i:03d}", "path": path, "label": label, "group_id": f"L{i}", "split": split,
                     "width": 50, "height": 40, "sha256": "0" * 64, "mode": "RGB",
                     **({"source_site": sites[i]} if sites else {})})
    base = {
        "paths.work_dir": str(tmp_path / "work"),
        "data.root": str(root),
        "augment.image_size": 24,
        "augment.copies": 2,
        "augment.max_copies": 5,
        "augment.workers": 1,
    }
    base.update(over)
    cfg = load_config(PARAMS, base)
    layout = Layout.from_config(cfg)
    layout.validated_manifest.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(layout.validated_manifest, index=False)
    return cfg


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --- pure functions -------------------------------------------------------------------------------


def test_copies_per_class_balancing_and_cap():
    cfg = AugmentConfig(copies=2, max_copies=5, balance=True)
    # nv n_max=4 -> 2; mel 2*4/2 = 4; df 2*4/1 = 8 -> capped at 5; bcc 2*4/3 = 2.67 -> 3
    assert copies_per_class({"nv": 4, "mel": 2, "df": 1, "bcc": 3, "vasc": 0}, cfg) == {
        "nv": 2, "mel": 4, "df": 5, "bcc": 3
    }
    # round half up: 1 * 3 / 2 = 1.5 -> 2
    assert copies_per_class({"nv": 3, "mel": 2}, AugmentConfig(copies=1, max_copies=4))["mel"] == 2
    assert copies_per_class({"nv": 4, "df": 1}, AugmentConfig(copies=2, balance=False)) == {"nv": 2, "df": 2}
    assert copies_per_class({}, cfg) == {}


def test_copies_per_site_shares_each_class_among_its_sites():
    cfg = AugmentConfig(copies=2, max_copies=9, balance=True, balance_sites=True)
    # one site: exactly the class balancing
    one = {"nv": 4, "mel": 2, "df": 1, "bcc": 3}
    assert copies_per_site({("a", c): n for c, n in one.items()}, cfg) == {
        ("a", c): k for c, k in copies_per_class(one, cfg).items()}
    # n_max = 8 (nv: 6 at a, 2 at b): class balancing gives nv 2 copies (3 images per picture,
    # 24 in all), mel (4 at b) 4, df (1 at a, 1 at b) 8, vasc (1 at c) 16 -> 9.
    # By site: nv at a 3 * 8 / (2 * 6) = 2 images -> 1 copy, at b 3 * 8 / (2 * 2) = 6 -> 5 copies
    # (12 nv images at each site); one-site classes keep their copies; df evenly split already
    cells = {("a", "nv"): 6, ("b", "nv"): 2, ("b", "mel"): 4, ("a", "df"): 1, ("b", "df"): 1, ("c", "vasc"): 1,
             ("c", "bcc"): 0}
    assert copies_per_site(cells, cfg) == {("a", "nv"): 1, ("b", "nv"): 5, ("b", "mel"): 4, ("a", "df"): 8,
                                           ("b", "df"): 8, ("c", "vasc"): 9}
    # what a capped site cannot take goes to the others (water-filling), so the class keeps its
    # images: nv 12 pictures x 3 images = 36; b and c take 4 each (1 + max_copies), a 28 / 10 -> 3
    wf = {("a", "nv"): 10, ("b", "nv"): 1, ("c", "nv"): 1}
    assert copies_per_site(wf, AugmentConfig(copies=2, max_copies=3, balance_sites=True)) == {
        ("a", "nv"): 2, ("b", "nv"): 3, ("c", "nv"): 3}
    # a big site keeps one image per picture: 184 images, b capped at 2 x 21, a 142 / 90 -> 2
    big = {("a", "nv"): 90, ("b", "nv"): 2}
    assert copies_per_site(big, AugmentConfig(copies=1, max_copies=20, balance_sites=True)) == {
        ("a", "nv"): 1, ("b", "nv"): 20}
    # the largest site's pictures may get no copy: 200 images, 66.7 per site -> 1.1 / 3.3 / 3.3
    three = {("a", "nv"): 60, ("b", "nv"): 20, ("c", "nv"): 20}
    assert copies_per_site(three, AugmentConfig(copies=1, max_copies=20, balance_sites=True)) == {
        ("a", "nv"): 0, ("b", "nv"): 2, ("c", "nv"): 2}
    # without originals the copies are the images (at least 1 each): 92 images, a needs 90 of them
    assert copies_per_site(big, AugmentConfig(copies=1, max_copies=20, balance_sites=True, keep_original=False)) == {
        ("a", "nv"): 1, ("b", "nv"): 1}
    assert copies_per_site({}, cfg) == {}
    with pytest.raises(ValueError, match="needs balance: true"):
        AugmentConfig(balance=False, balance_sites=True)


def test_site_balanced_plan_evens_out_a_class_across_sites():
    # nv: 6 train pictures at site a, 2 at b; mel 2 at b; a val picture (never copied)
    sites = ["a"] * 6 + ["b"] * 2 + ["b"] * 2 + ["a"]
    labels = ["nv"] * 8 + ["mel"] * 2 + ["nv"]
    splits = ["train"] * 10 + ["val"]
    df = pd.DataFrame({"image_id": [f"i{k}" for k in range(11)], "path": [f"{k}.png" for k in range(11)],
                       "label": labels, "group_id": [f"g{k}" for k in range(11)], "split": splits,
                       "source_site": sites})
    nv_per_site = {}
    for on in (False, True):
        plan, _ = plan_outputs(df, AugmentConfig(copies=1, max_copies=8, balance_sites=on))
        train = plan[plan["split"] == "train"]
        nv_per_site[on] = train[train["label"] == "nv"].groupby("source_site").size().to_dict()
        assert (train["label"] == "mel").sum() == 2 * 5  # one site: class balancing, 8 / 2 = 4 copies
        assert len(plan[plan["split"] == "val"]) == 1 and (plan.loc[plan["split"] == "val", "copy"] == 0).all()
    assert nv_per_site[False] == {"a": 12, "b": 4}  # 1 copy each: site a holds 3/4 of the class
    assert nv_per_site[True] == {"a": 6, "b": 8}  # 2 * 8 / (2 * 6) = 1.33 -> 1 image; 2 * 8 / 4 = 4 images
    with pytest.raises(DataError, match="source_site"):
        plan_outputs(df.drop(columns="source_site"), AugmentConfig(balance_sites=True))


def test_copy_seed_depends_on_all_inputs():
    s = copy_seed(42, "ISIC_1", 1)
    assert s == copy_seed(42, "ISIC_1", 1) and 0 <= s < 2**63
    assert len({s, copy_seed(43, "ISIC_1", 1), copy_seed(42, "ISIC_2", 1), copy_seed(42, "ISIC_1", 2)}) == 4


def test_plan_rejects_colliding_file_names():
    df = pd.DataFrame({"image_id": ["a/b", "a_b"], "path": ["x.png", "y.png"], "label": ["nv", "nv"],
                       "group_id": ["1", "2"], "split": ["val", "val"]})
    with pytest.raises(DataError, match="same output file"):
        plan_outputs(df, AugmentConfig())


# --- the stage ------------------------------------------------------------------------------------


def test_augment_counts_sizes_and_manifest(tmp_path):
    cfg = _setup(tmp_path)
    summary = run_augment(cfg)
    layout = Layout.from_config(cfg)
    m = pd.read_parquet(layout.augmented_manifest)
    assert list(m.columns) == list(AUGMENTED_COLUMNS)
    assert m["image_id"].is_unique
    # copies: nv 2, mel 2*4/2 = 4, df 2*4/1 = 8 capped at 5; plus copy 0 for each train image
    assert summary["copies_per_class"] == {"nv": 2, "mel": 4, "df": 5}
    train = m[m["split"] == "train"]
    assert train.groupby("label").size().to_dict() == {"nv": 4 * 3, "mel": 2 * 5, "df": 1 * 6}
    assert sorted(train.loc[train["source_id"] == "ISIC_006", "copy"]) == [0, 1, 2, 3, 4, 5]
    # val / test: exactly one resized image per source, copy 0
    for split, n in (("val", 1), ("test", 2)):
        part = m[m["split"] == split]
        assert len(part) == n and (part["copy"] == 0).all() and part["source_id"].is_unique
    assert summary["images"] == {"train": 28, "val": 1, "test": 2}
    assert summary["per_class"]["test"] == {"bcc": 1, "mel": 1}
    # files: all present, the right size and mode, nothing else
    for rel in m["path"]:
        with Image.open(layout.augmented_dir / rel) as im:
            assert im.size == (24, 24) and im.mode == "RGB"
    pngs = {str(p.relative_to(layout.augmented_dir)) for p in layout.augmented_dir.rglob("*.png")}
    assert pngs == set(m["path"])
    # copy 0 is exactly the inference preprocessing of the source; augmented copies differ from it
    src = tmp_path / "raw" / "nv" / "img0.png"
    orig = np.asarray(Image.open(layout.augmented_dir / "train/ISIC_000__a0.png"))
    assert np.array_equal(orig, load_resized(src, 24))
    aug = np.asarray(Image.open(layout.augmented_dir / "train/ISIC_000__a1.png"))
    assert not np.array_equal(orig, aug)
    val = np.asarray(Image.open(layout.augmented_dir / "val/ISIC_007__a0.png"))
    assert np.array_equal(val, load_resized(tmp_path / "raw" / "nv" / "img7.png", 24))


def test_augment_without_original_and_balance(tmp_path):
    cfg = _setup(tmp_path, **{"augment.keep_original": False, "augment.balance": False})
    run_augment(cfg)
    m = pd.read_parquet(Layout.from_config(cfg).augmented_manifest)
    train = m[m["split"] == "train"]
    assert sorted(train["copy"].unique()) == [1, 2]
    assert len(train) == 7 * 2
    assert (m.loc[m["split"] != "train", "copy"] == 0).all()


def test_augment_stage_balances_sites(tmp_path):
    """Train nv: 3 pictures at site x, 1 at y. By class alone each gets 2 copies (x holds 9 of 12
    nv images); by site the class's 12 images are shared: x 12 / (2 * 3) = 2 images per picture,
    y 12 / 2 = 6."""
    sites = ["x", "x", "x", "y"] + ["x"] * 3 + ["x", "x", "x"]
    cfg = _setup(tmp_path, sites=sites, **{"augment.balance_sites": True, "augment.max_copies": 6})
    summary = run_augment(cfg)
    m = pd.read_parquet(Layout.from_config(cfg).augmented_manifest)
    nv = m[(m["split"] == "train") & (m["label"] == "nv")]
    assert nv.groupby("source_id").size().to_dict() == {"ISIC_000": 2, "ISIC_001": 2, "ISIC_002": 2, "ISIC_003": 6}
    assert summary["copies_per_site"] == {"x": {"df": 6, "mel": 4, "nv": 1}, "y": {"nv": 5}}
    assert summary["train_per_site"] == {"x": {"df": 7, "mel": 10, "nv": 6}, "y": {"nv": 6}}
    assert "copies_per_class" not in summary  # not what was applied
    pngs = {str(p.relative_to(Layout.from_config(cfg).augmented_dir)) for p in Layout.from_config(cfg).augmented_dir.rglob("*.png")}
    assert pngs == set(m["path"])


def test_augment_deterministic_across_workers_and_seed_matters(tmp_path):
    a = _setup(tmp_path / "a", **{"augment.workers": 1})
    b = _setup(tmp_path / "b", **{"augment.workers": 2})
    c = _setup(tmp_path / "c", **{"augment.workers": 1, "seed": 7})
    for cfg in (a, b, c):
        run_augment(cfg)
    da, db, dc = (_digests(Layout.from_config(cfg).augmented_dir) for cfg in (a, b, c))
    assert da == db  # same seed: identical bytes, whatever the worker count
    changed = [k for k in da if k.startswith("train/") and "__a0" not in k and da[k] != dc[k]]
    assert len(changed) == sum(1 for k in da if k.startswith("train/") and "__a0" not in k)
    assert all(da[k] == dc[k] for k in da if "__a0" in k)  # resized originals do not depend on the seed


def test_augment_leaves_global_torch_rng_alone(tmp_path):
    import torch

    cfg = _setup(tmp_path)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    run_augment(cfg)
    assert torch.equal(torch.rand(3), expected)


def test_augment_rerun_replaces_folder(tmp_path):
    cfg = _setup(tmp_path)
    run_augment(cfg)
    layout = Layout.from_config(cfg)
    (layout.augmented_dir / "train" / "stale.png").write_bytes(b"x")
    run_augment(cfg)
    assert not (layout.augmented_dir / "train" / "stale.png").exists()


def test_missing_validated_manifest(tmp_path):
    cfg = load_config(PARAMS, {"paths.work_dir": str(tmp_path / "work"), "data.root": str(tmp_path)})
    with pytest.raises(DataError, match=r"validated\.parquet not found: run `python -m pipeline validate` first"):
        run_augment(cfg)


def test_unreadable_image_names_file_and_writes_nothing(tmp_path):
    cfg = _setup(tmp_path)
    (tmp_path / "raw" / "mel" / "img4.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"img4\.png: cannot read image"):
        run_augment(cfg)
    assert not Layout.from_config(cfg).augmented_dir.exists()


def test_bad_manifest_label(tmp_path):
    cfg = _setup(tmp_path)
    layout = Layout.from_config(cfg)
    df = pd.read_parquet(layout.validated_manifest)
    df.loc[0, "label"] = "melanoma"
    df.to_parquet(layout.validated_manifest, index=False)
    with pytest.raises(DataError, match=r"validated\.parquet: unknown label\(s\) \['melanoma'\]"):
        run_augment(cfg)
