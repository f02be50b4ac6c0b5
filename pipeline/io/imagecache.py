"""Decode-once image cache: a uint8 ``(N, 3, H, W)`` array memory-mapped from a ``.npy`` file.

Training reads every image many times (once per pair it appears in, per epoch), so images are
decoded and resized exactly once, with :func:`pipeline.core.imaging.load_resized` (the one
preprocessing path shared with evaluation and prediction), and stored as raw uint8 CHW under
:attr:`pipeline.layout.Layout.cache_dir`.

Design choices:

* **Keyed by content of the request.** The file name carries a hash of the ordered image ids,
  their paths (relative to ``root``, so a run folder that moves -- or a retry on another worker
  mounting the same volume elsewhere -- keeps its cache), the target size and each file's size and
  modification time. Any changed input (another manifest, a re-augmented image, another
  ``image_size``) gives another key and the cache is rebuilt; an unchanged input reuses the file.
  Older caches of the same ``name`` are removed when a new one is built.
* **Atomic.** The array is written to a temporary file beside the target and renamed onto it only
  when complete (:func:`pipeline.io.files.atomic_path`), so a killed build never leaves a
  half-written cache that a later run would trust.
* **Memory-mapped, read-only.** Several processes (DDP ranks, evaluation) share the page cache
  instead of each holding a copy. Rows are gathered with fancy indexing, which copies only the
  requested batch.
* **uint8, CHW.** Four times smaller than float32; normalisation happens on the device
  (:func:`pipeline.core.imaging.to_model_input`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import DataError
from pipeline.io.files import atomic_path
from pipeline.io.images import load_resized

log = logging.getLogger(__name__)

CACHE_VERSION = 1


@dataclass(frozen=True)
class ImageCache:
    """Decoded images and the image-id -> row map."""

    array: np.ndarray  # uint8 (N, 3, H, W), usually a read-only memmap
    index: dict[str, int]
    path: Path | None = None

    def __len__(self) -> int:
        return int(self.array.shape[0])

    @property
    def image_size(self) -> int:
        return int(self.array.shape[-1])

    def rows(self, ids: Sequence[str]) -> np.ndarray:
        """Row numbers of ``ids``; a missing id raises :class:`DataError`."""
        try:
            return np.fromiter((self.index[i] for i in ids), dtype=np.int64, count=len(ids))
        except KeyError as exc:
            raise DataError(f"image id {exc.args[0]!r} is not in the image cache") from None

    def take(self, rows: np.ndarray) -> np.ndarray:
        """A contiguous uint8 copy of the given rows (N, 3, H, W)."""
        return np.ascontiguousarray(self.array[np.asarray(rows, dtype=np.int64)])


def cache_key(ids: Sequence[str], paths: Sequence[str | Path], size: int, root: str | Path | None = None) -> str:
    """sha256 over (version, size, and per image: id, path relative to ``root``, file size, mtime)."""
    h = hashlib.sha256()
    h.update(json.dumps({"v": CACHE_VERSION, "size": int(size), "n": len(ids)}).encode())
    base = Path(root) if root is not None else None
    for image_id, path in zip(ids, paths, strict=True):
        try:
            st = os.stat(path)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        shown = Path(path)
        if base is not None:
            try:
                shown = shown.relative_to(base)
            except ValueError:
                pass
        h.update(f"\0{image_id}\0{shown.as_posix()}\0{stamp}".encode())
    return h.hexdigest()


def _decode(path: Path, size: int) -> np.ndarray:
    try:
        arr = load_resized(path, size)
    except (OSError, ValueError, SyntaxError) as exc:  # PIL raises all three for bad files
        raise DataError(f"{path}: cannot decode image ({exc})") from None
    return arr.transpose(2, 0, 1)


def build_array(paths: Sequence[Path], size: int, out: np.ndarray, workers: int) -> None:
    """Decode ``paths`` into ``out`` (N, 3, size, size) in order, with a small thread pool.

    PIL releases the GIL while decoding, so threads give a real speed-up without pickling.
    """
    workers = max(1, min(workers, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, arr in enumerate(pool.map(lambda p: _decode(Path(p), size), paths)):
            out[i] = arr


def load_image_cache(
    ids: Sequence[str],
    paths: Sequence[str | Path],
    size: int,
    cache_dir: str | Path,
    name: str = "images",
    build: bool = True,
    *,
    workers: int,
    root: str | Path | None = None,
) -> ImageCache:
    """Return the cached array for (ids, paths, size), building it first when absent.

    ``paths`` are the image files (absolute or relative to the working directory), decoded on
    ``workers`` threads (``train.cache_workers`` / ``evaluate.cache_workers``). With
    ``build=False`` a missing cache raises :class:`FileNotFoundError` (used by non-zero DDP ranks
    that wait for rank 0 to build it).
    """
    ids = [str(i) for i in ids]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise DataError(f"duplicate image ids in cache request: {dup}")
    if len(ids) != len(paths):
        raise ValueError("ids and paths differ in length")
    cache_dir = Path(cache_dir)
    key = cache_key(ids, paths, size, root)
    target = cache_dir / f"{name}-{key[:20]}.npy"
    index = {image_id: row for row, image_id in enumerate(ids)}
    if not ids:
        return ImageCache(array=np.zeros((0, 3, size, size), np.uint8), index={}, path=None)
    if not target.is_file():
        if not build:
            raise FileNotFoundError(target)
        log.info("building image cache %s (%d images at %dpx)", target, len(ids), size)
        with atomic_path(target) as tmp:
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(ids), 3, size, size))
            build_array([Path(p) for p in paths], size, arr, workers)
            arr.flush()
            del arr
        for old in cache_dir.glob(f"{name}-*.npy"):
            if old != target:
                try:
                    old.unlink()
                except OSError:
                    pass
    else:
        log.info("reusing image cache %s", target)
    array = np.load(target, mmap_mode="r")
    if array.shape != (len(ids), 3, size, size) or array.dtype != np.uint8:
        raise DataError(f"{target}: cached array has shape {array.shape} {array.dtype}, expected {(len(ids), 3, size, size)} uint8")
    return ImageCache(array=array, index=index, path=target)


def in_memory_cache(ids: Sequence[str], images: np.ndarray) -> ImageCache:
    """An :class:`ImageCache` over an array already in memory (tests, small batches)."""
    return ImageCache(array=np.asarray(images, dtype=np.uint8), index={str(i): r for r, i in enumerate(ids)})
