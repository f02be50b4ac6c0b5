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
* **Logit adjustment** (``loss.logit_adjust`` ``tau``, 0 = off; Menon et al., "Long-tail learning
  via logit adjustment", ICLR 2021): the focal terms of both branches see ``logits + tau * log pi``,
  ``pi`` the training images' class frequencies (:func:`logit_shift`), in training and in the
  validation losses alike (val shares train's class mix, so the lowest-loss state is judged on the
  objective that was trained). The raw logits -- what the exported branch, the decision rule and
  every prediction read -- then estimate the class-balanced posterior, without copying rare-class
  images (``augment.balance``) to get there. With a balanced training set the shift is the same for
  every class and changes nothing. Choice: a class with no training image counts as one, so its
  shift stays finite (it is never a target).
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
    label_smoothing: float = 0.0,
    shift: Tensor | None = None,
) -> Tensor:
    """Multi-class softmax focal loss of ``logits`` (N, C) against integer ``target`` (N,).

    ``shift`` (C,) is added to every row of ``logits`` first (logit adjustment, :func:`logit_shift`).

    ``gamma = 0`` and ``alpha = None`` is exactly cross-entropy. ``alpha`` is a (C,) tensor of
    per-class weights. ``reduction``: ``"mean"`` (plain mean over samples), ``"sum"`` or ``"none"``.
    ``label_smoothing`` ``eps > 0`` replaces the one-hot target by ``q = (1 - eps) * one_hot + eps / C``:
    ``-alpha_t * sum_i q_i (1 - p_i)^gamma log p_i`` (with ``gamma = 0``: torch's label-smoothed
    cross-entropy); ``eps = 0`` is exactly the plain formula above.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, C), got shape {tuple(logits.shape)}")
    if target.shape != logits.shape[:1]:
        raise ValueError(f"target must be (N,) = ({logits.shape[0]},), got shape {tuple(target.shape)}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    target = target.long()
    if shift is not None:
        if shift.shape != logits.shape[1:]:
            raise ValueError(f"shift must have {logits.shape[1]} values, got shape {tuple(shift.shape)}")
        logits = logits.float() + shift.to(device=logits.device, dtype=torch.float32)
    if label_smoothing > 0:
        logp = F.log_softmax(logits.float(), dim=1)
        n_cls = logits.shape[1]
        q = torch.full_like(logp, label_smoothing / n_cls)
        q.scatter_(1, target[:, None], 1.0 - label_smoothing + label_smoothing / n_cls)
        weight = (-torch.expm1(logp)).clamp_min(_EPS) ** gamma if gamma > 0 else torch.ones_like(logp)
        loss = -(q * weight * logp).sum(dim=1)
    else:
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


def logit_shift(tau: float, class_counts: Sequence[int] | np.ndarray) -> Tensor | None:
    """``tau * log pi`` (C,) float32 from training class counts (:data:`CLASSES` order), or ``None``
    when ``tau`` is 0 (logit adjustment off). A class with no image counts as one image."""
    if tau < 0:
        raise ValueError(f"logit_adjust must be >= 0, got {tau}")
    if tau == 0:
        return None
    counts = np.maximum(np.asarray(class_counts, dtype=np.float64).reshape(-1), 1.0)
    return torch.as_tensor(tau * np.log(counts / counts.sum()), dtype=torch.float32)


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


def joint_loss(
    out: TwinOutput, y1: Tensor, y2: Tensor, cfg: LossConfig, alpha: Tensor | None = None, shift: Tensor | None = None
) -> JointLoss:
    """``A * FL(logits1, y1) + B * FL(logits2, y2) + C * CE(same_logits, y1 == y2)``.

    The focal terms use ``cfg.label_smoothing`` (training); the validation losses that pick the
    lowest-loss state and the exported branch are always unsmoothed
    (:func:`pipeline.core.training.validate`), so they stay comparable across settings. ``shift``
    (:func:`logit_shift`) adjusts both branches' logits, in training and validation alike."""
    if y1.shape != y2.shape:
        raise ValueError(f"label batches differ in shape: {tuple(y1.shape)} vs {tuple(y2.shape)}")
    eps = cfg.label_smoothing
    f1 = focal_loss(out.logits1, y1, cfg.gamma, alpha, label_smoothing=eps, shift=shift)
    f2 = focal_loss(out.logits2, y2, cfg.gamma, alpha, label_smoothing=eps, shift=shift)
    disc = F.cross_entropy(out.same_logits.float(), same_target(y1, y2))
    total = cfg.A * f1 + cfg.B * f2 + cfg.C * disc
    return JointLoss(total=total, focal1=f1, focal2=f2, disc=disc)


def mixed_joint_loss(
    out: TwinOutput,
    y1: Tensor,
    y2: Tensor,
    cfg: LossConfig,
    lam: float,
    perm: Tensor,
    alpha: Tensor | None = None,
    shift: Tensor | None = None,
) -> JointLoss:
    """The joint loss of a mixed pair batch (mixup / CutMix, :class:`pipeline.core.training.BatchMix`):
    ``lam * L(y1, y2) + (1 - lam) * L(y1[perm], y2[perm])``, term by term.

    Every term is linear in its target distribution, so this is exactly the loss against the soft
    targets ``lam * e(y) + (1 - lam) * e(y[perm])`` of each branch (with ``alpha`` and label
    smoothing applied to each of the two classes as for a plain batch), and for the discriminator
    the soft "same class" target ``lam * [y1 == y2] + (1 - lam) * [y1[perm] == y2[perm]]``: a
    mixed pair is ``lam`` of pair ``i`` and ``1 - lam`` of pair ``perm[i]`` on both sides."""
    a = joint_loss(out, y1, y2, cfg, alpha, shift)
    if lam >= 1.0:
        return a
    b = joint_loss(out, y1[perm], y2[perm], cfg, alpha, shift)
    parts = ("total", "focal1", "focal2", "disc")
    return JointLoss(*(lam * getattr(a, k) + (1.0 - lam) * getattr(b, k) for k in parts))
