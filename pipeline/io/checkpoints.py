"""Training checkpoints on disk: ``last.pt`` (resumable state) and ``best.pt`` (lowest val loss).

Both are written atomically (a temporary file renamed onto the target), so a kill never leaves a
half-written checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import PipelineError
from pipeline.io.files import atomic_path

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


def save(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_resumable(path: Path, digest: str) -> dict[str, Any] | None:
    """The resumable checkpoint at ``path`` if it matches ``digest``, else None (logged)."""
    if not path.is_file():
        return None
    try:
        # Our own file, written atomically by the train stage; it holds numpy/python RNG states,
        # hence weights_only=False (best.pt, the file other stages read, is weights_only-safe).
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint means: start fresh
        log.warning("%s: unreadable checkpoint (%s); starting fresh", path, exc)
        return None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        log.warning("%s: unknown checkpoint format; starting fresh", path)
        return None
    if ckpt.get("digest") != digest:
        log.warning("%s: checkpoint belongs to other params or data (digest differs); starting fresh", path)
        return None
    return ckpt


BEST_KEYS = ("model", "epoch", "val_loss_branch1", "val_loss_branch2", "model_config", "num_classes", "image_size")


def load_best(path: str | Path) -> dict[str, Any]:
    """Read ``best.pt`` (weights_only) and check its keys. Raises :class:`PipelineError`."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: not found (run the train stage first)")
    try:
        best = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise PipelineError(f"{path}: cannot read checkpoint ({exc})") from None
    missing = [k for k in BEST_KEYS if k not in best]
    if missing:
        raise PipelineError(f"{path}: not a best-state checkpoint, missing {missing}")
    return best
