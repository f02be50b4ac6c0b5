"""The lightweight twin (Siamese) CNN of the patent (S1) and its inference model (S3).

Structure (see ``docs/method.md``)::

    x1 ─┐                         ┌─ Branch 0 ─ logits1, pooled1 ─┐
        ├─ FeatureExtractor ──────┤                                ├─ Discriminator ─ same_logits
    x2 ─┘  (one module, shared)   └─ Branch 1 ─ logits2, pooled2 ─┘

Design choices, and how they relate to the patent:

* **Lightweight module = MobileNetV2 inverted residual block** (1x1 expand -> 3x3 depthwise ->
  1x1 linear project, BatchNorm after every conv, ReLU6 after the first two, identity shortcut
  when stride is 1 and the channel count is unchanged). The patent only says "lightweight
  convolution modules". Compared with a plain depthwise-separable conv (MobileNetV1) the block
  runs the depthwise conv in a wider space (more expressive per parameter) and keeps a linear
  bottleneck plus a residual path, which trains reliably from scratch on small data sets.
  Compared with ShuffleNet units it needs no grouped 1x1 convs / channel shuffle, which are less
  well supported by exporters and gain little at this tiny width. Every op here (conv, BN,
  ReLU6, add, mean, linear) is plain and exports cleanly to TorchScript / ``torch.export`` /
  ONNX. ReLU6 (not hardswish) keeps the last feature map non-negative, as CAM assumes.
* **Feature extractor shared, branches with their own weights.** The patent "extracts one
  feature map per image of the pair and feeds the two feature maps to the two branches" and
  later keeps "the branch with the smaller loss", so the branches must be distinct modules. We
  read it as: image 1 -> extractor -> branch 0, image 2 -> extractor -> branch 1. Both images go
  through the extractor in one concatenated batch (one kernel launch per layer; in training mode
  BatchNorm therefore sees the statistics of both halves of the pair, which is what a shared
  extractor should see).
* **Branch** = more inverted-residual stages, then a 1x1 conv to ``head_channels`` (BN + ReLU6):
  this is *the last feature map* ``f_k`` of the patent's CAM formula; then global average
  pooling -> dropout -> one ``nn.Linear`` whose weight is ``w_k^c``. Nothing sits between GAP
  and the classifier, so CAM is exact for this head (Zhou et al. 2016).
* **Discriminator** combines the two pooled vectors as ``[|a-b|, a*b]`` (the patent leaves the
  combination open). Both terms are symmetric in (a, b), so the same/different decision does not
  depend on which image of the pair is "left"; concatenation ``[a, b]`` would let the MLP learn an
  order-dependent rule, and the pair generator's positive pairs are built by a swap, i.e. they
  appear in both orders. ``|a-b|`` measures distance, ``a*b`` agreement of active channels.
  Output: 2 logits, index 1 = "same class".
* **Two families, one structure.** From scratch (``model.extractor`` rows): the blocks above. On a
  pretrained backbone (``model.extractor: efficientnet_lite0``, :mod:`pipeline.core.backbone`):
  the ImageNet EfficientNet-Lite0 stem and first ``model.split`` stages are the shared extractor
  (:class:`BackboneExtractor`); each branch starts as its own copy of the remaining pretrained
  stages and the pretrained 1x1 head conv (1280 channels, BN, ReLU6: the CAM map), followed by GAP
  and a new classifier. ``model.output_stride: 16`` runs Lite0's last stride-2 stage at stride 1
  (dilated), so the CAM map is twice as fine with the same weights. Both families use ImageNet's
  normalisation (:data:`pipeline.core.imaging.MEAN` / ``STD``, recorded in the export).
* **Batch norm folded for inference** (:func:`fold_batch_norm`): in eval mode a BatchNorm2d after
  a conv is a fixed per-channel affine map, so it is merged into the conv's weight and a bias
  (and dropped from the block).
  Every inference path runs the folded copy (:func:`pipeline.core.inference.inference_ready`); the
  export's ``weights.pt`` keeps the trained, unfolded state dict.
* Weights: kaiming-normal for convs (fan_out; per-group fan_in for depthwise convs), BN gamma 1 /
  beta 0, except the BN after the
  projection conv of residual blocks, whose gamma starts at 0 so each residual block starts as
  the identity (Goyal et al. 2017); small normal init for linear layers.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from pipeline.config import ModelConfig

StageSpec = Sequence[Sequence[int]]  # rows of (expansion, out_channels, repeats, stride)


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (skipped when expansion is 1) -> 3x3 depthwise -> 1x1 linear project."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        if expansion < 1:
            raise ValueError(f"expansion must be >= 1, got {expansion}")
        hidden = cin * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(_conv_bn(cin, hidden, 1))
        layers.append(_conv_bn(hidden, hidden, 3, stride=stride, groups=hidden))
        layers.append(_conv_bn(hidden, cout, 1, act=False))
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    @property
    def project_bn(self) -> nn.BatchNorm2d:
        bn = self.block[-1][1]
        assert isinstance(bn, nn.BatchNorm2d)
        return bn

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


def _stages(cin: int, spec: StageSpec) -> tuple[nn.Sequential, int]:
    """Build inverted-residual stages; the first block of a stage carries its stride."""
    blocks: list[nn.Module] = []
    for row in spec:
        if len(row) != 4:
            raise ValueError(f"stage rows are [expansion, out_channels, repeats, stride], got {list(row)}")
        t, c, n, s = (int(v) for v in row)
        if c < 1 or n < 1:
            raise ValueError(f"out_channels and repeats must be >= 1, got {list(row)}")
        for i in range(n):
            blocks.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
            cin = c
    return nn.Sequential(*blocks), cin


def _init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            # Depthwise convs: PyTorch's fan_out for a (C, 1, k, k) weight is C*k*k although each
            # output sees only k*k inputs, which would shrink activations by ~1/sqrt(C) per block
            # and make eval-mode outputs image-independent early in training. Use the per-group
            # fan_in (k*k) there so the signal scale is preserved.
            depthwise = m.groups > 1 and m.groups == m.in_channels
            nn.init.kaiming_normal_(m.weight, mode="fan_in" if depthwise else "fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
    for m in module.modules():
        if isinstance(m, InvertedResidual) and m.use_residual:
            nn.init.zeros_(m.project_bn.weight)


class FeatureExtractor(nn.Module):
    """Stem (3x3 conv, stride 2, BN, ReLU6) + ``cfg.extractor`` inverted-residual stages."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.stem = _conv_bn(3, cfg.stem_channels, 3, stride=2)
        self.stages, self.out_channels = _stages(cfg.stem_channels, cfg.extractor)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.stages(self.stem(x))


class Branch(nn.Module):
    """``stages`` + ``head`` (the 1x1 conv whose output is the CAM feature map) + GAP + dropout +
    linear classifier. From scratch: ``cfg.branch`` rows (:func:`_scratch_branch`); on a backbone:
    its remaining stages and its 1x1 head conv (:func:`_backbone_branch`)."""

    def __init__(self, stages: nn.Module, head: nn.Module, head_channels: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.stages = stages
        self.head = head
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(head_channels, num_classes)
        self.head_channels = head_channels
        self.num_classes = num_classes

    def feature_map(self, f: Tensor) -> Tensor:
        """Extractor output -> last feature map (N, head_channels, h, w), non-negative."""
        return self.head(self.stages(f))

    def classify(self, fm: Tensor) -> tuple[Tensor, Tensor]:
        """Last feature map -> (logits (N, C), pooled (N, head_channels))."""
        pooled = fm.mean(dim=(2, 3))
        return self.classifier(self.dropout(pooled)), pooled

    def forward(self, f: Tensor) -> tuple[Tensor, Tensor]:
        return self.classify(self.feature_map(f))


def _scratch_branch(cfg: ModelConfig, in_channels: int, num_classes: int) -> Branch:
    assert cfg.branch is not None
    stages, c = _stages(in_channels, cfg.branch)
    branch = Branch(stages, _conv_bn(c, cfg.head_channels, 1), cfg.head_channels, num_classes, cfg.dropout)
    _init_weights(branch)
    return branch


class BackboneExtractor(nn.Module):
    """A pretrained backbone's stem and first ``model.split`` stages (the shared feature extractor)."""

    def __init__(self, body: nn.Module, out_channels: int) -> None:
        super().__init__()
        self.body = body
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def _backbone_parts(cfg: ModelConfig, pretrained: Mapping[str, Tensor] | None) -> Any:
    """The backbone cut at ``cfg.split`` (:func:`pipeline.core.backbone.lite0_parts`), with the
    ``pretrained`` weights (timm names, no classifier) loaded strictly when given; random otherwise
    (a model rebuilt to load an export's weights)."""
    from pipeline.core.backbone import build_lite0, lite0_parts

    assert cfg.split is not None and cfg.output_stride is not None
    net = build_lite0(num_classes=0, output_stride=cfg.output_stride)
    if pretrained is not None:
        net.load_state_dict(dict(pretrained), strict=True)
    return lite0_parts(net, cfg.split)


def _backbone_branch(parts: Any, num_classes: int, dropout: float) -> Branch:
    """Its own copy of the backbone's remaining stages and head conv; a new classifier (N(0, 0.01))."""
    body = copy.deepcopy(parts.branch)
    branch = Branch(body.blocks, nn.Sequential(body.conv_head, body.bn2), parts.channels, num_classes, dropout)
    nn.init.normal_(branch.classifier.weight, 0.0, 0.01)
    nn.init.zeros_(branch.classifier.bias)
    return branch


class Discriminator(nn.Module):
    """Same-class decision from two pooled vectors via the symmetric features ``[|a-b|, a*b]``."""

    def __init__(self, in_features: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(2 * in_features, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, 2),
        )
        _init_weights(self)
        # Hidden layer: kaiming so the ReLU MLP starts with a useful signal scale.
        first = self.mlp[0]
        assert isinstance(first, nn.Linear)
        nn.init.kaiming_normal_(first.weight, nonlinearity="relu")

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if a.shape != b.shape:
            raise ValueError(f"pooled vectors differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
        return self.mlp(torch.cat([(a - b).abs(), a * b], dim=1))


@dataclass
class TwinOutput:
    """Everything the joint loss needs from one forward pass of a pair batch."""

    logits1: Tensor  # (N, C) branch 0 on image 1
    logits2: Tensor  # (N, C) branch 1 on image 2
    same_logits: Tensor  # (N, 2) discriminator, index 1 = same class
    pooled1: Tensor  # (N, head_channels)
    pooled2: Tensor  # (N, head_channels)


class TwinNet(nn.Module):
    """The joint training model: shared extractor, two branches with own weights, discriminator.

    ``pretrained``: the backbone's weights (timm names, :mod:`pipeline.io.pretrained`) when
    ``cfg.extractor`` names one; the from-scratch family takes none."""

    def __init__(self, cfg: ModelConfig, num_classes: int = 7, pretrained: Mapping[str, Tensor] | None = None) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.num_classes = num_classes
        if cfg.backbone is None:
            if pretrained is not None:
                raise ValueError("pretrained weights need model.extractor to name a backbone")
            self.extractor: nn.Module = FeatureExtractor(cfg)
            branches = [_scratch_branch(cfg, self.extractor.out_channels, num_classes) for _ in range(2)]
        else:
            parts = _backbone_parts(cfg, pretrained)
            self.extractor = BackboneExtractor(parts.extractor, parts.extractor_channels)
            branches = [_backbone_branch(parts, num_classes, cfg.dropout) for _ in range(2)]
        self.branches = nn.ModuleList(branches)
        self.discriminator = Discriminator(cfg.head_channels, cfg.discriminator_hidden, cfg.dropout)

    def pretrained_parameters(self) -> list[nn.Parameter]:
        """The weights that come from a pretrained backbone (extractor and the branches' stages and
        head convs); empty from scratch. ``train.pretrained_lr`` applies to these."""
        if not isinstance(self.extractor, BackboneExtractor):
            return []
        mods = [self.extractor, *(m for b in self.branches for m in (b.stages, b.head))]
        return [p for m in mods for p in m.parameters()]

    def forward(self, x1: Tensor, x2: Tensor) -> TwinOutput:
        if x1.shape != x2.shape:
            raise ValueError(f"pair images differ in shape: {tuple(x1.shape)} vs {tuple(x2.shape)}")
        n = x1.shape[0]
        f = self.extractor(torch.cat([x1, x2], dim=0))
        logits1, pooled1 = self.branches[0](f[:n])
        logits2, pooled2 = self.branches[1](f[n:])
        same = self.discriminator(pooled1, pooled2)
        return TwinOutput(logits1=logits1, logits2=logits2, same_logits=same, pooled1=pooled1, pooled2=pooled2)


class InferenceModel(nn.Module):
    """Recognition model (S3): feature extractor + one branch. ``forward`` returns logits only.

    Input: normalised float NCHW (:func:`pipeline.core.imaging.to_model_input`). Traceable with
    ``torch.jit.trace`` and exportable with ``torch.export`` / ONNX (dynamic batch).
    """

    def __init__(self, extractor: nn.Module, branch: Branch) -> None:
        super().__init__()
        self.extractor = extractor
        self.branch = branch
        self.num_classes = branch.num_classes

    def forward(self, x: Tensor) -> Tensor:
        logits, _ = self.branch(self.extractor(x))
        return logits

    def feature_map(self, x: Tensor) -> Tensor:
        """Input -> last feature map (N, head_channels, h, w) used for CAM."""
        return self.branch.feature_map(self.extractor(x))

    def logits_from_feature_map(self, fm: Tensor) -> Tensor:
        return self.branch.classify(fm)[0]

    @property
    def classifier_weight(self) -> Tensor:
        """``w_k^c`` of the CAM formula, shape (C, K)."""
        return self.branch.classifier.weight


def build_twin(cfg: ModelConfig, num_classes: int = 7, pretrained: Mapping[str, Tensor] | None = None) -> TwinNet:
    """A freshly initialised twin network (on the ``pretrained`` backbone weights when given)."""
    return TwinNet(cfg, num_classes, pretrained)


def inference_model(twin: TwinNet, branch_index: int) -> InferenceModel:
    """Deep copies of the twin's extractor and branch ``branch_index`` (0 or 1); the twin is untouched."""
    if branch_index not in (0, 1):
        raise ValueError(f"branch_index must be 0 or 1, got {branch_index}")
    model = InferenceModel(copy.deepcopy(twin.extractor), copy.deepcopy(twin.branches[branch_index]))
    return model.train(twin.training)


def build_inference(cfg: ModelConfig, num_classes: int = 7, pretrained: Mapping[str, Tensor] | None = None) -> InferenceModel:
    """A fresh inference model with the same state-dict keys as :func:`inference_model` produces
    (randomly initialised, or on the ``pretrained`` backbone weights: the benchmark's single-branch
    baseline)."""
    if cfg.backbone is None:
        extractor = FeatureExtractor(cfg)
        return InferenceModel(extractor, _scratch_branch(cfg, extractor.out_channels, num_classes))
    parts = _backbone_parts(cfg, pretrained)
    return InferenceModel(BackboneExtractor(parts.extractor, parts.extractor_channels),
                          _backbone_branch(parts, num_classes, cfg.dropout))  # fmt: skip


def fold_batch_norm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every conv -> :class:`~torch.nn.BatchNorm2d` pair of
    :func:`_conv_bn` merged into one conv with a bias (the BN dropped from its block); ``model`` is
    untouched. The copy computes the same function as ``model`` in eval mode up to float rounding
    (about 1e-7 relative), with one op and one module call fewer per conv: the batch-1 predict path
    takes about a third less time on the CPU. Its state dict differs (no BN entries), so exports
    are written from the unfolded model. A BatchNorm2d without running statistics stays as it is."""
    folded = copy.deepcopy(model).eval()
    for seq in [m for m in folded.modules() if isinstance(m, nn.Sequential)]:
        i = 0
        while i < len(seq) - 1:
            conv, bn = seq[i], seq[i + 1]
            if isinstance(conv, nn.Conv2d) and type(bn) is nn.BatchNorm2d and bn.track_running_stats:
                seq[i] = fuse_conv_bn_eval(conv, bn)
                del seq[i + 1]  # not an identity left in its place: one call fewer
            i += 1
    return folded


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of (unique) parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
