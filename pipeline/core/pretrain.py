"""Self-supervised (contrastive) pretraining of the twin, before the patent's training (optional).

Issue 12's held-out clinic and external test ask for features that carry the lesion rather than
the device. With no ImageNet weights to start from (nothing is downloaded), the network's only
start is random; contrastive pretraining (SimCLR, Chen et al., ICML 2020) gives it a start
learned from the training images themselves: two random views of one image must map to nearby
vectors and away from every other image's, so what survives rotation, zoom, shift and colour
jitter is what the features learn. ``train.pretrain_epochs`` > 0 turns it on; the patent's
training (pairs, joint loss, lowest-loss state, lower-loss branch) then starts from these
weights unchanged.

Choices where the method leaves room, each deliberate:

* **The twin itself is pretrained** (:func:`pretrain_epoch`): view ``a`` of a batch goes through
  the shared extractor and branch 1, view ``b`` through the shared extractor and branch 2
  (:class:`pipeline.core.model.TwinNet`'s own forward), and the two GAP vectors ``pooled1`` /
  ``pooled2`` are the pair the contrastive loss pulls together: so both branches and the extractor
  start pretrained, the branches stay two, and neither can learn a trick of its own that the other
  does not share. The classifiers and the discriminator are not trained here (no loss reads them).
* **Projection head** (:class:`ProjectionHead`): Linear -> BatchNorm -> ReLU -> Linear to
  ``train.pretrain_projection`` dims, shared by the two branches; training only (SimCLR's finding
  that the loss is better read after a head), never saved in ``best.pt`` or the export.
* **Loss** (:func:`nt_xent`): NT-Xent over the ``2N`` vectors of a batch of ``N`` images, cosine
  similarity over ``train.pretrain_temperature``, both directions averaged.
* **Views** (:func:`contrastive_views`): flips (each 0.5), rotation in [-180, 180] degrees (a lesion
  has no orientation), zoom ``1 +- train.pretrain_scale``, shift up to ``train.pretrain_translate``,
  brightness / contrast / saturation ``1 +- train.pretrain_color``; the same functions as the online
  views of training (:mod:`pipeline.core.training`), reflection padding. Drawn from one seeded
  generator, so the pretraining is a pure function of the seed and the data.
* **Images**: every train row of the augmented manifest (its offline copies included, so rare
  classes are seen as often as in training); never a val row, never a test or external image.
  One pretraining epoch is one pass over them in a seeded order, in batches of
  ``train.pretrain_batch_size``; a trailing batch of one image is dropped.
* **Optimisation**: AdamW at ``train.pretrain_lr`` with ``train.weight_decay``, cosine decay over
  all pretraining steps, its own optimizer (the patent's training starts with a fresh one). With
  ``train.mixstyle_p`` on, the extractor mixes styles here too (it is in training mode).
* **Measured** on HAM10000 (bench/README.md, trials 107-112; 10 epochs at 48 px on the CPU): balanced
  accuracy level or lower on both splits, held-out macro AUC lower in four of four pairs; off by
  default. The method's own schedules are hundreds of epochs, a GPU job.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.core.model import TwinNet
from pipeline.core.training import DeviceSetup, Images, OnlineAugment, lr_factor, make_batches, optimizer_step

ROTATION = 180.0  # degrees: a lesion has no canonical orientation


class ProjectionHead(nn.Module):
    """Training-only MLP from a GAP vector to the space the contrastive loss compares in."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, in_features, bias=False),
            nn.BatchNorm1d(in_features),
            nn.ReLU(inplace=True),
            nn.Linear(in_features, out_features),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def nt_xent(za: Tensor, zb: Tensor, temperature: float) -> Tensor:
    """The normalised-temperature cross-entropy of SimCLR: ``za[i]`` and ``zb[i]`` (N, D) are the
    two views of image ``i``; each of the ``2N`` vectors must pick its partner among the other
    ``2N - 1`` by cosine similarity over ``temperature``. Mean over the ``2N`` vectors."""
    if za.shape != zb.shape or za.dim() != 2 or za.shape[0] < 2:
        shapes = f"{tuple(za.shape)} and {tuple(zb.shape)}"
        raise ValueError(f"nt_xent needs two (N >= 2, D) batches of one shape, got {shapes}")
    n = za.shape[0]
    z = F.normalize(torch.cat([za, zb]).float(), dim=1)
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def contrastive_views(scale: float, translate: float, color: float) -> OnlineAugment:
    """The random views of pretraining (module docstring): flips, full rotation, zoom, shift, colour."""
    return OnlineAugment(flip_prob=0.5, rotation=ROTATION, scale=scale, translate=translate, color=color)


def pretrain_order(rows: np.ndarray, seed: int, epoch: int, batch_size: int) -> list[np.ndarray]:
    """Pretraining epoch ``epoch``'s batches of ``rows`` (image rows): a permutation that is a pure
    function of ``(seed, epoch)``, cut into batches (a trailing batch of one row dropped)."""
    perm = np.random.default_rng([int(seed), 0x55C1, int(epoch)]).permutation(len(rows))
    return make_batches(np.asarray(rows, dtype=np.int64)[perm], batch_size)


def pretrain_epoch(
    twin: TwinNet,
    head: ProjectionHead,
    images: Images,
    batches: list[np.ndarray],
    *,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    views: OnlineAugment,
    gen: torch.Generator,
    ds: DeviceSetup,
    temperature: float,
    epoch: int,
    on_step: Callable[[float], None] | None = None,
) -> float:
    """One pass of contrastive pretraining over ``batches`` (rows of ``images``); the mean loss.

    Raises :class:`pipeline.errors.PipelineError` on a non-finite loss (the learning rate is the usual cause)."""
    twin.train()
    head.train()
    total, seen = 0.0, 0
    non_finite = f"non-finite pretraining loss at pretraining epoch {epoch + 1}; lower train.pretrain_lr"
    for rows in batches:
        x = torch.from_numpy(images.take(rows))
        xa = views(x.clone(), gen, ds)  # the flips work in place: each view gets its own copy
        xb = views(x, gen, ds)
        with ds.autocast():
            out = twin(xa, xb)
            za, zb = head(out.pooled1), head(out.pooled2)
        loss = nt_xent(za.float(), zb.float(), temperature)
        optimizer_step(loss, opt, sched, scaler, non_finite)
        total += float(loss.detach()) * len(rows)
        seen += len(rows)
        if on_step is not None:
            on_step(total / seen)
    return total / max(seen, 1)


def pretrain_optimizer(
    twin: TwinNet, head: ProjectionHead, lr: float, weight_decay: float, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over the extractor, both branches and the head; cosine decay over ``total_steps``."""
    params = [*twin.extractor.parameters(), *twin.branches.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, 0, "cosine"))
    return opt, sched
