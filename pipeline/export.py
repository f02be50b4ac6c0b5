"""Select the recognition branch and export the inference model (patent S3).

``run_select(cfg)`` loads ``best.pt`` (the lowest-validation-loss state of the twin, S2), picks the
branch whose **validation classification loss** is lower (:func:`select_branch`, branch 1 on a
tie), keeps the shared feature extractor + that branch (:func:`pipeline.model.inference_model`)
and writes the export folder :attr:`pipeline.layout.Layout.export_dir` atomically:

``weights.pt``
    ``state_dict`` of the :class:`~pipeline.model.InferenceModel` (tensors only; loads with
    ``torch.load(..., weights_only=True)``).
``config.json``
    Everything needed to rebuild and feed the model: model config, ``num_classes``, ``classes``,
    ``image_size``, normalisation ``mean``/``std`` (from :mod:`pipeline.preprocess`),
    ``selected_branch`` (1 or 2), ``val_loss_branch1``/``2``, ``best_epoch``,
    ``params_inference``, ``params_train``, the config digest of the training run.
``model.ts``
    A TorchScript module traced with ``torch.jit.trace`` (input: normalised float
    ``(N, 3, image_size, image_size)``, output: logits). TorchScript is deprecated in recent
    torch but still works in the pinned 2.14 and runs without Python model code (C++, mobile);
    if tracing fails, ``model.pt2`` from ``torch.export`` is written instead (``onnx`` is not a
    dependency). ``config.json["portable"]`` names the file written.

The select stage reads everything it needs from ``best.pt`` (model config, image size, losses),
not from ``params.yaml``: the exported model always matches the weights that were trained.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.config import Config, ModelConfig
from pipeline.errors import DataError, PipelineError
from pipeline.fileio import atomic_dir
from pipeline.labels import CLASSES
from pipeline.layout import Layout
from pipeline.preprocess import MEAN, STD

log = logging.getLogger(__name__)

EXPORT_FORMAT = 1


@dataclass(frozen=True)
class ExportedModel:
    """An exported inference model in eval mode on CPU, and its ``config.json``."""

    model: Any  # pipeline.model.InferenceModel
    meta: dict[str, Any]

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.meta["classes"])


def select_branch(val_loss_branch1: float, val_loss_branch2: float) -> int:
    """The branch (1 or 2) with the lower validation classification loss; 1 on a tie."""
    return 1 if val_loss_branch1 <= val_loss_branch2 else 2


def load_best(path: str | Path) -> dict[str, Any]:
    """Read ``best.pt`` (weights_only) and check its keys. Raises :class:`PipelineError`."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: not found (run the train stage first)")
    try:
        best = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise PipelineError(f"{path}: cannot read checkpoint ({exc})") from None
    need = ("model", "epoch", "val_loss_branch1", "val_loss_branch2", "model_config", "num_classes", "image_size")
    missing = [k for k in need if k not in best]
    if missing:
        raise PipelineError(f"{path}: not a best-state checkpoint, missing {missing}")
    return best


def build_meta(best: dict[str, Any], selected: int, params_inference: int) -> dict[str, Any]:
    """The ``config.json`` of an export (pure)."""
    return {
        "format": EXPORT_FORMAT,
        "model": best["model_config"],
        "num_classes": int(best["num_classes"]),
        "classes": list(best.get("classes", CLASSES)),
        "image_size": int(best["image_size"]),
        "mean": list(MEAN),
        "std": list(STD),
        "selected_branch": int(selected),
        "val_loss_branch1": float(best["val_loss_branch1"]),
        "val_loss_branch2": float(best["val_loss_branch2"]),
        "val_loss_discriminator": float(best.get("val_loss_discriminator", float("nan"))),
        "val_loss_total": float(best.get("val_loss_total", float("nan"))),
        "best_epoch": int(best["epoch"]),
        "params_inference": int(params_inference),
        "params_train": int(best.get("params_train", 0)),
        "config_digest": str(best.get("config_digest", "")),
        "train_digest": str(best.get("train_digest", "")),
    }


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


def run_select(cfg: Config) -> dict[str, Any]:
    """The ``select`` stage: best.pt -> the export folder. Returns a summary."""
    from pipeline.model import build_twin, count_parameters, inference_model

    layout = Layout.from_config(cfg)
    best_path = layout.train_dir / "best.pt"
    best = load_best(best_path)
    selected = select_branch(float(best["val_loss_branch1"]), float(best["val_loss_branch2"]))
    mcfg = ModelConfig.model_validate(best["model_config"])
    twin = build_twin(mcfg, int(best["num_classes"]))
    try:
        twin.load_state_dict(best["model"])
    except RuntimeError as exc:
        raise PipelineError(f"{best_path}: weights do not fit the stored model config ({exc})") from None
    inf = inference_model(twin, selected - 1).eval()
    meta = build_meta(best, selected, count_parameters(inf))
    with atomic_dir(layout.export_dir) as tmp:
        meta = export_inference(inf, meta, tmp)
    log.info(
        "selected branch %d (val loss %.4f vs %.4f) of epoch %d -> %s",
        selected,
        meta["val_loss_branch1"],
        meta["val_loss_branch2"],
        meta["best_epoch"],
        layout.export_dir,
    )
    return {
        "selected_branch": selected,
        "best_epoch": meta["best_epoch"],
        "val_loss_branch1": meta["val_loss_branch1"],
        "val_loss_branch2": meta["val_loss_branch2"],
        "params_inference": meta["params_inference"],
        "params_train": meta["params_train"],
        "export_dir": str(layout.export_dir),
        "portable": meta["portable"],
    }


def load_exported(path: str | Path) -> ExportedModel:
    """Rebuild the eager inference model from an export folder (eval mode, CPU)."""
    from pipeline.model import build_inference

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
