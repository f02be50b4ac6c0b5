"""Site-adversarial training: a site classifier behind a gradient-reversal layer (training only).

HAM10000 is several clinics and devices (the manifest's ``source_site``), each with its own class
mix and look; a network can learn "this look means this class", which fails on a new clinic
(issue 12's source-held-out split). Domain-adversarial training (DANN, Ganin et al., JMLR 2016)
trains, next to the task, a small classifier that guesses each training image's site from the
features, and reverses its gradient into the features: the site classifier gets better at
guessing, the features get worse at telling. The class-conditional form (CDANN, Li et al., ECCV
2018) asks the question per class ("which site is this nv from?"), so that a site's class mix,
which is real and differs from site to site, is not what is removed.

Choices where the method leaves room, each deliberate:

* **Where**: on the twin's GAP vectors ``pooled1`` / ``pooled2`` (the vectors the branches'
  classifiers and the discriminator read; the exported branch's features are these), both halves
  of the pair batch, every image once.
* **Head** (:class:`SiteHead`): Linear -> ReLU -> Linear, ``train.site_adversarial_hidden``
  units. Conditional: one output block of ``num_sites`` logits per class, sharing the hidden layer;
  the block of the image's own label is read.
* **Strength**: the reversed gradient is scaled by ``lambda_p = w * (2 / (1 + exp(-10 p)) - 1)``
  (DANN's ramp, :func:`dann_coefficient`), ``p`` the share of optimizer steps done and ``w =
  train.site_adversarial``; the head itself always learns at full strength. The site loss is
  added to the joint loss for the backward pass only: the reported training loss, the
  validation losses and so the patent's lowest-loss state and branch choice are the joint loss
  alone.
* **Mixed batches** (mixup / CutMix): the site loss is blended with the batch's own weight,
  ``lam * CE(site) + (1 - lam) * CE(site[perm])`` (conditional: each term read at its own label).
* Not part of the model: the exported inference model, its parameter count, CAM and every
  inference path are unchanged; the head lives in ``last.pt`` only (for resume).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _GradReverse(torch.autograd.Function):
    """Identity forward; gradient times ``-coeff`` backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, coeff: float) -> Tensor:
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.coeff * grad, None


def grad_reverse(x: Tensor, coeff: float) -> Tensor:
    """``x`` unchanged; the gradient that flows back through it is multiplied by ``-coeff``."""
    return _GradReverse.apply(x, float(coeff))


def dann_coefficient(progress: float, weight: float) -> float:
    """DANN's schedule of the reversed gradient: ``weight * (2 / (1 + exp(-10 p)) - 1)`` for the
    share ``p`` (clamped to [0, 1]) of training done: 0 at the start (the site head first learns
    to guess on features that still mean little), close to ``weight`` after the first half."""
    p = min(1.0, max(0.0, float(progress)))
    return float(weight) * (2.0 / (1.0 + math.exp(-10.0 * p)) - 1.0)


class SiteHead(nn.Module):
    """Site logits from GAP vectors; ``num_classes`` > 0 makes it class-conditional."""

    def __init__(self, in_features: int, hidden: int, num_sites: int, num_classes: int = 0) -> None:
        super().__init__()
        if num_sites < 2:
            raise ValueError(f"a site classifier needs >= 2 sites, got {num_sites}")
        self.num_sites = num_sites
        self.groups = max(1, num_classes)
        self.mlp = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, self.groups * num_sites)
        )
        first = self.mlp[0]
        assert isinstance(first, nn.Linear)
        nn.init.kaiming_normal_(first.weight, nonlinearity="relu")
        nn.init.zeros_(first.bias)

    def forward(self, pooled: Tensor) -> Tensor:
        """(N, groups, num_sites) logits: one block per class (conditional) or one block."""
        return self.mlp(pooled).view(pooled.shape[0], self.groups, self.num_sites)


def pick_sites(logits: Tensor, labels: Tensor) -> Tensor:
    """(N, num_sites) from a head's (N, groups, num_sites): each row's label block (one block:
    that block for every row)."""
    if logits.shape[1] == 1:
        return logits[:, 0]
    index = labels.long().view(-1, 1, 1).expand(-1, 1, logits.shape[2])
    return logits.gather(1, index).squeeze(1)


def site_loss(
    head: nn.Module,
    pooled: Tensor,
    labels: Tensor,
    sites: Tensor,
    coeff: float,
    lam: float = 1.0,
    perm: Tensor | None = None,
) -> Tensor:
    """Mean cross-entropy of the site head on ``pooled`` (N, K) behind a gradient reversal of
    ``coeff``; ``labels`` / ``sites`` (N,). With a mixed batch (``lam < 1``, ``perm``) the blend
    ``lam * CE(y, s) + (1 - lam) * CE(y[perm], s[perm])``. One forward pass of the head (so it
    can be wrapped in DistributedDataParallel); computed in float32."""
    logits = head(grad_reverse(pooled.float(), coeff)).float()
    sites = sites.long()
    loss = F.cross_entropy(pick_sites(logits, labels), sites)
    if lam >= 1.0 or perm is None:
        return loss
    other = F.cross_entropy(pick_sites(logits, labels[perm]), sites[perm])
    return lam * loss + (1.0 - lam) * other
