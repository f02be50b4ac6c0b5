"""Training checkpoints on disk: ``last.pt`` (resumable state) and ``best.pt`` (lowest val loss).

Safety: both files are read with ``torch.load(..., weights_only=True)``, which refuses anything but
tensors and plain containers/values, so a crafted pickle placed where a checkpoint is expected can
never run code. Everything the train stage keeps is stored in that form: the numpy and Python RNG
states (tuples holding arrays) are converted to tensors and ints by :func:`encode_rng` and back by
:func:`decode_rng`.

* Written atomically (temporary file renamed onto the target), so a kill never leaves a half-written
  checkpoint; a failed write (disk full, read-only folder) is a :class:`~pipeline.errors.StorageError`
  naming the file, and the previous checkpoint stays as it was.
* :func:`load_resumable` returns the checkpoint when it belongs to these params and data (digest),
  ``None`` (logged) when there is none or it belongs to other params/data (then training starts
  fresh, as asked). A file that is not a readable skin-twin checkpoint -- corrupt, foreign, or
  unsafe content -- is **refused**: it is moved aside to ``<name>.rejected-<UTC time>`` for
  inspection and a :class:`~pipeline.errors.PipelineError` says so; the next run starts fresh.
"""

from __future__ import annotations

import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import Config
from pipeline.core.training import TrainData, set_rng_state
from pipeline.errors import PipelineError, StorageError
from pipeline.labels import CLASSES, NUM_CLASSES
from pipeline.io.files import atomic_path

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 2  # 2: weights_only-safe RNG states (format 1 pickled numpy/python objects)
REQUIRED_RESUMABLE = ("format", "digest", "epoch", "model", "optimizer", "scheduler", "rng", "history", "best")
BEST_KEYS = ("model", "epoch", "val_loss_branch1", "val_loss_branch2", "model_config", "num_classes", "image_size")


def save(path: Path, obj: Any) -> None:
    """``torch.save`` atomically; storage failures become :class:`StorageError` naming the file."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            torch.save(obj, tmp)
    except OSError as exc:
        raise StorageError(f"{path}: cannot write checkpoint: {exc.strerror or exc}") from exc
    except RuntimeError as exc:  # the zip writer reports ENOSPC / EFBIG as RuntimeError("... file write failed")
        raise StorageError(f"{path}: cannot write checkpoint: {' '.join(str(exc).split())[-200:]}") from exc


# --------------------------------------------------------------------------------------------
# RNG states in weights_only form
# --------------------------------------------------------------------------------------------


def encode_rng(state: dict[str, Any]) -> dict[str, Any]:
    """:func:`pipeline.core.training.rng_state` -> tensors and plain values only."""
    name, keys, pos, has_gauss, cached = state["numpy"]
    version, internal, gauss_next = state["python"]
    return {
        "torch": state["torch"],
        "cuda": list(state["cuda"]),
        "flip": state["flip"],
        "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},  # fmt: skip
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": None if gauss_next is None else float(gauss_next)},  # fmt: skip
    }


def decode_rng(enc: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`encode_rng`."""
    n, p = enc["numpy"], enc["python"]
    return {
        "torch": enc["torch"],
        "cuda": list(enc["cuda"]),
        "flip": enc["flip"],
        "numpy": (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]),
        "python": (p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]),
    }


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def quarantine(path: Path, reason: str) -> Path:
    """Move a refused file aside (``<name>.rejected-<UTC time>``) and return where it went."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    target = path.with_name(f"{path.name}.rejected-{stamp}")
    os.replace(path, target)
    log.error("%s: refused (%s); moved to %s", path, reason, target)
    return target


def _refuse(path: Path, reason: str) -> PipelineError:
    moved = quarantine(path, reason)
    return PipelineError(
        f"{path}: refused: {reason}; moved aside to {moved.name} for inspection (re-run to start training fresh)"
    )


def load_resumable(path: Path, digest: str) -> dict[str, Any] | None:
    """The resumable checkpoint at ``path`` if it matches ``digest``; None when absent or for other
    params/data (logged); a refused file raises :class:`PipelineError` (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unsafe globals, truncated zip, random bytes: all refused
        raise _refuse(path, f"not a safe, readable checkpoint ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise _refuse(path, f"not a skin-twin checkpoint of format {CHECKPOINT_FORMAT} (found {found!r})")
    missing = [k for k in REQUIRED_RESUMABLE if k not in ckpt]
    if missing:
        raise _refuse(path, f"checkpoint is missing {missing}")
    if ckpt["digest"] != digest:
        log.warning("%s: checkpoint belongs to other params or data (digest differs); starting fresh", path)
        return None
    ckpt["rng"] = [decode_rng(r) for r in ckpt["rng"]]
    return ckpt


def load_best(path: str | Path) -> dict[str, Any]:
    """Read ``best.pt`` (weights_only) and check its keys. Raises :class:`PipelineError`."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: not found (run the train stage first)")
    try:
        best = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise PipelineError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    if not isinstance(best, dict):
        raise PipelineError(f"{path}: not a best-state checkpoint (a {type(best).__name__})")
    missing = [k for k in BEST_KEYS if k not in best]
    if missing:
        raise PipelineError(f"{path}: not a best-state checkpoint, missing {missing}")
    return best


def best_payload(
    best: dict[str, Any], cfg: Config, data: TrainData, counts: dict[str, int], digest: str,
    pretrained: dict[str, str] | None = None,
) -> dict[str, Any]:
    """``best.pt`` of the lowest-loss state ``best``: only tensors and plain values, so
    ``torch.load(weights_only=True)`` reads it. ``pretrained``: where a backbone's weights came
    from (:meth:`pipeline.io.pretrained.PretrainedWeights.lineage`), carried into the export."""
    return {
        "format": CHECKPOINT_FORMAT,
        "model": best["state"],
        "epoch": int(best["epoch"]),
        "val_loss_branch1": float(best["val_loss_branch1"]),
        "val_loss_branch2": float(best["val_loss_branch2"]),
        "val_loss_discriminator": float(best["val_loss_discriminator"]),
        "val_loss_total": float(best["val_loss_total"]),
        "model_config": cfg.model.recorded(),
        "num_classes": NUM_CLASSES,
        "classes": list(CLASSES),
        "image_size": int(data.image_size),
        "params_train": int(counts["params_train"]),
        "params_inference": int(counts["params_inference"]),
        "train_digest": digest,
        "config_digest": cfg.digest(),
        **({"preprocess": dict(data.preprocess)} if data.preprocess.get("color_constancy", "none") != "none" else {}),
        **({"pretrained": dict(pretrained)} if pretrained else {}),
    }


def last_payload(
    digest: str, epoch: int, parts: dict[str, Any], rng: list[dict[str, Any]], history: list[dict[str, float]],
    best: dict[str, Any],
) -> dict[str, Any]:
    """``last.pt`` after 1-based ``epoch``: ``parts`` are the state dicts of the resumable pieces
    (``model``, ``optimizer``, ``scheduler``, ``scaler``, ``swa``), ``rng`` every rank's RNG states."""
    return {"format": CHECKPOINT_FORMAT, "digest": digest, "epoch": int(epoch), **parts,
            "rng": [encode_rng(r) for r in rng], "history": history, "best": best}  # fmt: skip


def restore(ckpt: dict[str, Any], parts: dict[str, Any], gen: torch.Generator, rank: int, world: int) -> None:
    """Load a resumable checkpoint into ``parts`` (objects with ``load_state_dict``, by the names
    :func:`last_payload` stores them under; a part the checkpoint has not, e.g. no grad scaler on
    the CPU, is left as it is) and this rank's RNG states (when the world size is unchanged)."""
    for name, part in parts.items():
        if ckpt.get(name):
            part.load_state_dict(ckpt[name])
    if len(ckpt["rng"]) == world:
        set_rng_state(ckpt["rng"][rank], gen)
