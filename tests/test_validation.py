"""The validate stage: a clean data set passes, every entry of the bad-input corpus fails with
a message naming the file and the problem, and no ``validated.parquet`` is left behind."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.config import Config, load_config
from pipeline.core.checks import build_tables
from pipeline.core.schema import MANIFEST_COLUMNS
from pipeline.errors import DataError, ValidationFailed
from pipeline.io.imagefacts import FACT_COLUMNS
from pipeline.labels import CLASSES
from pipeline.layout import Layout
from pipeline.stages.validate import run_validate

ROOT = Path(__file__).resolve().parents[1]
PER_SPLIT = {"train": 2, "val": 1, "test": 1}
SIZE = (40, 36)


# ---------------------------------------------------------------------------------------------
# Fixture builder: a tiny clean data set (7 classes x 4 images) plus helpers to break it
# ---------------------------------------------------------------------------------------------


def _encode(img: Image.Image, fmt: str) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def rgb_bytes(seed: int, fmt: str = "PNG", size: tuple[int, int] = SIZE) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    return _encode(Image.fromarray(arr, "RGB"), fmt)


def header_only_png(width: int, height: int) -> bytes:
    """A 1-bit PNG whose header claims width x height, with no pixel data (a cheap 'bomb')."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)) + chunk(
        b"IEND", b""
    )


@dataclass
class Case:
    root: Path
    work: Path
    rows: list[dict[str, Any]]
    overrides: dict[str, Any]

    def add(self, name: str, data: bytes, label: str = "nv", split: str = "train", **row: Any) -> dict[str, Any]:
        """Write ``data`` to images/<name> and add a manifest row for it (facts as ingest records them)."""
        path = self.root / "images" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        image_id = Path(name).stem
        entry = {
            "image_id": image_id,
            "path": f"images/{name}",
            "label": label,
            "group_id": image_id,
            "split": split,
            "width": SIZE[0],
            "height": SIZE[1],
            "sha256": hashlib.sha256(data).hexdigest(),
            "source_site": "clinic_a",
        }
        entry.update(row)
        self.rows.append(entry)
        return entry

    def write_manifest(self) -> None:
        extra = [k for k in dict.fromkeys(k for r in self.rows for k in r) if k not in MANIFEST_COLUMNS]
        df = pd.DataFrame(self.rows, columns=list(MANIFEST_COLUMNS) + extra)
        for col in ("width", "height"):
            if all(isinstance(r[col], int) for r in self.rows):
                df[col] = df[col].astype("int64")
        path = Layout(self.work).manifest
        path.parent.mkdir(parents=True, exist_ok=True)
        df.to_parquet(path, index=False)

    def config(self, **extra: Any) -> Config:
        return load_config(ROOT / "params.yaml", {**self.overrides, **extra})

    def cli_args(self, **extra: Any) -> list[str]:
        args = [sys.executable, "-m", "pipeline", "validate", "--params", "params.yaml"]
        for k, v in {**self.overrides, **extra}.items():
            args += ["--set", f"{k}={v}"]
        return args


def clean_case(tmp_path: Path) -> Case:
    case = Case(
        root=tmp_path / "data",
        work=tmp_path / "work",
        rows=[],
        overrides={
            "paths.work_dir": str(tmp_path / "work"),
            "data.source": "imagefolder",
            "data.root": str(tmp_path / "data"),
            "validate.workers": 2,
        },
    )
    seed = 0
    for label in CLASSES:
        for split, n in PER_SPLIT.items():
            for _ in range(n):
                seed += 1
                case.add(f"{label}_{seed:03d}.png", rgb_bytes(seed), label=label, split=split)
    return case


def validated(case: Case) -> Path:
    return Layout(case.work).validated_manifest


def result_json(case: Case) -> dict[str, Any]:
    return json.loads((Layout(case.work).validation_dir / "result.json").read_text())


# ---------------------------------------------------------------------------------------------
# The bad-input corpus: (mutation, checks that must fail, text the error must contain)
# ---------------------------------------------------------------------------------------------


def _corrupt(c: Case) -> None:
    c.add("corrupt.jpg", b"\xff\xd8\xff\xe0 definitely not a jpeg " * 20, width=0, height=0)


def _truncated(c: Case) -> None:
    data = rgb_bytes(900, "JPEG", (64, 64))
    c.add("truncated.jpg", data[: len(data) // 2], width=64, height=64)


def _zero(c: Case) -> None:
    c.add("zero.jpg", b"", width=0, height=0)


def _gray(c: Case) -> None:
    c.add("gray.png", _encode(Image.new("L", SIZE, 128), "PNG"))


def _rgba(c: Case) -> None:
    c.add("rgba.png", _encode(Image.new("RGBA", SIZE, (1, 2, 3, 100)), "PNG"))


def _png16(c: Case) -> None:
    c.add("deep16.png", _encode(Image.fromarray(np.full((SIZE[1], SIZE[0]), 40000, dtype=np.uint16)), "PNG"))


def _bomb(c: Case) -> None:
    c.add("bomb.png", header_only_png(50_000, 50_000), width=50_000, height=50_000)


def _unknown_label(c: Case) -> None:
    c.add("odd.png", rgb_bytes(906), label="melanoma")


def _missing(c: Case) -> None:
    c.add("missing.png", rgb_bytes(901))
    (c.root / "images" / "missing.png").unlink()


def _duplicate_id(c: Case) -> None:
    c.add("dup.png", rgb_bytes(902), image_id=c.rows[0]["image_id"])


def _escape(c: Case) -> None:
    outside = c.root.parent / "outside.png"
    outside.write_bytes(rgb_bytes(903))
    c.add("esc.png", rgb_bytes(904), path="../outside.png")


def _no_df(c: Case) -> None:
    c.rows[:] = [r for r in c.rows if r["label"] != "df"]


def _sha_two_splits(c: Case) -> None:
    train = next(r for r in c.rows if r["split"] == "train")
    c.add("copy_in_val.png", (c.root / train["path"]).read_bytes(), label=train["label"], split="val")


def _group_two_splits(c: Case) -> None:
    train = next(r for r in c.rows if r["split"] == "train")
    val = next(r for r in c.rows if r["split"] == "val")
    val["group_id"] = train["group_id"]


def _reencoded_two_splits(c: Case) -> None:
    """The same pixels under another id and format in another split: the bytes differ, the picture not."""
    train = next(r for r in c.rows if r["split"] == "train")
    with Image.open(c.root / train["path"]) as img:
        c.add("copy_in_test.bmp", _encode(img.convert("RGB"), "BMP"), label=train["label"], split="test")


def _lesion_two_labels(c: Case) -> None:
    a = next(r for r in c.rows if r["split"] == "train" and r["label"] == "akiec")
    b = next(r for r in c.rows if r["split"] == "train" and r["label"] == "bcc")
    b["group_id"] = a["group_id"]


def _sha_mismatch(c: Case) -> None:
    c.rows[3]["sha256"] = "0" * 64


def _small(c: Case) -> None:
    c.add("tiny.png", rgb_bytes(905, size=(8, 8)), width=8, height=8)


def _extra_column(c: Case) -> None:
    for r in c.rows:
        r["notes"] = "x"


def _width_text(c: Case) -> None:
    for r in c.rows:
        r["width"] = str(r["width"])


CORPUS: dict[str, tuple[Callable[[Case], None], set[str], list[str]]] = {
    "corrupt_jpeg": (_corrupt, {"decodes"}, ["corrupt.jpg", "cannot decode"]),
    "truncated_jpeg": (_truncated, {"decodes"}, ["truncated.jpg", "truncated"]),
    "zero_byte": (_zero, {"decodes"}, ["zero.jpg", "empty file (0 bytes)"]),
    "grayscale": (_gray, {"mode"}, ["gray.png", '"L"']),
    "rgba": (_rgba, {"mode"}, ["rgba.png", '"RGBA"']),
    "png16": (_png16, {"mode"}, ["deep16.png", '"I;16"']),
    "bomb": (
        _bomb,
        {"decodes"},
        ["bomb.png", "2500000000 pixels > max_pixels"],
    ),
    "unknown_label": (_unknown_label, {"label_known"}, ["melanoma", "images/odd.png"]),
    "missing_file": (_missing, {"exists", "decodes"}, ["missing.png", "file not found"]),
    "duplicate_id": (_duplicate_id, {"unique_image_id"}, ["akiec_001", "images/dup.png"]),
    "escaping_path": (_escape, {"inside_root", "decodes"}, ["../outside.png", "escapes the data root"]),
    "class_without_images": (_no_df, {"classes_in_train"}, ["class df", "classes_in_train"]),
    "sha256_in_two_splits": (
        _sha_two_splits, {"content_one_split", "near_duplicate_one_split"}, ["copy_in_val.png", "train,val"]
    ),
    "reencoded_in_two_splits": (_reencoded_two_splits, {"near_duplicate_one_split"}, ["copy_in_test", "(train)"]),
    "lesion_with_two_labels": (_lesion_two_labels, {"group_one_label"}, ["akiec,bcc"]),
    "group_in_two_splits": (_group_two_splits, {"group_one_split"}, ["train,val"]),
    "sha256_mismatch": (_sha_mismatch, {"sha256_matches"}, ["akiec_004", "0000000000"]),
    "too_small": (_small, {"width_bounds", "height_bounds"}, ["tiny.png", "value=8"]),
    "extra_column": (_extra_column, {"columns"}, ['"unexpected": ["notes"]']),
    "width_as_text": (_width_text, {"type_width", "width_matches"}, ["observed \"str\""]),
}


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_bad_input_fails_with_clear_message(tmp_path: Path, name: str) -> None:
    mutate, expected_failed, needles = CORPUS[name]
    case = clean_case(tmp_path)
    mutate(case)
    case.write_manifest()
    with pytest.raises(ValidationFailed) as info:
        run_validate(case.config())
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in:\n{message}"
    for check in expected_failed:
        assert f"FAILED {check}:" in message
    report = result_json(case)
    assert report["success"] is False
    assert set(report["failed"]) == expected_failed
    assert not validated(case).exists()
    assert "FAILED" in (Layout(case.work).validation_dir / "summary.html").read_text()


def test_clean_data_set_passes(tmp_path: Path) -> None:
    case = clean_case(tmp_path)
    case.write_manifest()
    summary = run_validate(case.config())
    assert summary["success"] is True and summary["n_failed"] == 0
    assert summary["n_images"] == 7 * sum(PER_SPLIT.values())
    out = pd.read_parquet(validated(case))
    assert list(out.columns) == list(MANIFEST_COLUMNS) + list(FACT_COLUMNS)
    assert out["decodes"].all() and (out["file_sha256"] == out["sha256"]).all()
    report = result_json(case)
    assert report["success"] is True and report["n_expectations"] == summary["n_expectations"] >= 30
    assert all(e["success"] for e in report["expectations"])
    assert "PASSED" in (Layout(case.work).validation_dir / "summary.html").read_text()
    first = (Layout(case.work).validation_dir / "result.json").read_bytes()
    run_validate(case.config())  # same input -> byte-identical report (lineage hashes it)
    assert (Layout(case.work).validation_dir / "result.json").read_bytes() == first


def test_lowered_max_pixels_refuses_before_decoding(tmp_path: Path) -> None:
    case = clean_case(tmp_path)
    case.write_manifest()
    with pytest.raises(ValidationFailed) as info:
        run_validate(case.config(**{"validate.max_pixels": 1000}))
    assert "image has 1440 pixels > max_pixels (1000)" in str(info.value)
    assert set(result_json(case)["failed"]) == {"decodes", "max_pixels"}


def test_examples_are_limited(tmp_path: Path) -> None:
    case = clean_case(tmp_path)
    case.write_manifest()
    with pytest.raises(ValidationFailed) as info:
        run_validate(case.config(**{"validate.allowed_modes": ["L"], "validate.examples": 2}))
    msg = str(info.value)
    section = msg[msg.index("FAILED mode:") :].splitlines()
    assert sum(line.startswith("      - ") for line in section) == 2
    assert "... 26 more" in msg
    mode = next(e for e in result_json(case)["expectations"] if e["name"] == "mode")
    assert mode["unexpected_count"] == 28 and len(mode["examples"]) == 28  # report_examples=50


def test_empty_manifest_is_a_clear_error(tmp_path: Path) -> None:
    case = clean_case(tmp_path)
    case.rows.clear()
    case.write_manifest()
    with pytest.raises(ValidationFailed) as info:
        run_validate(case.config())
    assert "manifest is empty" in str(info.value) and "FAILED not_empty" in str(info.value)
    assert not validated(case).exists()


def test_missing_manifest_names_it(tmp_path: Path) -> None:
    case = clean_case(tmp_path)
    with pytest.raises(DataError, match=r"manifest\.parquet: manifest not found"):
        run_validate(case.config())


def test_manifest_missing_column_names_it(tmp_path: Path) -> None:
    case = clean_case(tmp_path)
    case.write_manifest()
    path = Layout(case.work).manifest
    pd.read_parquet(path).drop(columns=["group_id"]).to_parquet(path)
    with pytest.raises(DataError, match="group_id"):
        run_validate(case.config())


def test_stale_validated_manifest_is_removed_on_failure(tmp_path: Path) -> None:
    case = clean_case(tmp_path)
    case.write_manifest()
    run_validate(case.config())
    assert validated(case).exists()
    _corrupt(case)
    case.write_manifest()
    with pytest.raises(ValidationFailed):
        run_validate(case.config())
    assert not validated(case).exists()


def test_build_tables_counts_cross_split_sharing() -> None:
    facts = pd.DataFrame(
        {
            "image_id": ["a", "b", "c", "d"],
            "label": ["nv", "nv", "mel", "bogus"],
            "group_id": ["g1", "g1", "g2", "g3"],
            "split": ["train", "val", "train", "test"],
            "sha256": ["h1", "h2", "h1", ""],
            "file_sha256": [None, "h2", "h1", None],
            "img_width": pd.array([1, 2, None, 4], dtype="Int64"),
            "img_height": pd.array([1, 2, 3, 4], dtype="Int64"),
        }
    )
    images = build_tables(facts)["images"]
    assert images["content_splits"].tolist() == [1, 1, 1, 1]  # 'a' falls back to its manifest sha h1, c is train too
    assert images["group_splits"].tolist() == [2, 2, 1, 1]
    assert images["group_split_set"].tolist()[:2] == ["train,val", "train,val"]
    assert images["pixels"].isna().tolist() == [False, False, True, False]
    classes = build_tables(facts)["classes"].set_index("label")
    assert classes.loc["nv", "n_train"] == 1 and classes.loc["nv", "n_val"] == 1
    assert classes.loc["df", "n_total"] == 0 and "bogus" not in classes.index


# ---------------------------------------------------------------------------------------------
# Through the CLI: exit codes and messages
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "mutate", "rc", "needle"),
    [
        ("clean", None, 0, '"success": true'),
        ("corrupt", _corrupt, 1, "corrupt.jpg"),
        ("escape", _escape, 1, "escapes the data root"),
        ("empty", lambda c: c.rows.clear(), 1, "manifest is empty"),
    ],
)
def test_cli_exit_codes(tmp_path: Path, name: str, mutate: Callable[[Case], None] | None, rc: int, needle: str) -> None:
    case = clean_case(tmp_path)
    if mutate is not None:
        mutate(case)
    case.write_manifest()
    proc = subprocess.run(case.cli_args(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == rc, out
    assert needle in out
    assert "Traceback" not in out
    assert "Skipping registering function" not in out and "Calculating Metrics" not in out
    assert validated(case).exists() == (rc == 0)
