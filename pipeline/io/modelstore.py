"""The model store: the exported inference model folder, written and read back (patent S3).

The ``select`` stage (:mod:`pipeline.stages.select`) picks the branch
(:func:`pipeline.core.selection.select_branch`) and calls :func:`export_inference`, which writes
(into a folder the stage replaces atomically):

``weights.pt``
    ``state_dict`` of the :class:`~pipeline.core.model.InferenceModel` (tensors only; loads with
    ``torch.load(..., weights_only=True)``).
``config.json``
    Everything needed to rebuild and feed the model: model config, ``num_classes``, ``classes``,
    ``image_size``, normalisation ``mean``/``std`` (from :mod:`pipeline.core.imaging`),
    ``selected_branch`` (1 or 2), ``val_loss_branch1``/``2``, ``best_epoch``,
    ``params_inference``, ``params_train``, the config digest of the training run.
``model.ts``
    A TorchScript module traced with ``torch.jit.trace`` (input: normalised float
    ``(N, 3, image_size, image_size)``, output: logits). TorchScript is deprecated in recent
    torch but still works in the pinned 2.14 and runs without Python model code (C++, mobile);
    if tracing fails, ``model.pt2`` from ``torch.export`` is written instead (``onnx`` is not a
    dependency). ``config.json["portable"]`` names the file written.

:func:`load_exported` rebuilds the eager model from ``config.json`` + ``weights.pt`` (used by
``evaluate``, ``predict``, the registry gate and the MLflow pyfunc); :func:`load_portable` loads the
TorchScript / ``torch.export`` module.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.config import ModelConfig
from pipeline.core.model import build_inference
from pipeline.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportedModel:
    """An exported inference model in eval mode on CPU, and its ``config.json``."""

    model: Any  # pipeline.core.model.InferenceModel
    meta: dict[str, Any]

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.meta["classes"])


def export_inference(model: torch.nn.Module, meta: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Write weights.pt, the portable module and config.json into ``folder``; returns the meta."""
    model = model.eval().cpu()
    torch.save(model.state_dict(), folder / "weights.pt")
    example = torch.zeros(1, 3, meta["image_size"], meta["image_size"])
    meta = dict(meta)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript deprecation notice
            traced = torch.jit.trace(model, example)
            torch.jit.save(traced, str(folder / "model.ts"))
        meta["portable"] = "model.ts"
    except Exception as exc:  # noqa: BLE001 - fall back to torch.export
        log.warning("TorchScript trace failed (%s); writing torch.export model.pt2", exc)
        batch = torch.export.Dim("batch", min=1, max=4096)
        program = torch.export.export(model, (example.expand(2, -1, -1, -1).clone(),), dynamic_shapes=({0: batch},))
        torch.export.save(program, str(folder / "model.pt2"))
        meta["portable"] = "model.pt2"
    (folder / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return meta


def load_exported(path: str | Path) -> ExportedModel:
    """Rebuild the eager inference model from an export folder (eval mode, CPU)."""
    folder = Path(path)
    cfg_path, w_path = folder / "config.json", folder / "weights.pt"
    if not cfg_path.is_file() or not w_path.is_file():
        raise DataError(f"{folder}: not an exported model folder (needs config.json and weights.pt)")
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
        mcfg = ModelConfig.model_validate(meta["model"])
        model = build_inference(mcfg, int(meta["num_classes"]))
        model.load_state_dict(torch.load(w_path, map_location="cpu", weights_only=True))
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        raise DataError(f"{folder}: cannot load exported model ({exc})") from None
    return ExportedModel(model=model.eval(), meta=meta)


def load_portable(path: str | Path) -> torch.nn.Module:
    """The TorchScript (or torch.export) module of an export folder."""
    folder = Path(path)
    meta = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    target = folder / meta.get("portable", "model.ts")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if target.suffix == ".ts":
            return torch.jit.load(str(target), map_location="cpu")
    return torch.export.load(str(target)).module()
