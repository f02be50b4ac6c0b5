"""Per-image facts: every bad file becomes a recorded fact, never an exception."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.config import ValidateConfig
from pipeline.io.imagefacts import FACT_COLUMNS, gather_facts, inspect_image


def rgb(path: Path, size: tuple[int, int] = (40, 36), seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr, "RGB").save(path)
    return path


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose IHDR claims width x height (1-bit) with no pixel data: a cheap 'bomb'."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def test_good_rgb_image(tmp_path: Path) -> None:
    rgb(tmp_path / "a.png")
    f = inspect_image("a.png", tmp_path.resolve(), 10_000)
    assert f["exists"] and f["inside_root"] and f["decodes"]
    assert (f["mode"], f["img_width"], f["img_height"], f["error"]) == ("RGB", 40, 36, "")
    assert f["bytes"] == (tmp_path / "a.png").stat().st_size and len(f["file_sha256"]) == 64


@pytest.mark.parametrize(
    ("name", "make", "needle"),
    [
        ("garbage.jpg", lambda p: p.write_bytes(b"this is not a jpeg" * 50), "cannot decode"),
        ("empty.jpg", lambda p: p.write_bytes(b""), "empty file (0 bytes)"),
        ("trunc.jpg", None, "cannot decode"),
    ],
)
def test_undecodable_files_are_recorded(tmp_path: Path, name: str, make, needle: str) -> None:
    path = tmp_path / name
    if make is None:
        rgb(tmp_path / "full.jpg", (64, 64))
        data = (tmp_path / "full.jpg").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        make(path)
    f = inspect_image(name, tmp_path.resolve(), 10_000_000)
    assert f["exists"] and not f["decodes"]
    assert needle in f["error"]


def test_missing_escaping_and_absolute_paths(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    outside = rgb(tmp_path / "outside.png")
    missing = inspect_image("nope.png", root.resolve(), 10_000)
    assert not missing["exists"] and missing["inside_root"] and missing["error"] == "file not found"
    esc = inspect_image("../outside.png", root.resolve(), 10_000)
    assert not esc["inside_root"] and esc["error"] == "path escapes the data root"
    assert esc["file_sha256"] is None  # never read
    absolute = inspect_image(str(outside), root.resolve(), 10_000)
    assert not absolute["inside_root"] and "absolute path" in absolute["error"]
    assert inspect_image(None, root.resolve(), 10_000)["error"] == "empty path"


def test_bomb_refused_from_header(tmp_path: Path) -> None:
    png_header_only(tmp_path / "bomb.png", 3000, 3000)  # no pixel data at all: decoding would fail too
    f = inspect_image("bomb.png", tmp_path.resolve(), 1_000_000)
    assert f["error"] == "image has 9000000 pixels > max_pixels (1000000)"
    assert (f["img_width"], f["img_height"], f["decodes"]) == (3000, 3000, False)


def test_pil_bomb_error_is_caught(tmp_path: Path) -> None:
    png_header_only(tmp_path / "huge.png", 50_000, 50_000)  # > 2x PIL's MAX_IMAGE_PIXELS
    f = inspect_image("huge.png", tmp_path.resolve(), 40_000_000)
    assert f["error"] == "image has 2500000000 pixels > max_pixels (40000000)"
    assert not f["decodes"]


def test_gather_facts_parallel_keeps_order_and_index(tmp_path: Path) -> None:
    for i in range(6):
        rgb(tmp_path / f"{i}.png", seed=i)
    paths = [f"{i}.png" for i in range(6)] + ["missing.png"]
    manifest = pd.DataFrame({"image_id": [f"id{i}" for i in range(7)], "path": paths}, index=range(10, 17))
    out = gather_facts(manifest, tmp_path, ValidateConfig(workers=3))
    assert list(out.columns) == ["image_id", "path", *FACT_COLUMNS]
    assert list(out.index) == list(range(10, 17))
    assert out["decodes"].tolist() == [True] * 6 + [False]
    assert out["error"].iloc[-1] == "file not found"
    assert out["file_sha256"].iloc[:6].nunique() == 6
    assert str(out["img_width"].dtype) == "Int64" and out["img_width"].isna().iloc[-1]
