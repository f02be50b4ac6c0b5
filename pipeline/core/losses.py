"""Losses of the joint training model: focal loss per branch, cross-entropy for the discriminator.

``L_total = A * FL(branch 1) + B * FL(branch 2) + C * CE(discriminator)`` (patent, "Loss").

Design choices:

* Focal loss is the multi-class softmax form ``FL = -sum_i y_i alpha_i (1 - p_i)^gamma log p_i``
  with one-hot ``y``, i.e. ``-alpha_t (1 - p_t)^gamma log p_t`` for the target class ``t``. The
  patent's formula has no ``alpha``; it is an optional per-class weight (``loss.alpha``) for
  imbalanced data such as HAM10000 (null = the patent's formula).
* Numerics: ``log p_t`` comes from ``log_softmax`` (never ``log(softmax)``), ``1 - p_t`` is
  ``-expm1(log p_t)`` (accurate when ``p_t`` is close to 1) and is clamped at a tiny epsilon so
  the gradient of ``(1 - p_t)^gamma`` stays finite for ``gamma < 1`` when ``p_t`` saturates to 1.
  Inputs are cast to float32, so the loss is safe under bf16/fp16 autocast.
* Reduction ``"mean"`` is the plain mean over samples, also with ``alpha`` (unlike
  ``F.cross_entropy(weight=...)``, which divides by the sum of the target weights). The loss
  value therefore still changes with ``alpha``, and batch sums / ``N`` compose exactly.
* The discriminator target "same class" is always computed from the two labels
  (``y1 == y2``), never taken from the pair generator, because the patent's step 4 can produce
  accidental same-class "negative" pairs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.config import LossConfig
from pipeline.core.model import TwinOutput
from pipeline.labels import CLASSES

_EPS = 1e-12


def focal_loss(
    logits: Tensor,
    target: Tensor,
    gamma: float,
    alpha: Tensor | None = None,
    reduction: Literal["mean", "sum", "none"] = "mean",
) -> Tensor:
    """Multi-class softmax focal loss of ``logits`` (N, C) against integer ``target`` (N,).

    ``gamma = 0`` and ``alpha = None`` is exactly cross-entropy. ``alpha`` is a (C,) tensor of
    per-class weights. ``reduction``: ``"mean"`` (plain mean over samples), ``"sum"`` or ``"none"``.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, C), got shape {tuple(logits.shape)}")
    if target.shape != logits.shape[:1]:
        raise ValueError(f"target must be (N,) = ({logits.shape[0]},), got shape {tuple(target.shape)}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    target = target.long()
    loss = _focal_terms(logits, target, gamma)
    if alpha is not None:
        alpha = torch.as_tensor(alpha, dtype=loss.dtype, device=loss.device)
        if alpha.shape != logits.shape[1:]:
            raise ValueError(f"alpha must have {logits.shape[1]} values, got shape {tuple(alpha.shape)}")
        loss = loss * alpha[target]
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _focal_terms(logits: Tensor, target: Tensor, gamma: float) -> Tensor:
    """Per-sample ``-(1 - p_t)^gamma log p_t`` (one-hot target)."""
    logp_t = F.log_softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
    if gamma == 0:
        loss = -logp_t
    else:
        one_minus_p = (-torch.expm1(logp_t)).clamp_min(_EPS)
        loss = -(one_minus_p**gamma) * logp_t
    return loss


def class_alpha(
    cfg_alpha: None | str | Sequence[float],
    class_counts: Mapping[str, int] | Sequence[int] | np.ndarray | Tensor,
) -> Tensor | None:
    """Per-class focal weights (C,) float32 from ``LossConfig.alpha``.

    * ``None`` -> ``None`` (the patent's unweighted focal loss).
    * ``"balanced"`` -> inverse class frequency ``1 / n_c``, scaled so its mean over the classes
      present in the training data is 1. Classes with no training images get 1.0 (they never
      occur as a target, and an infinite weight would be meaningless).
    * a list of C floats -> that list.

    ``class_counts``: counts in :data:`CLASSES` order, or a mapping class name -> count.
    """
    if cfg_alpha is None:
        return None
    if isinstance(class_counts, Mapping):
        counts = np.array([float(class_counts.get(c, 0)) for c in CLASSES])
    else:
        raw = class_counts.detach().cpu().numpy() if isinstance(class_counts, Tensor) else class_counts
        counts = np.asarray(raw, dtype=float).reshape(-1)
    if isinstance(cfg_alpha, str):
        if cfg_alpha != "balanced":
            raise ValueError(f"alpha must be null, 'balanced' or a list, got {cfg_alpha!r}")
        if np.any(counts < 0):
            raise ValueError("class counts must be >= 0")
        present = counts > 0
        if not present.any():
            raise ValueError("alpha='balanced' needs at least one class with training images")
        w = np.ones_like(counts)
        inv = 1.0 / counts[present]
        w[present] = inv / inv.mean()
        return torch.as_tensor(w, dtype=torch.float32)
    values = np.asarray(list(cfg_alpha), dtype=float)
    if values.shape != counts.shape:
        raise ValueError(f"alpha needs {counts.size} values, got {values.size}")
    if np.any(values < 0) or not np.all(np.isfinite(values)):
        raise ValueError("alpha values must be finite and >= 0")
    return torch.as_tensor(values, dtype=torch.float32)


@dataclass
class JointLoss:
    """The total loss (for ``backward``) and its unweighted parts."""

    total: Tensor
    focal1: Tensor
    focal2: Tensor
    disc: Tensor

    def as_floats(self) -> dict[str, float]:
        return {k: float(getattr(self, k).detach()) for k in ("total", "focal1", "focal2", "disc")}


def same_target(y1: Tensor, y2: Tensor) -> Tensor:
    """Discriminator target: 1 where the two labels are equal, else 0 (int64)."""
    return (y1 == y2).long()


def joint_loss(out: TwinOutput, y1: Tensor, y2: Tensor, cfg: LossConfig, alpha: Tensor | None = None) -> JointLoss:
    """``A * FL(logits1, y1) + B * FL(logits2, y2) + C * CE(same_logits, y1 == y2)``: the same
    function scores training batches and the validation losses that pick the lowest-loss state."""
    if y1.shape != y2.shape:
        raise ValueError(f"label batches differ in shape: {tuple(y1.shape)} vs {tuple(y2.shape)}")
    f1 = focal_loss(out.logits1, y1, cfg.gamma, alpha)
    f2 = focal_loss(out.logits2, y2, cfg.gamma, alpha)
    disc = F.cross_entropy(out.same_logits.float(), same_target(y1, y2))
    total = cfg.A * f1 + cfg.B * f2 + cfg.C * disc
    return JointLoss(total=total, focal1=f1, focal2=f2, disc=disc)
