"""The MLflow model of skin-twin: one model folder with two flavours.

``python_function`` (this module is its ``loader_module``)
    Takes **image files**: a DataFrame whose ``image`` column holds the bytes of encoded images
    (JPEG, PNG, ... any size or mode; the signature's input schema, enforced by MLflow, and what a
    serving request sends base64-encoded) and returns a DataFrame with ``label`` (the class the
    export's decision rule picks: :func:`pipeline.core.inference.predicted_labels`, arg-max for
    exports without a rule) and the seven class probabilities, one column per class in
    :data:`pipeline.labels.CLASSES` order (the softmax, with the export's test-time augmentation
    and calibration; the rule never changes them). Preprocessing is the project's own
    (:func:`pipeline.core.inference.predict_proba`: RGB, square resize to the model size, the
    export's colour constancy, normalisation), so it predicts exactly what the exported model
    folder predicts with ``predict``, ``evaluate`` and the gate. Colour constancy, TTA, calibration and
    the decision rule come from the export's ``config.json``, never from the serving side's params. The export
    folder (``weights.pt``, ``config.json``, ``model.ts``) travels inside the MLflow model under
    ``data/export`` and, under ``code/pipeline``, the part of the ``pipeline`` package that inference
imports (:func:`stage_bundle`); no pickled Python objects. ``skin_twin_files.json`` holds the sha256
of every file below ``code/``, ``data/`` and ``pytorch/``; the loader checks itself against it.
``pytorch``
    ``mlflow.pytorch.load_model(uri)`` gives the inference network (extractor + selected
    branch) as a ``torch.export`` program (``pytorch/model.pt2``, the pickle-free "pt2" format):
    input normalised float ``(N, 3, S, S)``, output logits ``(N, 7)``, dynamic batch. It is the
    network as every inference path runs it, batch norm folded into the convs
    (:func:`pipeline.core.inference.inference_ready`); the trained weights are ``data/export/weights.pt``.

:func:`log_model` logs it with :meth:`mlflow.models.Model.log` (this module is the "flavour
module" whose :func:`save_model` writes the folder), so it is an MLflow 3 LoggedModel of the run
and can be registered as one model version that loads with either flavour.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.core.inference import predict_proba, predicted_labels
from pipeline.io.images import decode_image
from pipeline.io.model_files import verify_embedded, write_embedded
from pipeline.io.modelstore import load_exported
from pipeline.io.threads import use_cpu_threads
from pipeline.labels import CLASSES

log = logging.getLogger(__name__)

FLAVOR_NAME = "skin_twin"
EXPORT_SUBDIR = "export"  # data/export inside the MLflow model folder
SERVING_FILE = "serving.json"  # data/export/serving.json: pyfunc settings (batch size, torch threads)
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


def to_images(model_input: Any) -> list[Image.Image]:
    """The model input -- a DataFrame whose ``image`` column holds encoded image files (bytes: JPEG,
    PNG, ... of any size and mode) -- as decoded RGB images. Raises ``ValueError`` naming the row."""
    if not isinstance(model_input, pd.DataFrame) or "image" not in model_input.columns:
        got = list(model_input.columns) if isinstance(model_input, pd.DataFrame) else type(model_input).__name__
        raise ValueError(f"expected a DataFrame with an 'image' column of encoded image bytes, got {got}")
    out = []
    for i, value in enumerate(model_input["image"].tolist()):
        if not isinstance(value, (bytes, bytearray)):
            raise ValueError(f"row {i}: expected the bytes of an image file, got {type(value).__name__}")
        try:
            out.append(decode_image(bytes(value)))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise ValueError(f"row {i}: not a readable image ({exc})") from None
    return out


# --------------------------------------------------------------------------------------------
# pyfunc side
# --------------------------------------------------------------------------------------------


class SkinTwinClassifier:
    """What ``mlflow.pyfunc.load_model`` wraps: images in, class probabilities out.

    ``cpu_threads`` > 0 sets the torch threads of the whole process that loads it (a serving
    worker is that process; ``predict.cpu_threads``); 0 leaves torch's default."""

    def __init__(self, export_dir: str | Path, batch_size: int, cpu_threads: int = 0) -> None:
        self.export_dir = Path(export_dir)
        self.exported = load_exported(self.export_dir)
        self.batch_size = int(batch_size)
        self.cpu_threads = int(cpu_threads)
        use_cpu_threads(self.cpu_threads)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.exported.classes

    def predict_proba(self, model_input: Any) -> np.ndarray:
        return predict_proba(self.exported, to_images(model_input), self.batch_size)

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> pd.DataFrame:  # noqa: ARG002
        probs = self.predict_proba(model_input)
        df = pd.DataFrame(probs, columns=list(self.classes))
        df.insert(0, "label", [self.classes[int(i)] for i in predicted_labels(self.exported, probs)])
        return df


def _load_pyfunc(data_path: str) -> SkinTwinClassifier:
    """MLflow's entry point for the ``python_function`` flavour (``loader_module``).

    First checks the model folder against its own file manifest (``skin_twin_files.json``: code bundle,
    export, pt2), so a serving host that loads the folder directly refuses a changed, missing or
    added file (:class:`~pipeline.errors.DataError` naming it) before any weights or TorchScript are
    read. MLflow has imported this module from the bundle by then: to check the bundle *before*
    that import, load through :func:`pipeline.io.registry.load_pyfunc`."""
    verify_embedded(Path(data_path).resolve().parents[1])
    serving = json.loads((Path(data_path) / SERVING_FILE).read_text(encoding="utf-8"))
    # models logged before cpu_threads existed have only batch_size: torch's default threads
    return SkinTwinClassifier(data_path, int(serving["batch_size"]), int(serving.get("cpu_threads", 0)))


# --------------------------------------------------------------------------------------------
# saving / logging
# --------------------------------------------------------------------------------------------


def signature(image_size: int):  # noqa: ARG001 - images of any size are accepted
    """Input: a column ``image`` of encoded image files (``binary``: the bytes of a JPEG, PNG, ...
    of any size -- base64 in a serving request's ``dataframe_split``); output: one probability
    column per class after the ``label`` the decision rule picks. MLflow enforces it on every
    ``predict``."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema([ColSpec("string", "label"), *(ColSpec("double", c) for c in CLASSES)]),
    )


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8), mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def input_example(image_size: int, n: int = 2, seed: int = 0) -> pd.DataFrame:
    """Two random RGB images of the model's size, PNG-encoded, in the input schema's shape."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, image_size, image_size, 3), dtype=np.uint8)
    return pd.DataFrame({"image": [encode_png(a) for a in images]})


def _export_pt2(export_dir: Path, target: Path) -> None:
    """The eager inference model as a ``torch.export`` program with a dynamic batch dimension."""
    import torch

    exported = load_exported(export_dir)
    size = exported.image_size
    example = torch.zeros(2, 3, size, size)
    program = torch.export.export(exported.model, (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(target))


def stage_bundle(target: Path) -> Path:
    """A copy of the ``pipeline`` package below ``target`` holding only what inference imports: the
    import closure of this module (:func:`pipeline.io.imports.bundle_files`, the reader that gives
    ``dvc.yaml`` its code dependencies). Returns the package folder, MLflow's ``code_paths`` entry."""
    from pipeline.io.imports import PACKAGE_DIR, bundle_files

    package = target / PACKAGE_DIR.name
    for f in bundle_files(__name__):
        dest = package / f.relative_to(PACKAGE_DIR)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dest)
    return package


def save_model(
    path: str | Path, export_dir: str | Path, batch_size: int, mlflow_model: Any = None, cpu_threads: int = 0,
    **kwargs: Any,
) -> None:
    """Write the two-flavour MLflow model folder at ``path`` from an export folder.

    ``batch_size`` (``predict.batch_size``) is how many images the pyfunc runs through the network
    at once, ``cpu_threads`` (``predict.cpu_threads``) the torch threads the loading process gets
    (0: torch's default); both travel in ``data/export/serving.json``. ``kwargs`` go to
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
    path = Path(path)
    # MLflow copies data_path to data/<basename>: stage the export under the fixed name "export".
    with tempfile.TemporaryDirectory() as tmp:
        kwargs.setdefault("code_paths", [str(stage_bundle(Path(tmp) / "code"))])
        staged = Path(tmp) / EXPORT_SUBDIR
        shutil.copytree(export_dir, staged, ignore=shutil.ignore_patterns(".*", "__pycache__"))
        serving = {"batch_size": int(batch_size), "cpu_threads": int(cpu_threads)}
        (staged / SERVING_FILE).write_text(json.dumps(serving) + "\n", encoding="utf-8")
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
    write_embedded(path)  # last: what the loader checks its own folder against


def log_model(export_dir: str | Path, batch_size: int, *, cpu_threads: int, name: str = "model", **kwargs: Any):
    """Log the export folder as the run's MLflow model (a LoggedModel); returns ``ModelInfo``.
    ``batch_size`` and ``cpu_threads`` are the deployment's ``predict`` settings (:func:`save_model`)."""
    from mlflow.models import Model

    return Model.log(
        artifact_path=None, name=name, flavor=sys.modules[__name__], export_dir=str(export_dir),
        batch_size=batch_size, cpu_threads=cpu_threads, **kwargs,
    )  # fmt: skip


def export_dir_of(model_dir: str | Path) -> Path:
    """The export folder inside a downloaded MLflow model folder."""
    folder = Path(model_dir) / "data" / EXPORT_SUBDIR
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a skin-twin MLflow model (no data/{EXPORT_SUBDIR}/config.json)")
    return folder
