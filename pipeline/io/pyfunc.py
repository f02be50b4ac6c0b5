"""The MLflow model of skin-twin: one model folder with two flavours.

``python_function`` (this module is its ``loader_module``)
    Takes **images** (uint8 ``HxWx3`` arrays of any size: an ``(N, H, W, 3)`` array, a single
    ``(H, W, 3)`` array, a list of arrays, or a DataFrame whose ``image`` column (or only column)
    holds arrays / nested lists) and returns a DataFrame of the seven class probabilities, one
    column per class in :data:`pipeline.labels.CLASSES` order. Preprocessing is the project's
    own (:func:`pipeline.core.inference.predict_proba`: RGB, square resize to the model size,
    normalisation), so it predicts exactly what the exported model folder predicts. The export
    folder (``weights.pt``, ``config.json``, ``model.ts``) travels inside the MLflow model under
    ``data/export`` and the ``pipeline`` package under ``code/``; no pickled Python objects.
``pytorch``
    ``mlflow.pytorch.load_model(uri)`` gives the inference network (extractor + selected
    branch) as a ``torch.export`` program (``pytorch/model.pt2``, the pickle-free "pt2" format):
    input normalised float ``(N, 3, S, S)``, output logits ``(N, 7)``, dynamic batch.

:func:`log_model` logs it with :meth:`mlflow.models.Model.log` (this module is the "flavour
module" whose :func:`save_model` writes the folder), so it is an MLflow 3 LoggedModel of the run
and can be registered as one model version that loads with either flavour.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core.inference import predict_proba
from pipeline.io.modelstore import load_exported
from pipeline.labels import CLASSES

log = logging.getLogger(__name__)

FLAVOR_NAME = "skin_twin"
EXPORT_SUBDIR = "export"  # data/export inside the MLflow model folder
SERVING_FILE = "serving.json"  # data/export/serving.json: pyfunc settings (batch size)
PYTORCH_SUBDIR = "pytorch"  # pytorch/model.pt2
# Distributions the pyfunc needs at load time (explicit: requirement inference costs seconds).
_REQUIREMENTS = ("torch", "numpy", "pandas", "pillow", "pydantic", "pyyaml")


def pip_requirements() -> list[str]:
    """Pinned requirements of the installed versions (mlflow is added by MLflow itself)."""
    out = []
    for dist in _REQUIREMENTS:
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out.append(dist)
            continue
        out.append(f"{dist}=={version.split('+')[0]}")
    return out


# --------------------------------------------------------------------------------------------
# input handling (pure)
# --------------------------------------------------------------------------------------------


def _as_image(x: Any, i: int) -> np.ndarray:
    arr = x if isinstance(x, np.ndarray) else np.asarray(x)
    if arr.dtype != np.uint8:
        if arr.dtype.kind in "iuf" and arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError(f"image {i}: pixel values outside 0..255")
        if arr.dtype.kind not in "iuf":
            raise ValueError(f"image {i}: expected numeric pixels, got {arr.dtype}")
        arr = arr.astype(np.uint8)
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(f"image {i}: expected an HxWx3 array, got shape {arr.shape}")
    return arr


def to_images(model_input: Any) -> list[np.ndarray]:
    """Any supported batch -> list of uint8 HxWxC arrays (pure). Raises ``ValueError``."""
    if isinstance(model_input, pd.DataFrame):
        col = "image" if "image" in model_input.columns else None
        if col is None:
            if model_input.shape[1] != 1:
                raise ValueError(f"DataFrame input needs an 'image' column, got {list(model_input.columns)}")
            col = model_input.columns[0]
        return [_as_image(v, i) for i, v in enumerate(model_input[col].tolist())]
    if isinstance(model_input, dict):
        if "image" not in model_input:
            raise ValueError(f"dict input needs an 'image' key, got {sorted(model_input)}")
        return to_images(model_input["image"])
    if isinstance(model_input, np.ndarray):
        if model_input.dtype == object:
            return [_as_image(v, i) for i, v in enumerate(model_input)]
        if model_input.ndim == 4:
            return [_as_image(v, i) for i, v in enumerate(model_input)]
        if model_input.ndim == 3:
            return [_as_image(model_input, 0)]
        raise ValueError(f"expected (N, H, W, 3) or (H, W, 3) pixels, got shape {model_input.shape}")
    if isinstance(model_input, (list, tuple)):
        return [_as_image(v, i) for i, v in enumerate(model_input)]
    raise ValueError(f"unsupported input type {type(model_input).__name__}")


# --------------------------------------------------------------------------------------------
# pyfunc side
# --------------------------------------------------------------------------------------------


class SkinTwinClassifier:
    """What ``mlflow.pyfunc.load_model`` wraps: images in, class probabilities out."""

    def __init__(self, export_dir: str | Path, batch_size: int) -> None:
        self.export_dir = Path(export_dir)
        self.exported = load_exported(self.export_dir)
        self.batch_size = int(batch_size)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.exported.classes

    def predict_proba(self, model_input: Any) -> np.ndarray:
        return predict_proba(self.exported, to_images(model_input), self.batch_size)

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> pd.DataFrame:  # noqa: ARG002
        return pd.DataFrame(self.predict_proba(model_input), columns=list(self.classes))


def _load_pyfunc(data_path: str) -> SkinTwinClassifier:
    """MLflow's entry point for the ``python_function`` flavour (``loader_module``)."""
    serving = json.loads((Path(data_path) / SERVING_FILE).read_text(encoding="utf-8"))
    return SkinTwinClassifier(data_path, int(serving["batch_size"]))


# --------------------------------------------------------------------------------------------
# saving / logging
# --------------------------------------------------------------------------------------------


def signature(image_size: int):  # noqa: ARG001 - images of any size are accepted
    """Output schema: one probability column per class.

    No *input* schema on purpose: MLflow's tensor-schema enforcement accepts only one
    same-sized ``ndarray`` batch and would refuse lists of differently sized images, a single
    ``HxWx3`` image or a DataFrame of images, which :func:`to_images` all handle (and checks).
    The input example (a uint8 ``(2, S, S, 3)`` batch) documents the format.
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(inputs=None, outputs=Schema([ColSpec("double", c) for c in CLASSES]))


def input_example(image_size: int, n: int = 2, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, image_size, image_size, 3), dtype=np.uint8)


def _export_pt2(export_dir: Path, target: Path) -> None:
    """The eager inference model as a ``torch.export`` program with a dynamic batch dimension."""
    import torch

    exported = load_exported(export_dir)
    size = exported.image_size
    example = torch.zeros(2, 3, size, size)
    program = torch.export.export(exported.model, (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(target))


def save_model(
    path: str | Path, export_dir: str | Path, batch_size: int, mlflow_model: Any = None, **kwargs: Any
) -> None:
    """Write the two-flavour MLflow model folder at ``path`` from an export folder.

    ``batch_size`` (``predict.batch_size``) is how many images the pyfunc runs through the network
    at once; it travels in ``data/export/serving.json``. ``kwargs`` go to
    :func:`mlflow.pyfunc.save_model` (``pip_requirements``, ``metadata``, ...); signature and input
    example default to the image interface.
    """
    import mlflow.pyfunc
    import torch
    from mlflow.models import Model

    export_dir = Path(export_dir)
    meta = json.loads((export_dir / "config.json").read_text(encoding="utf-8"))
    size = int(meta["image_size"])
    if mlflow_model is None:
        mlflow_model = Model()
    kwargs.setdefault("signature", signature(size))
    kwargs.setdefault("input_example", input_example(size))
    kwargs.setdefault("pip_requirements", pip_requirements())
    kwargs.setdefault("code_paths", [str(Path(__file__).resolve().parents[1])])  # the pipeline package
    path = Path(path)
    # MLflow copies data_path to data/<basename>: stage the export under the fixed name "export".
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / EXPORT_SUBDIR
        shutil.copytree(export_dir, staged, ignore=shutil.ignore_patterns(".*", "__pycache__"))
        (staged / SERVING_FILE).write_text(json.dumps({"batch_size": int(batch_size)}) + "\n", encoding="utf-8")
        mlflow.pyfunc.save_model(
            str(path), loader_module=__name__, data_path=str(staged), mlflow_model=mlflow_model, **kwargs
        )
    # second flavour: the network itself for mlflow.pytorch.load_model
    _export_pt2(export_dir, path / PYTORCH_SUBDIR / "model.pt2")
    mlflow_model.add_flavor(
        "pytorch",
        model_data=PYTORCH_SUBDIR,
        pytorch_version=str(torch.__version__),
        serialization_format="pt2",
        code=None,
    )
    mlflow_model.add_flavor(
        FLAVOR_NAME,
        export=f"data/{EXPORT_SUBDIR}",
        image_size=size,
        classes=list(meta.get("classes", CLASSES)),
        selected_branch=meta.get("selected_branch"),
    )
    mlflow_model.save(str(path / "MLmodel"))
    # drop bytecode copied with the code path
    for pycache in path.rglob("__pycache__"):
        shutil.rmtree(pycache, ignore_errors=True)


def log_model(export_dir: str | Path, batch_size: int, name: str = "model", **kwargs: Any):
    """Log the export folder as the run's MLflow model (a LoggedModel); returns ``ModelInfo``."""
    from mlflow.models import Model

    return Model.log(
        artifact_path=None, name=name, flavor=sys.modules[__name__], export_dir=str(export_dir),
        batch_size=batch_size, **kwargs,
    )  # fmt: skip


def export_dir_of(model_dir: str | Path) -> Path:
    """The export folder inside a downloaded MLflow model folder."""
    folder = Path(model_dir) / "data" / EXPORT_SUBDIR
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a skin-twin MLflow model (no data/{EXPORT_SUBDIR}/config.json)")
    return folder
