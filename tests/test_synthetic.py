"""The synthetic data set (pipeline.core.synthetic, pipeline.stages.synthesize): layout, marking, determinism, class structure."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.config import SyntheticConfig
from pipeline.core.synthetic import METADATA_COLUMNS, README_MARKER, encode_jpeg, generate_image, plan, sample_lesion
from pipeline.errors import DataError
from pipeline.labels import CLASSES
from pipeline.stages.synthesize import run_synthesize, write_dataset

SMALL = SyntheticConfig(images_per_class=3, class_counts={"nv": 5, "df": 0}, image_size=48, images_per_lesion=2)


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((folder / "images").iterdir())}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    target = tmp_path_factory.mktemp("syn") / "synthetic"
    return target, write_dataset(target, SMALL, seed=42)


def test_layout_counts_and_metadata(small_set):
    target, meta = small_set
    on_disk = pd.read_csv(target / "HAM10000_metadata.csv", dtype=str)
    assert tuple(on_disk.columns) == METADATA_COLUMNS
    expected = {c: 3 for c in CLASSES} | {"nv": 5, "df": 0}
    assert on_disk["dx"].value_counts().to_dict() == {c: n for c, n in expected.items() if n}
    assert len(on_disk) == sum(expected.values()) == len(meta)
    assert (on_disk["dataset"] == "synthetic").all() and (on_disk["dx_type"] == "synthetic").all()
    assert on_disk["image_id"].str.fullmatch(r"SYN_\d{7}").all() and on_disk["image_id"].is_unique
    assert on_disk["lesion_id"].str.fullmatch(r"SYNL_\d{7}").all()
    files = sorted(p.name for p in (target / "images").iterdir())
    assert files == sorted(f"{i}.jpg" for i in on_disk["image_id"])
    with Image.open(target / "images" / files[0]) as img:
        assert img.format == "JPEG" and img.mode == "RGB" and img.size == (48, 48)


def test_views_share_a_lesion_but_differ(small_set):
    target, meta = small_set
    per_lesion = meta.groupby("lesion_id")
    # 3 images with 2 views per lesion -> lesions of 2 + 1 images; nv 5 -> 2 + 2 + 1
    assert sorted(per_lesion.size().tolist()) == sorted([2, 1] * 5 + [2, 2, 1])
    assert (per_lesion["dx"].nunique() == 1).all() and (per_lesion["age"].nunique() == 1).all()
    a = meta.groupby("lesion_id")["image_id"].first().iloc[0]
    b = meta[(meta["lesion_id"] == meta.loc[meta["image_id"] == a, "lesion_id"].item()) & (meta["image_id"] != a)]
    img_a = np.asarray(Image.open(target / "images" / f"{a}.jpg"), dtype=np.int16)
    img_b = np.asarray(Image.open(target / "images" / f"{b['image_id'].item()}.jpg"), dtype=np.int16)
    assert np.abs(img_a - img_b).mean() > 2  # another view, not a copy


def test_readme_marks_the_data_as_synthetic(small_set):
    target, _ = small_set
    text = (target / "README.txt").read_text(encoding="utf-8")
    assert text.startswith(README_MARKER)
    assert "NOT REAL PATIENTS" in text and "seed=42" in text


def test_same_seed_same_bytes_other_seed_other_bytes(small_set, tmp_path):
    target, _ = small_set
    write_dataset(tmp_path / "again", SMALL, seed=42)
    write_dataset(tmp_path / "other", SMALL, seed=43)
    assert _hashes(tmp_path / "again") == _hashes(target)
    other = _hashes(tmp_path / "other")
    assert other.keys() == _hashes(target).keys()
    assert all(other[k] != v for k, v in _hashes(target).items())


def test_image_does_not_depend_on_generation_order_or_other_counts(small_set):
    target, _ = small_set
    # a data set with only vasc images, generated alone, gives vasc lesion 0 view 1 the same bytes
    only_vasc = {c: 0 for c in CLASSES} | {"vasc": 2}
    alone = plan(SyntheticConfig(class_counts=only_vasc, image_size=48, images_per_lesion=2))
    in_full = next(it for it in plan(SMALL) if it.cls == "vasc" and it.lesion == 0 and it.view == 1)
    arr, _ = generate_image(42, alone[1], 48)
    assert alone[1].image_id != in_full.image_id
    assert encode_jpeg(arr, SMALL.jpeg_quality) == (target / "images" / f"{in_full.image_id}.jpg").read_bytes()


def test_refuses_to_replace_a_foreign_folder(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "precious.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match="not a synthetic data set"):
        write_dataset(real, SMALL, seed=1)
    assert (real / "precious.jpg").exists()


def test_run_synthesize_writes_to_data_root_and_never_into_a_real_root(tiny_config, tmp_path):
    summary = run_synthesize(tiny_config)
    folder = Path(tiny_config.paths.work_dir) / "data" / "synthetic"
    assert summary["folder"] == str(folder) and summary["images"] == 7 * 8
    assert summary["per_class"] == {c: 8 for c in CLASSES}
    assert (folder / "HAM10000_metadata.csv").is_file()
    # regenerating replaces the previous set in place (it is ours)
    assert run_synthesize(tiny_config)["images"] == 56

    real = tmp_path / "real_root"
    real.mkdir()
    cfg = tiny_config.with_overrides({"data.source": "ham10000", "data.root": str(real)})
    assert run_synthesize(cfg)["folder"] == str(folder)
    assert list(real.iterdir()) == []


def _centre_stats(cfg: SyntheticConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    size = cfg.image_size
    c = (np.arange(size) + 0.5) / size * 2 - 1
    yy, xx = np.meshgrid(c, c, indexing="ij")
    centre = np.hypot(xx, yy) < 0.25
    feats, labels = [], []
    for item in plan(cfg):
        arr, _ = generate_image(seed, item, size)
        feats.append(arr[centre].astype(np.float64).mean(axis=0) / 255)
        labels.append(item.cls)
    return np.array(feats), np.array(labels)


def test_classes_differ_statistically_but_not_trivially():
    feats, labels = _centre_stats(SyntheticConfig(images_per_class=14, image_size=48), seed=42)
    mean = {c: feats[labels == c].mean(axis=0) for c in CLASSES}
    brightness = {c: m.mean() for c, m in mean.items()}
    redness = {c: m[0] - m[1] for c, m in mean.items()}
    # pigmented (nv, mel) centres are darker than df's white scar patch and bcc's pink
    assert max(brightness["nv"], brightness["mel"]) + 0.1 < min(brightness["df"], brightness["bcc"])
    # vascular / inflammatory classes are redder than melanocytic ones
    assert min(redness["vasc"], redness["akiec"], redness["bcc"]) > max(redness["nv"], redness["mel"]) + 0.05

    # mean centre colour alone: a nearest-centroid classifier is far above chance (1/7) but not perfect
    rng = np.random.default_rng(0)
    order = rng.permutation(len(labels))
    test, train = order[: len(order) // 3], order[len(order) // 3 :]
    centroids = np.stack([feats[train][labels[train] == c].mean(axis=0) for c in CLASSES])
    pred = np.array(CLASSES)[np.argmin(((feats[test][:, None] - centroids[None]) ** 2).sum(-1), axis=1)]
    accuracy = (pred == labels[test]).mean()
    assert 0.35 < accuracy < 0.95, accuracy


def test_size_ranges_overlap_between_classes():
    radii = {c: [sample_lesion(7, c, i).radius for i in range(40)] for c in ("df", "nv", "mel")}
    assert np.mean(radii["df"]) < np.mean(radii["nv"]) < np.mean(radii["mel"])
    assert max(radii["df"]) > min(radii["nv"]) and max(radii["nv"]) > min(radii["mel"])


def test_generation_is_fast_enough():
    import time

    cfg = SyntheticConfig(images_per_class=6, image_size=128)
    start = time.perf_counter()
    for item in plan(cfg):
        encode_jpeg(generate_image(0, item, 128)[0], 92)
    per_image = (time.perf_counter() - start) / 42
    assert per_image < 0.1, f"{per_image * 1000:.0f} ms per 128px image"


def test_lesion_masks_written_beside_the_images(small_set, tmp_path):
    from pipeline.core.synthetic import MASK_SUFFIX, MASKS_DIR, generate_mask
    from pipeline.io.readers import read_ham10000

    target, meta = small_set
    masks = sorted(p.name for p in (target / MASKS_DIR).iterdir())
    assert masks == sorted(f"{i}{MASK_SUFFIX}" for i in meta["image_id"])
    assert "masks/<image_id>_segmentation.png" in (target / "README.txt").read_text(encoding="utf-8")
    items = {it.image_id: it for it in plan(SMALL)}
    for image_id in meta["image_id"]:
        with Image.open(target / MASKS_DIR / f"{image_id}{MASK_SUFFIX}") as im:
            assert im.mode == "L" and im.size == (48, 48)
            mask = np.asarray(im)
        assert set(np.unique(mask)) <= {0, 255} and 0 < (mask == 255).mean() < 0.9
        np.testing.assert_array_equal(mask, generate_mask(42, items[image_id], 48))
        # the mask is where the lesion is: its colour differs from the skin around it
        img = np.asarray(Image.open(target / "images" / f"{image_id}.jpg"), dtype=np.float64)
        inside, outside = img[mask == 255].mean(axis=0), img[mask == 0].mean(axis=0)
        assert np.abs(inside - outside).max() > 4, image_id
    # deterministic by seed, like the images
    write_dataset(tmp_path / "again", SMALL, seed=42)
    for name in masks:
        assert (tmp_path / "again" / MASKS_DIR / name).read_bytes() == (target / MASKS_DIR / name).read_bytes()
    # the ham10000 reader still finds exactly the images (a mask's stem is not an image id)
    table = read_ham10000(target)
    assert sorted(table["image_id"]) == sorted(meta["image_id"])
    assert table["path"].str.startswith("images/").all()
