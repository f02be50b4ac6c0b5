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

``config.json`` also records ``weights_sha256`` and ``portable_sha256``, the digests of the two model
files, so a folder is verified before anything in it is used.

How the model is *used* is recorded beside it, and every consumer applies it through
:mod:`pipeline.core.inference` (all four keys are optional: an export written before them loads as
arg-max, no colour constancy, no TTA, no calibration):

``preprocess``
    ``{color_constancy: none|shades_of_gray, sog_power}`` -- the colour constancy of training
    (``augment.color_constancy``), applied to every resized image before the network.
``tta``
    ``none`` | ``flips`` (``select.tta``): probabilities are the mean over the 8 flip/transpose views.
``calibration``
    ``{method: none|temperature|temperature_bias, temperature, bias: [7 floats] | null}``
    (``select.calibration``): every reported probability is ``softmax(log p / temperature + bias)``
    of the (view-averaged) softmax ``p``.
``decision``
    ``{rule: argmax|offsets, offsets: [7 floats] | null}`` (``select.decision_rule``): the label
    is ``argmax(log p + offsets)`` of the reported (calibrated) probabilities, which it never changes.

:func:`load_exported` rebuilds the eager model from ``config.json`` + ``weights.pt`` (used by
``evaluate``, ``predict``, the registry gate and the MLflow pyfunc) and **verifies** the folder
first: ``config.json`` must match the :class:`ExportMeta` schema (a missing ``image_size``, a size of
0, a wrong class list... is a clear error naming the file and key), ``weights.pt`` must have the
recorded sha256 (tampered, swapped or half-copied files are refused before they are read), it is
read with ``weights_only=True`` (never unpickled into code), its tensors must fit the recorded model
config and be finite. Every refusal is a :class:`~pipeline.errors.DataError`. :func:`load_portable`
checks ``portable_sha256`` before loading the TorchScript / ``torch.export`` module.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.config import ModelConfig
from pipeline.core.calibration import A_MAX, A_MIN
from pipeline.core.imaging import MEAN, STD
from pipeline.core.inference import inference_ready
from pipeline.core.model import build_inference
from pipeline.core.selection import EXPORT_FORMAT
from pipeline.errors import DataError, StorageError
from pipeline.io.digests import file_sha256
from pipeline.labels import CLASSES

log = logging.getLogger(__name__)


class DecisionMeta(BaseModel):
    """``decision`` of ``config.json``: the decision rule (:mod:`pipeline.core.decision`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    rule: Literal["argmax", "offsets"] = "argmax"
    offsets: list[float] | None = None

    @model_validator(mode="after")
    def _offsets(self) -> DecisionMeta:
        if self.rule == "offsets":
            if self.offsets is None or len(self.offsets) != len(CLASSES):
                raise ValueError(f"rule 'offsets' needs {len(CLASSES)} offsets, got {self.offsets}")
            if any(abs(v) > 100 for v in self.offsets):
                raise ValueError("offsets must be within [-100, 100]")
        elif self.offsets is not None:
            raise ValueError("rule 'argmax' takes no offsets (set them to null)")
        return self


class CalibrationMeta(BaseModel):
    """``calibration`` of ``config.json``: the map applied to every reported probability
    (:mod:`pipeline.core.calibration`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    method: Literal["none", "temperature", "temperature_bias"] = "none"
    temperature: float = Field(1.0, ge=1 / A_MAX, le=1 / A_MIN)
    bias: list[float] | None = None

    @model_validator(mode="after")
    def _bias(self) -> CalibrationMeta:
        if self.method == "none":
            if self.temperature != 1.0 or self.bias is not None:
                raise ValueError("method 'none' takes temperature 1 and no bias (set it to null)")
            return self
        if self.bias is None or len(self.bias) != len(CLASSES):
            raise ValueError(f"method {self.method!r} needs {len(CLASSES)} biases, got {self.bias}")
        if any(abs(v) > 100 for v in self.bias):
            raise ValueError("biases must be within [-100, 100]")
        if self.method == "temperature" and any(v != 0 for v in self.bias):
            raise ValueError("method 'temperature' takes zero biases")
        return self


class PreprocessMeta(BaseModel):
    """``preprocess`` of ``config.json``: the colour constancy the model was trained with."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    color_constancy: Literal["none", "shades_of_gray"] = "none"
    sog_power: float = Field(6.0, ge=1, le=32)


class ExportMeta(BaseModel):
    """The schema of an export's ``config.json`` (extra keys are kept and ignored)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False, protected_namespaces=())

    format: int
    model: ModelConfig
    num_classes: int = Field(ge=2, le=1000)
    classes: list[str]
    image_size: int = Field(ge=16, le=1024)
    mean: list[float] = Field(min_length=3, max_length=3)
    std: list[float] = Field(min_length=3, max_length=3)
    selected_branch: int = Field(ge=1, le=2)
    val_loss_branch1: float
    val_loss_branch2: float
    best_epoch: int = Field(ge=1)
    params_inference: int = Field(ge=1)
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    portable: str = Field(pattern=r"^model\.(ts|pt2)$")
    portable_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    # Optional (exports written before them load as: arg-max, no colour constancy, no TTA).
    decision: DecisionMeta = DecisionMeta()
    preprocess: PreprocessMeta = PreprocessMeta()
    tta: Literal["none", "flips"] = "none"
    calibration: CalibrationMeta = CalibrationMeta()

    @field_validator("mean", "std")
    @classmethod
    def _normalisation(cls, v: list[float], info: Any) -> list[float]:
        # every inference path normalises with pipeline.core.imaging.MEAN / STD (ImageNet's, both families)
        want = list(MEAN if info.field_name == "mean" else STD)
        if any(abs(a - b) > 1e-6 for a, b in zip(v, want, strict=True)):
            raise ValueError(f"normalisation {v} is not the {want} this release applies (re-export the model)")
        return v

    @field_validator("format")
    @classmethod
    def _format(cls, v: int) -> int:
        if v != EXPORT_FORMAT:
            raise ValueError(f"export format {v} is not {EXPORT_FORMAT} (re-export the model with this version)")
        return v

    @field_validator("std")
    @classmethod
    def _std(cls, v: list[float]) -> list[float]:
        if any(x <= 0 for x in v):
            raise ValueError("std values must be > 0")
        return v

    @model_validator(mode="after")
    def _classes(self) -> "ExportMeta":
        if len(self.classes) != self.num_classes:
            raise ValueError(f"classes has {len(self.classes)} names for num_classes={self.num_classes}")
        if tuple(self.classes) != CLASSES:
            raise ValueError(f"classes {self.classes} are not this project's {list(CLASSES)}")
        return self


def read_meta(folder: Path) -> dict[str, Any]:
    """``config.json`` of an export folder, schema-checked. Raises :class:`DataError` naming the key."""
    cfg_path = folder / "config.json"
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{folder}: not an exported model folder (needs config.json and weights.pt)") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{cfg_path}: not readable JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{cfg_path}: expected a JSON object, got {type(raw).__name__}")
    try:
        ExportMeta.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {str(e['msg']).removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        raise DataError(f"{cfg_path}: invalid export config: {problems}") from None
    return raw


def _verify_digest(path: Path, expected: str, what: str) -> None:
    actual = file_sha256(path)
    if actual is None:
        raise DataError(f"{path}: missing ({what} of the export)")
    if actual != expected:
        raise DataError(
            f"{path}: sha256 {actual[:12]}... differs from the {expected[:12]}... recorded in config.json "
            "(tampered, swapped or incompletely copied); refusing to load it"
        )


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
    """Write weights.pt, the portable module and config.json (with both digests) into ``folder``."""
    model = model.eval().cpu().to(memory_format=torch.contiguous_format)  # files as trained, whatever the run's format
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise DataError(f"refusing to export a model with non-finite weights in {bad[:5]}")
    try:
        torch.save(model.state_dict(), folder / "weights.pt")
    except (OSError, RuntimeError) as exc:  # RuntimeError: the zip writer's "file write failed"
        raise StorageError(f"{folder / 'weights.pt'}: cannot write: {' '.join(str(exc).split())[-200:]}") from exc
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
    meta["weights_sha256"] = file_sha256(folder / "weights.pt")
    meta["portable_sha256"] = file_sha256(folder / meta["portable"])
    ExportMeta.model_validate(meta)  # what we write must be what load_exported accepts
    (folder / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return meta


def load_exported(path: str | Path) -> ExportedModel:
    """Rebuild the eager inference model from a verified export folder (CPU, eval mode, channels-last:
    :func:`pipeline.core.inference.inference_ready`)."""
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"{folder}: model folder not found")
    w_path = folder / "weights.pt"
    if not w_path.is_file():
        raise DataError(f"{folder}: not an exported model folder (needs config.json and weights.pt)")
    meta = read_meta(folder)
    _verify_digest(w_path, meta["weights_sha256"], "weights")
    try:
        state = torch.load(w_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - not a plain tensor file: refuse, never unpickle code
        raise DataError(f"{w_path}: not a readable weights file ({type(exc).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"{w_path}: not a state dict of tensors")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise DataError(f"{w_path}: non-finite weights in {bad[:5]}{' ...' if len(bad) > 5 else ''}; refusing to use it")
    model = build_inference(ModelConfig.model_validate(meta["model"]), int(meta["num_classes"]))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:300]
        raise DataError(f"{w_path}: weights do not fit the model config in config.json ({first})") from None
    return ExportedModel(model=inference_ready(model), meta=meta)


def load_portable(path: str | Path) -> torch.nn.Module:
    """The TorchScript (or torch.export) module of an export folder, after its digest check."""
    folder = Path(path)
    meta = read_meta(folder)
    target = folder / meta["portable"]
    _verify_digest(target, meta["portable_sha256"], "portable module")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if target.suffix == ".ts":
            return torch.jit.load(str(target), map_location="cpu")
    return torch.export.load(str(target)).module()
