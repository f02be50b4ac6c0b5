"""Writing the augmented images: decode each source once, write its copies, in worker processes.

The transforms themselves are the pure :mod:`pipeline.core.augment`; this module owns the files and
the process pool. ``workers`` processes (``spawn``: torch and fork do not mix well), each with one
torch thread; each task is one source image with all its copies. Processes, not threads, because
v2 transforms draw from torch's global RNG. Inside a daemonic process (Celery prefork), where
children are not allowed, the work runs in-process.
"""

from __future__ import annotations

import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

from pipeline.config import AugmentConfig
from pipeline.core.augment import augment_image, build_transform, color_corrected
from pipeline.core.imaging import resize_square
from pipeline.io.images import load_rgb

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WriteTask:
    source: str  # absolute path of the source image
    outputs: tuple[tuple[str, int, int], ...]  # (absolute output path, copy, seed)
    color: bool = False  # apply augment.color_constancy before the copies (train images)


_TRANSFORM: Any = None
_CFG: AugmentConfig | None = None


def _init_worker(cfg_json: str) -> None:
    import torch

    global _TRANSFORM, _CFG
    torch.set_num_threads(1)
    _CFG = AugmentConfig.model_validate_json(cfg_json)
    _TRANSFORM = build_transform(_CFG)


def _process(task: WriteTask) -> str | None:
    """Write every output of one source image; returns an error message instead of raising
    (``storage:`` first when the machine, not the image, is the problem)."""
    assert _CFG is not None
    try:
        base = resize_square(load_rgb(task.source), _CFG.image_size)
    except Exception as exc:  # noqa: BLE001 - any decode failure is bad input
        return f"{task.source}: cannot read image: {exc}"
    if task.color:
        base = color_corrected(base, _CFG)
    out = ""
    try:
        for out, copy, seed in task.outputs:
            img = base if copy == 0 else augment_image(base, _TRANSFORM, seed)
            img.save(out, format="PNG")
    except OSError as exc:
        return f"{STORAGE}{out}: cannot write augmented image: {exc.strerror or exc}"
    return None


STORAGE = "storage:"


def write_all(tasks: list[WriteTask], cfg: AugmentConfig) -> list[str]:
    """Run every task; returns the error messages (empty when all images were written).
    Messages about the disk (not the images) start with :data:`STORAGE`."""
    cfg_json = cfg.model_dump_json()
    daemon = multiprocessing.current_process().daemon
    if daemon and cfg.workers > 1:
        log.warning("augment: running inside a daemonic process (e.g. a Celery worker); using 1 worker")
    if cfg.workers <= 1 or len(tasks) <= 1 or daemon:
        _init_worker(cfg_json)
        return [e for e in map(_process, tasks) if e]
    chunk = max(1, len(tasks) // (cfg.workers * 8))
    with ProcessPoolExecutor(
        max_workers=cfg.workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(cfg_json,),
    ) as pool:
        return [e for e in pool.map(_process, tasks, chunksize=chunk) if e]
