"""Data sources -> manifest (pipeline.io.readers, pipeline.stages.ingest), on fixtures built in each source's official layout."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, SHARED_DATA
from PIL import Image

from pipeline.config import ConfigError
from pipeline.core.schema import MANIFEST_COLUMNS
from pipeline.errors import DataError
from pipeline.io.images import file_facts
from pipeline.io.readers import index_images, read_ham10000, read_imagefolder, read_isic_csv
from pipeline.labels import CLASSES, ISIC_COLUMNS
from pipeline.stages.ingest import build_manifest, run_ingest
from pipeline.stages.synthesize import run_synthesize

HAM_HEADER = "lesion_id,image_id,dx,dx_type,age,sex,localization,dataset\n"


def textured_image(name: str, size: tuple[int, int], colour: tuple[int, int, int]) -> Image.Image:
    """A picture of its own for ``name``: a coarse random pattern seeded by the name, tinted ``colour``
    (uniform fixtures would all be one picture to the perceptual hash)."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    pattern = rng.integers(0, 96, (6, 8, 3), dtype=np.int16) + np.array(colour, dtype=np.int16) // 2
    small = Image.fromarray(np.clip(pattern, 0, 255).astype(np.uint8), mode="RGB")
    return small.resize(size, Image.Resampling.NEAREST)


def _jpeg(path: Path, size: tuple[int, int] = (40, 30), colour: tuple[int, int, int] = (150, 90, 60)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    textured_image(path.name, size, colour).save(path, format="JPEG", quality=90)
    return path


def _ham_rows(rows: list[tuple[str, str, str]]) -> str:
    return HAM_HEADER + "".join(f"{les},{img},{dx},histo,50.0,male,back,vidir_modern\n" for les, img, dx in rows)


@pytest.fixture
def ham_official(tmp_path: Path) -> Path:
    """Official download layout: images split over HAM10000_images_part_1/_part_2; one image absent."""
    root = tmp_path / "ham"
    rows = [
        ("HAM_0000001", "ISIC_0000001", "mel"),
        ("HAM_0000001", "ISIC_0000002", "mel"),
        ("HAM_0000002", "ISIC_0000003", "NV"),
        ("", "ISIC_0000004", "bkl"),
        ("HAM_0000003", "ISIC_0000005", "df"),  # image missing on disk
    ]
    root.mkdir()
    (root / "HAM10000_metadata.csv").write_text(_ham_rows(rows), encoding="utf-8")
    _jpeg(root / "HAM10000_images_part_1" / "ISIC_0000001.jpg", (60, 45))
    _jpeg(root / "HAM10000_images_part_1" / "ISIC_0000002.jpg")
    _jpeg(root / "HAM10000_images_part_2" / "ISIC_0000003.jpg")
    _jpeg(root / "HAM10000_images_part_2" / "ISIC_0000004.jpg")
    return root


def test_ham10000_official_layout(ham_official: Path):
    df = read_ham10000(ham_official).set_index("image_id")
    assert list(df.index) == [f"ISIC_000000{i}" for i in range(1, 6)]
    assert df.loc["ISIC_0000001", "path"] == "HAM10000_images_part_1/ISIC_0000001.jpg"
    assert df.loc["ISIC_0000003", "path"] == "HAM10000_images_part_2/ISIC_0000003.jpg"
    assert df.loc["ISIC_0000005", "path"] == "images/ISIC_0000005.jpg"  # not found: conventional path
    assert df["label"].tolist() == ["mel", "mel", "nv", "bkl", "df"]
    assert df.loc["ISIC_0000002", "group_id"] == "HAM_0000001"
    assert df.loc["ISIC_0000004", "group_id"] == "ISIC_0000004"  # blank lesion id -> image id


def test_manifest_facts_and_missing_file_recorded_not_fatal(ham_official: Path, tiny_config):
    cfg = tiny_config.with_overrides({"data.source": "ham10000", "data.root": str(ham_official)})
    summary = run_ingest(cfg)
    manifest = pd.read_parquet(Path(cfg.paths.work_dir) / "data" / "manifest.parquet")
    assert tuple(manifest.columns) == MANIFEST_COLUMNS
    assert summary["rows"] == 5 and summary["unreadable"] == 1
    row = manifest.set_index("image_id").loc["ISIC_0000001"]
    assert (row["width"], row["height"]) == (60, 45)
    expected_sha = hashlib.sha256((ham_official / row["path"]).read_bytes()).hexdigest()
    assert row["sha256"] == expected_sha
    missing = manifest.set_index("image_id").loc["ISIC_0000005"]
    assert (missing["width"], missing["height"], missing["sha256"]) == (0, 0, "")
    assert manifest.groupby("group_id")["split"].nunique().max() == 1
    assert set(manifest["split"]) <= {"train", "val", "test"}


def test_ham10000_flat_images_layout(tmp_path: Path):
    root = tmp_path / "flat"
    root.mkdir()
    (root / "HAM10000_metadata.csv").write_text(_ham_rows([("L1", "A", "vasc"), ("L2", "B", "weird")]))
    _jpeg(root / "images" / "A.jpg")
    _jpeg(root / "images" / "B.JPG")
    _jpeg(root / ".hidden" / "A.jpg")  # e.g. an in-progress atomic write: ignored
    df = read_ham10000(root)
    assert df["path"].tolist() == ["images/A.jpg", "images/B.JPG"]
    assert df["label"].tolist() == ["vasc", "weird"]  # unknown labels pass through to validate


def test_byte_identical_copies_are_tolerated(ham_official: Path):
    # e.g. the Kaggle copy ships HAM10000_images_part_1/ and ham10000_images_part_1/
    src = ham_official / "HAM10000_images_part_1" / "ISIC_0000001.jpg"
    (ham_official / "ham10000_images_part_1").mkdir()
    (ham_official / "ham10000_images_part_1" / "ISIC_0000001.jpg").write_bytes(src.read_bytes())
    df = read_ham10000(ham_official).set_index("image_id")
    assert df.loc["ISIC_0000001", "path"] == "HAM10000_images_part_1/ISIC_0000001.jpg"


def test_duplicate_stem_names_both_files(ham_official: Path):
    _jpeg(ham_official / "HAM10000_images_part_2" / "ISIC_0000001.png")
    with pytest.raises(DataError, match=r"ISIC_0000001.*part_1/ISIC_0000001\.jpg.*part_2/ISIC_0000001\.png"):
        read_ham10000(ham_official)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "metadata file not found"),
        ("lesion_id,image_id,age\nL1,A,3\n", r"missing column\(s\) \['dx'\]"),
        (HAM_HEADER, "no rows"),
        (_ham_rows([("L1", "A", "nv"), ("L2", "A", "mel")]), r"duplicated image id\(s\) \['A'\]"),
        (_ham_rows([("L1", "", "nv")]), r"empty image_id on line\(s\) \[2\]"),
    ],
)
def test_bad_ham_metadata(tmp_path: Path, content: str | None, message: str):
    root = tmp_path / "bad"
    root.mkdir()
    if content is not None:
        (root / "HAM10000_metadata.csv").write_text(content)
    with pytest.raises(DataError, match=message) as info:
        read_ham10000(root)
    assert str(root) in str(info.value)


def test_missing_root(tmp_path: Path):
    with pytest.raises(DataError, match="data root not found"):
        read_ham10000(tmp_path / "nope")


def _isic_csv(path: Path, rows: list[tuple[str, str]], extra: dict[str, list[str]] | None = None) -> Path:
    cols = list(ISIC_COLUMNS)
    data = {"image": [r[0] for r in rows]}
    for col in cols:
        data[col] = ["1.0" if r[1] == col else "0.0" for r in rows]
    df = pd.DataFrame(data | (extra or {}))
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)
    return path


def test_isic_csv(tmp_path: Path):
    root = tmp_path / "ISIC2018_Task3_Training_Input"
    for name in ("ISIC_1", "ISIC_2", "ISIC_3"):
        _jpeg(root / f"{name}.jpg")
    csv = _isic_csv(tmp_path / "gt.csv", [("ISIC_1", "MEL"), ("ISIC_2", "AKIEC"), ("ISIC_3", "VASC")])
    df = read_isic_csv(csv, root)
    assert df["label"].tolist() == ["mel", "akiec", "vasc"]
    assert df["path"].tolist() == ["ISIC_1.jpg", "ISIC_2.jpg", "ISIC_3.jpg"]
    assert df["group_id"].tolist() == ["ISIC_1", "ISIC_2", "ISIC_3"]

    with_lesions = _isic_csv(tmp_path / "gt2.csv", [("ISIC_1", "NV"), ("ISIC_2", "NV")], {"lesion_id": ["L9", "L9"]})
    assert read_isic_csv(with_lesions, root)["group_id"].tolist() == ["L9", "L9"]


@pytest.mark.parametrize("bad_values", [("1.0", "1.0"), ("0.0", "0.0"), ("yes", "0.0"), ("0.5", "0.5")])
def test_isic_row_not_one_hot(tmp_path: Path, bad_values: tuple[str, str]):
    root = tmp_path / "img"
    root.mkdir()
    csv = _isic_csv(tmp_path / "gt.csv", [("ISIC_1", "MEL"), ("ISIC_2", "NV")])
    df = pd.read_csv(csv, dtype=str)
    df.loc[1, ["MEL", "NV"]] = list(bad_values)
    df.to_csv(csv, index=False)
    with pytest.raises(DataError, match=r"gt\.csv: line 3 \(image 'ISIC_2'\) is not one-hot"):
        read_isic_csv(csv, root)


def test_isic_via_config_csv_relative_to_root_and_required(tmp_path: Path, tiny_config):
    root = tmp_path / "isic"
    for i, col in enumerate(ISIC_COLUMNS):
        _jpeg(root / f"ISIC_{i}.jpg", (33, 33))
    _isic_csv(root / "gt.csv", [(f"ISIC_{i}", col) for i, col in enumerate(ISIC_COLUMNS)])
    cfg = tiny_config.with_overrides({"data.source": "isic_csv", "data.root": str(root), "data.csv": "gt.csv"})
    summary = run_ingest(cfg)
    assert summary["rows"] == 7 and summary["unreadable"] == 0
    assert set(summary["per_label"]) == set(CLASSES)
    with pytest.raises(ConfigError, match="data.csv"):
        run_ingest(cfg.with_overrides({"data.csv": None}))


def test_imagefolder(tmp_path: Path):
    root = tmp_path / "folders"
    _jpeg(root / "MEL" / "a.jpg")
    _jpeg(root / "MEL" / "sub" / "b.png")
    _jpeg(root / "nv" / "c.jpeg")
    (root / "nv" / "notes.txt").write_text("not an image")
    (root / "stray.jpg").write_bytes(b"")  # files directly in root are ignored
    df = read_imagefolder(root)
    assert df.to_dict("list") == {
        "image_id": ["a", "b", "c"],
        "path": ["MEL/a.jpg", "MEL/sub/b.png", "nv/c.jpeg"],
        "label": ["mel", "mel", "nv"],
        "group_id": ["a", "b", "c"],
    }


def test_imagefolder_errors(tmp_path: Path):
    root = tmp_path / "folders"
    _jpeg(root / "nv" / "a.jpg")
    _jpeg(root / "moles" / "b.jpg")
    with pytest.raises(DataError, match=r"unknown class folder\(s\) \['moles'\]"):
        read_imagefolder(root)
    (root / "moles" / "b.jpg").rename(root / "nv" / "b.jpg")
    (root / "moles").rmdir()
    _jpeg(root / "mel" / "a.jpg")
    with pytest.raises(DataError, match=r"'a' found twice: mel/a\.jpg and nv/a\.jpg"):
        read_imagefolder(root)
    empty = tmp_path / "empty"
    (empty / "bcc").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        read_imagefolder(empty)


def test_file_facts_unreadable_and_corrupt(tmp_path: Path):
    assert file_facts(tmp_path / "missing.jpg") == (0, 0, "")
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not a jpeg at all")
    assert file_facts(junk) == (0, 0, hashlib.sha256(b"not a jpeg at all").hexdigest())
    good = _jpeg(tmp_path / "good.jpg", (21, 17))
    assert file_facts(good)[:2] == (21, 17)


def test_manifest_is_sorted_and_order_invariant(ham_official: Path, tiny_config):
    table = read_ham10000(ham_official)
    a = build_manifest(table, ham_official, tiny_config)
    b = build_manifest(table.iloc[::-1], ham_official, tiny_config)
    pd.testing.assert_frame_equal(a, b)
    assert a["image_id"].is_monotonic_increasing


def test_synthetic_source_roundtrip(tiny_config):
    with pytest.raises(DataError, match="run `python -m pipeline synthesize` first"):
        run_ingest(tiny_config)
    run_synthesize(tiny_config)
    summary = run_ingest(tiny_config)
    assert summary["rows"] == 56 and summary["unreadable"] == 0 and summary["per_label"] == {c: 8 for c in CLASSES}
    manifest = pd.read_parquet(Path(tiny_config.paths.work_dir) / "data" / "manifest.parquet")
    assert (manifest["width"] == 48).all() and manifest["sha256"].str.len().eq(64).all()
    assert manifest["path"].str.fullmatch(r"images/SYN_\d{7}\.jpg").all()
    per_label_split = manifest.groupby("label")["split"].nunique()
    assert (per_label_split == 3).all()  # 8 lesions per class -> train, val and test all present


def test_index_images_skips_non_images(tmp_path: Path):
    _jpeg(tmp_path / "x" / "A.jpg")
    (tmp_path / "x" / "A.txt").write_text("t")
    (tmp_path / "README.txt").write_text("t")
    assert index_images(tmp_path) == {"A": "x/A.jpg"}


@pytest.mark.realdata
def test_real_ham10000_sample(tiny_config):
    root = SHARED_DATA / "ham10000-600x450"
    if not (root / "HAM10000_metadata.csv").is_file():
        pytest.skip(f"real HAM10000 sample not available at {root}")
    cfg = tiny_config.with_overrides({"data.source": "ham10000", "data.root": str(root)})
    summary = run_ingest(cfg)
    manifest = pd.read_parquet(Path(cfg.paths.work_dir) / "data" / "manifest.parquet")
    assert len(manifest) == 124 and summary["unreadable"] == 0
    assert set(manifest["label"]) == set(CLASSES)
    assert (manifest["width"] == 600).all() and (manifest["height"] == 450).all()
    assert manifest.groupby("group_id")["split"].nunique().max() == 1
    assert manifest["sha256"].is_unique


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_cli_synthesize_then_ingest(tmp_path: Path):
    sets = ["--set", f"paths.work_dir={tmp_path}", "--set", "synthetic.images_per_class=3",
            "--set", "synthetic.image_size=32", "--set", "synthetic.images_per_lesion=2"]  # fmt: skip
    syn = _cli("synthesize", *sets)
    assert syn.returncode == 0, syn.stderr
    assert json.loads(syn.stdout.strip().splitlines()[-1])["images"] == 21
    ing = _cli("ingest", *sets)
    assert ing.returncode == 0, ing.stderr
    summary = json.loads(ing.stdout.strip().splitlines()[-1])
    assert summary["rows"] == 21 and summary["groups"] == 14
    assert (tmp_path / "data" / "manifest.parquet").is_file()
    bad = _cli("ingest", *sets, "--set", "data.source=ham10000", "--set", f"data.root={tmp_path / 'absent'}")
    assert bad.returncode == 1 and "absent: data root not found" in bad.stderr


def test_near_duplicate_pictures_are_split_together(tiny_config):
    """The same picture under another image id and lesion id (re-encoded as PNG, as archives hold
    them) lands in its original's split, so validate passes; with the grouping off it does not.
    Data without such copies gets the same manifest either way."""
    from pipeline.errors import ValidationFailed
    from pipeline.layout import Layout
    from pipeline.stages.validate import run_validate

    run_synthesize(tiny_config)
    off = {"data.split.group_near_duplicates": False}
    assert run_ingest(tiny_config)["near_duplicate_joins"] == {"lesions": 0, "examples": {}}
    manifest_path = Path(tiny_config.paths.work_dir) / "data" / "manifest.parquet"
    clean = pd.read_parquet(manifest_path)
    run_ingest(tiny_config.with_overrides(off))
    pd.testing.assert_frame_equal(clean, pd.read_parquet(manifest_path))

    root = Layout.from_config(tiny_config).synthetic_dir
    meta = pd.read_csv(root / "HAM10000_metadata.csv")
    originals = meta.iloc[::4].copy()  # 14 of 56 pictures get a copy
    copies = originals.copy()
    copies["image_id"] = [f"COPY_{i:03d}" for i in range(len(copies))]
    copies["lesion_id"] = [f"COPYLES_{i:03d}" for i in range(len(copies))]
    for (_, orig), new_id in zip(originals.iterrows(), copies["image_id"], strict=True):
        with Image.open(root / "images" / f"{orig['image_id']}.jpg") as img:
            img.convert("RGB").save(root / "images" / f"{new_id}.png")
    pd.concat([meta, copies]).to_csv(root / "HAM10000_metadata.csv", index=False)

    summary = run_ingest(tiny_config)
    manifest = pd.read_parquet(manifest_path).set_index("image_id")
    assert summary["rows"] == 56 + len(copies)
    joins = summary["near_duplicate_joins"]  # what an auditor reads: which lesions were split together
    assert joins["lesions"] == len(copies) and len(joins["examples"]) == 10
    pairs = {frozenset(p) for p in zip(copies["lesion_id"], originals["lesion_id"], strict=True)}
    for lesion, followed in joins["examples"].items():  # the larger id follows the smaller one's split
        assert frozenset((lesion, followed)) in pairs and followed < lesion
    # the file `track` logs for the lineage holds every join, not only the summary's first 10
    record = json.loads(Layout.from_config(tiny_config).ingest_summary.read_text())
    assert record["near_duplicate_joins"]["lesions"] == len(copies)
    assert {frozenset(p) for p in record["near_duplicate_joins"]["all"].items()} == pairs
    assert record["per_split"] == summary["per_split"] and record["rows"] == summary["rows"]
    for orig, new_id in zip(originals["image_id"], copies["image_id"], strict=True):
        assert manifest.loc[new_id, "split"] == manifest.loc[orig, "split"], new_id
        assert manifest.loc[new_id, "group_id"].startswith("COPYLES_")  # the manifest keeps each lesion id
    assert run_validate(tiny_config)["success"] is True

    run_ingest(tiny_config.with_overrides(off))
    manifest = pd.read_parquet(manifest_path).set_index("image_id")
    apart = [n for o, n in zip(originals["image_id"], copies["image_id"], strict=True)
             if manifest.loc[n, "split"] != manifest.loc[o, "split"]]
    assert apart  # lesion grouping alone puts some copies in another split ...
    with pytest.raises(ValidationFailed, match="near_duplicate_one_split"):  # ... which validate refuses
        run_validate(tiny_config.with_overrides(off))
