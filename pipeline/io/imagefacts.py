"""Per-image facts for the validate stage (file IO; the suite judging them is pure, in
:mod:`pipeline.core.checks`): does each manifest file exist, stay inside the data
root, decode fully, and what are its mode, size, byte count and content hash.

Design choices:

* **Never raise on a bad image.** :func:`inspect_image` turns every problem into a fact
  (``decodes=False`` plus a short ``error`` text). Judging the facts is the job of the Great
  Expectations suite in :mod:`pipeline.core.checks`, so one run reports *every* bad file at once.
* **Stay inside the root.** A ``path`` that is absolute or resolves (``..``, symlinks) outside
  the data root gets ``inside_root=False`` and is never opened or hashed.
* **Decompression bombs are refused from the header.** ``Image.open`` parses only the header;
  when ``width * height > max_pixels`` the file is refused before any pixel is decoded. PIL's own
  guard (``DecompressionBombError``, and ``DecompressionBombWarning`` turned into an error while
  facts are gathered) is caught too, for files that trip it while the header is parsed.
* **Full decode.** ``img.load()`` decodes every pixel, so truncated files are caught (PIL raises
  "image file is truncated" unless someone enabled ``ImageFile.LOAD_TRUNCATED_IMAGES``); the
  decoded pixels also give the perceptual hash (``phash``) that finds the same picture saved twice
  under two ids (re-encoded, resized) -- file bytes alone would not.
* **Threads, not processes.** Pillow's decoders and ``hashlib`` release the GIL on large
  buffers, so a thread pool scales with ``workers`` without pickling the manifest or paying
  process start-up; ``pool.map`` keeps the manifest order.
"""

from __future__ import annotations

import hashlib
import math
import re
import sys
import warnings
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image
from tqdm import tqdm

from pipeline.config import ValidateConfig
from pipeline.core.imaging import perceptual_hash
from pipeline.core.schema import FACT_COLUMNS
from pipeline.errors import DataError

_MAX_ERROR_CHARS = 200
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


def _short(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 3] + "..."


def _is_blank(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _bomb_error(exc: BaseException, max_pixels: int) -> str:
    match = _BOMB_PIXELS.search(str(exc))
    if match and int(match.group(1)) > max_pixels:
        return f"image has {int(match.group(1))} pixels > max_pixels ({max_pixels})"
    n = match.group(1) if match else "too many"
    return f"image has {n} pixels: refused by PIL as a possible decompression bomb"


def inspect_image(path_text: Any, root: Path, max_pixels: int) -> dict[str, Any]:
    """Facts of one manifest ``path`` (relative to the already resolved ``root``); never raises."""
    facts: dict[str, Any] = {
        "exists": False,
        "inside_root": False,
        "decodes": False,
        "mode": None,
        "img_width": None,
        "img_height": None,
        "bytes": None,
        "file_sha256": None,
        "phash": None,
        "error": "",
    }
    if _is_blank(path_text):
        facts["error"] = "empty path"
        return facts
    rel = Path(str(path_text))
    try:
        resolved = (root / rel).resolve()
        facts["exists"] = resolved.is_file()
    except (OSError, RuntimeError, ValueError) as exc:  # symlink loops, NUL bytes, ...
        facts["error"] = _short(f"bad path: {exc}")
        return facts
    facts["inside_root"] = not rel.is_absolute() and resolved.is_relative_to(root)
    if not facts["inside_root"]:
        facts["error"] = "absolute path (must be relative to the data root)" if rel.is_absolute() else (
            "path escapes the data root"
        )
        return facts
    if not facts["exists"]:
        facts["error"] = "not a regular file" if resolved.exists() else "file not found"
        return facts
    try:
        facts["bytes"] = resolved.stat().st_size
        facts["file_sha256"] = _sha256(resolved)
    except OSError as exc:
        facts["error"] = _short(f"cannot read: {exc.strerror or exc}")
        return facts
    if facts["bytes"] == 0:
        facts["error"] = "empty file (0 bytes)"
        return facts
    try:
        with Image.open(resolved) as img:  # parses the header only
            facts["mode"] = img.mode
            width, height = img.size
            facts["img_width"], facts["img_height"] = int(width), int(height)
            if width * height > max_pixels:
                facts["error"] = f"image has {width * height} pixels > max_pixels ({max_pixels})"
                return facts
            img.load()  # full decode
            facts["phash"] = perceptual_hash(img)
        facts["decodes"] = True
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        facts["error"] = _bomb_error(exc, max_pixels)
    except Image.UnidentifiedImageError:
        facts["error"] = "cannot decode: not a recognisable image file"
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a fact, reported by the suite
        facts["error"] = _short(f"cannot decode: {type(exc).__name__}: {exc}")
    return facts


def _facts_frame(rows: Iterable[dict[str, Any]], index: pd.Index) -> pd.DataFrame:
    df = pd.DataFrame(list(rows), index=index, columns=list(FACT_COLUMNS))
    for col in ("exists", "inside_root", "decodes"):
        df[col] = df[col].astype(bool)
    for col in ("img_width", "img_height", "bytes"):
        df[col] = df[col].astype("Int64")
    df["mode"] = df["mode"].astype(object)
    df["file_sha256"] = df["file_sha256"].astype(object)
    df["phash"] = df["phash"].astype(object)
    df["error"] = df["error"].astype(str)
    return df


def gather_facts(manifest: pd.DataFrame, root: Path, cfg: ValidateConfig) -> pd.DataFrame:
    """The manifest plus :data:`FACT_COLUMNS`, one row per manifest row, same order and index.

    Runs :func:`inspect_image` on ``cfg.workers`` threads with a progress bar on stderr (shown
    only on a terminal). Existing fact columns in ``manifest`` are replaced.
    """
    if "path" not in manifest.columns:
        raise DataError("manifest has no 'path' column")
    root = Path(root).resolve()
    inspect = partial(inspect_image, root=root, max_pixels=cfg.max_pixels)
    paths = manifest["path"].tolist()
    bar = tqdm(total=len(paths), desc="validate: image facts", unit="img", file=sys.stderr, disable=None)
    with warnings.catch_warnings():
        # Process-wide filter (threads share it), restored when all workers are done.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            if cfg.workers <= 1 or len(paths) <= 1:
                rows = [inspect(p) for p in paths]
                bar.update(len(paths))
            else:
                rows = []
                with ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="imagefacts") as pool:
                    for row in pool.map(inspect, paths):
                        rows.append(row)
                        bar.update(1)
        finally:
            bar.close()
    facts = _facts_frame(rows, manifest.index)
    base = manifest.drop(columns=[c for c in FACT_COLUMNS if c in manifest.columns])
    return pd.concat([base, facts], axis=1)
