"""The training loop's pure pieces: pair batches, online flips, schedules, one epoch, validation.

No files and no process groups here: the ``train`` stage (:mod:`pipeline.stages.train`) reads the
manifests, builds the image cache, sets up devices / DDP (:mod:`pipeline.io.compute`) and
checkpoints (:mod:`pipeline.io.checkpoints`); it calls these functions in between.

Design choices (the patent leaves these open; each is deliberate):

* **One training epoch = one pair epoch.** Training epoch ``e`` (0-based) uses pair epoch
  ``e mod P`` of the ``P`` epochs in the pair manifest (cycling when ``train.epochs > P``). The
  pairs of an epoch are shuffled with a permutation that is a pure function of ``(seed, e)``
  (:func:`epoch_order`, so a resumed run sees the same order) and cut into batches of
  ``train.batch_size`` pairs; a trailing batch of fewer than 2 pairs is dropped (batch norm).
* **Validation losses, every epoch** (:func:`validate`). ``val_loss_branch1`` / ``val_loss_branch2``
  are the mean focal losses (same ``gamma``/``alpha``/logit adjustment as training) of each branch over **all** val
  images (each image goes through both branches). ``val_loss_discriminator`` is the mean
  cross-entropy of the discriminator on a fixed set of val pairs built once by
  :func:`validation_pairs` (one pair per val image, alternating wanted-positive / wanted-negative in
  a seeded order, label computed from the two actual labels). ``val_loss_total = A * branch1 +
  B * branch2 + C * discriminator``, i.e. the joint training loss evaluated on val; the state with
  the lowest total (earliest epoch on ties) is the recognition model (patent S2).
* **Online augmentation** (:class:`OnlineAugment`): per-sample random flips (:func:`random_flip`,
  ``train.online_flip`` / ``train.flip_prob``) of the cached uint8 tensors, then, on the training
  device, a per-sample random affine (rotation, scale, translation; :func:`random_affine`,
  reflection padding) and colour jitter (brightness, contrast, saturation; :func:`random_color`)
  of ``train.online_rotation`` / ``online_scale`` / ``online_translate`` / ``online_color``. Every
  draw comes from one seeded generator in the main process (checkpointed with the rest of the RNG
  state), so the views do not depend on DataLoader workers and a resumed run is bit-identical.
  Why online as well as the offline ``augment`` copies: the copies are written once, so a rare
  class balanced with 20 copies shows the network the same 20 pictures every epoch; online views
  are new each epoch (the cure for the early over-fitting the quality benchmark measured). The
  patent's pairs are untouched: both images of a pair are transformed independently, the labels
  and the same/different target do not change. Last comes, per batch, an optional random
  convolution (RandConv, :func:`random_conv`, ``train.online_randconv``). With every online knob
  at 0 no extra number is drawn, so the training is the same as before the knobs existed.
* **Mixing** (:class:`BatchMix`, ``train.mixup_alpha`` / ``cutmix_alpha``, off by default): after
  the views, a batch may be blended with a shuffled copy of itself, both images of a pair alike,
  and the joint loss blended the same way (soft targets for both branches and the discriminator).
* **Site adversary** (:class:`SiteAdversary`, ``train.site_adversarial``, off by default): a
  training-only site classifier on both halves' GAP vectors behind a gradient reversal
  (:mod:`pipeline.core.adversarial`); its loss joins the backward pass only.
* **Sharding.** Under DDP each rank takes every ``world``-th shuffled pair (like
  ``DistributedSampler``, padded to a multiple of the world size) and every ``world``-th val image;
  the loss sums are reduced with the ``all_reduce`` callable the stage passes in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from pipeline.config import LossConfig, TrainConfig
from pipeline.core.adversarial import dann_coefficient, site_loss
from pipeline.core.imaging import normalize_unit, to_model_input
from pipeline.core.losses import focal_loss, joint_loss, mixed_joint_loss
from pipeline.core.model import TwinNet
from pipeline.errors import PipelineError

HISTORY_COLUMNS: tuple[str, ...] = (
    "epoch",
    "train_loss",
    "train_focal1",
    "train_focal2",
    "train_disc",
    "val_loss_branch1",
    "val_loss_branch2",
    "val_loss_discriminator",
    "val_loss_total",
    "lr",
    "seconds",
)
TRAIN_SUMS: tuple[str, ...] = ("train_loss", "train_focal1", "train_focal2", "train_disc")

Reduce = Callable[[list[float]], list[float]]


def _no_reduce(values: list[float]) -> list[float]:
    return values


class Images(Protocol):
    """Decoded uint8 images addressed by row (the stage's memory-mapped image cache)."""

    def take(self, rows: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class DeviceSetup:
    """Where and in which precision the network runs (decided by :func:`pipeline.io.compute.resolve_device`)."""

    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype, None = float32
    grad_scaler: bool  # fp16 needs loss scaling; bf16 does not
    channels_last: bool

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def describe(self) -> str:
        amp = "fp32" if self.amp_dtype is None else str(self.amp_dtype).replace("torch.", "")
        return f"{self.device} {amp}{' channels_last' if self.channels_last else ''}"

    def to_input(
        self, x_uint8: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """uint8 NCHW on the host -> normalised float on the device (channels_last when set).

        ``transform`` (training only) maps the float [0, 1] images on the device before they are
        normalised (:meth:`OnlineAugment.device_transform`)."""
        x = x_uint8.to(self.device, non_blocking=True)
        x = to_model_input(x) if transform is None else normalize_unit(transform(x.float().div_(255.0)))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


CPU = DeviceSetup(torch.device("cpu"), None, False, False)


# --------------------------------------------------------------------------------------------
# Pairs and batches
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairEpoch:
    """Rows (into the image cache) of one pair epoch, in manifest order."""

    left: np.ndarray
    right: np.ndarray
    same: np.ndarray  # int64 0/1, from the two actual labels

    def __len__(self) -> int:
        return int(self.left.shape[0])


@dataclass(frozen=True)
class TrainData:
    images: Images  # train rows first, then val rows
    labels: np.ndarray  # int64 class index per image row
    pair_epochs: list[PairEpoch]
    val_rows: np.ndarray
    val_pairs: PairEpoch
    class_counts: np.ndarray  # train images per class (for alpha="balanced")
    image_size: int
    digest: str
    # colour constancy of the train copies ({} = none); the val rows are corrected the same way
    preprocess: dict[str, Any] = dataclasses.field(default_factory=dict)
    # acquisition site per image row (index into site_names, the train images' sites, sorted;
    # -1 for a val image from a site no train image has); used by train.site_adversarial
    sites: np.ndarray | None = None
    site_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class CorrectedRows:
    """``base`` images whose rows from ``start`` on are replaced by ``corrected`` (the val rows
    under the colour constancy the train copies were written with)."""

    base: Images
    start: int
    corrected: np.ndarray  # uint8 (N - start, 3, S, S)

    def take(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        out = self.base.take(rows)
        late = rows >= self.start
        if late.any():
            out[late] = self.corrected[rows[late] - self.start]
        return out


def validation_pairs(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic val pairs: ``(left, right, same)`` as positions into ``labels``.

    One pair per image: images are visited in a seeded order; the k-th wants a positive partner
    when k is even, a negative one when odd; the partner is drawn (seeded) among the other images
    of the same class / of other classes, falling back to the other kind when the wanted kind
    does not exist. ``same`` is computed from the two labels. Images that have no other image at
    all are skipped.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = labels.shape[0]
    rng = np.random.default_rng([int(seed), 0x5EED])
    order = rng.permutation(n)
    positions = np.arange(n)
    left: list[int] = []
    right: list[int] = []
    for k, i in enumerate(order):
        same_pool = positions[(labels == labels[i]) & (positions != i)]
        other_pool = positions[labels != labels[i]]
        want_positive = k % 2 == 0
        pool = same_pool if (want_positive and same_pool.size) or not other_pool.size else other_pool
        if not pool.size:
            continue
        left.append(int(i))
        right.append(int(pool[rng.integers(pool.size)]))
    left_a = np.asarray(left, dtype=np.int64)
    right_a = np.asarray(right, dtype=np.int64)
    return left_a, right_a, (labels[left_a] == labels[right_a]).astype(np.int64)


def epoch_order(n: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> np.ndarray:
    """This rank's shuffled pair positions for training epoch ``epoch`` (DistributedSampler-like).

    The permutation depends only on ``(seed, epoch)``; it is padded with its own head to a
    multiple of ``world`` and rank ``r`` takes positions ``r, r + world, ...``.
    """
    order = np.random.default_rng([int(seed), 0xE90C, int(epoch)]).permutation(n)
    if world > 1:
        total = math.ceil(n / world) * world
        if total > n:
            order = np.concatenate([order, np.resize(order, total - n)])
        order = order[rank::world]
    return order


def make_batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Cut ``order`` into batches; a trailing batch of fewer than 2 items is dropped."""
    out = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if out and len(out[-1]) < 2:
        out.pop()
    return out


def epoch_batches(data: TrainData, epoch: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> tuple[PairEpoch, list[np.ndarray]]:
    """The pair epoch training epoch ``epoch`` uses and this rank's batches of it."""
    pe = data.pair_epochs[epoch % len(data.pair_epochs)]
    return pe, make_batches(epoch_order(len(pe), seed, epoch, rank, world), batch_size)


class BatchSet(torch.utils.data.Dataset):
    """Whole batches as items: (left uint8, right uint8, y_left, y_right), and with ``sites`` (the
    site index per image row, for :class:`SiteAdversary`) also (site_left, site_right)."""

    def __init__(
        self, images: Images, labels: np.ndarray, pe: PairEpoch, batches: list[np.ndarray], sites: np.ndarray | None = None
    ):
        self.images, self.labels, self.pe, self.batches, self.sites = images, labels, pe, batches, sites

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        idx = self.batches[i]
        lrows, rrows = self.pe.left[idx], self.pe.right[idx]
        items = (
            torch.from_numpy(self.images.take(lrows)),
            torch.from_numpy(self.images.take(rrows)),
            torch.from_numpy(self.labels[lrows]),
            torch.from_numpy(self.labels[rrows]),
        )
        if self.sites is None:
            return items
        return (*items, torch.from_numpy(self.sites[lrows]), torch.from_numpy(self.sites[rrows]))


def iter_batches(ds: BatchSet, num_workers: int, pin: bool) -> Iterator[tuple[torch.Tensor, ...]]:
    """The batches in order; with ``num_workers > 0`` gathered by DataLoader workers."""
    if num_workers <= 0:
        for i in range(len(ds)):
            yield ds[i]
        return
    # A private generator: creating the worker iterator must not draw from the global torch RNG
    # (that would shift dropout and make the result depend on num_workers).
    loader = torch.utils.data.DataLoader(
        ds, batch_size=None, shuffle=False, num_workers=num_workers, pin_memory=pin,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    yield from loader


def random_flip(x: torch.Tensor, gen: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Independent random horizontal and vertical flips per sample, each with probability ``p``."""
    draws = torch.rand((x.shape[0], 2), generator=gen)
    h = draws[:, 0] < p
    v = draws[:, 1] < p
    if h.any():
        x[h] = x[h].flip(-1)
    if v.any():
        x[v] = x[v].flip(-2)
    return x


def random_affine(x: torch.Tensor, u: torch.Tensor, rotation: float, scale: float, translate: float) -> torch.Tensor:
    """Per-sample random rotation (degrees in ``[-rotation, rotation]``), isotropic scale (in
    ``[1 - scale, 1 + scale]``, > 1 zooms in) and translation (up to ``translate`` of the side, each
    axis) of float images ``x`` (N, C, H, W), bilinear, reflection padding (the lesion's skin
    continues past the border; zeros would teach the network black corners).

    ``u`` (N, 4) holds uniform [0, 1) draws (angle, scale, tx, ty), so the function is pure and the
    caller owns the randomness."""
    u = u.to(device=x.device, dtype=x.dtype)
    angle = (2 * u[:, 0] - 1) * math.radians(rotation)
    zoom = 1 + (2 * u[:, 1] - 1) * scale
    tx, ty = (2 * u[:, 2] - 1) * 2 * translate, (2 * u[:, 3] - 1) * 2 * translate  # [-1, 1] grid units
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)  # (N, 2, 3)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def random_color(x: torch.Tensor, u: torch.Tensor, strength: float) -> torch.Tensor:
    """Per-sample brightness, contrast and saturation factors ``b, c, s``, each in ``[1 - strength,
    1 + strength]``, of float RGB images in [0, 1] (torchvision ColorJitter's definitions, in that
    order), clipped to [0, 1] once at the end rather than after each factor, which makes the three
    one linear map per image: ``s*c*b*x + (1-s)*c*b*grey(x) + (1-c)*b*mean(grey(x))`` (grey = ITU-R
    601 luma). ``u`` (N, 3): uniform [0, 1) draws."""
    f = 1 + (2 * u.to(device=x.device, dtype=x.dtype) - 1) * strength
    b, c, s = (f[:, i].view(-1, 1, 1, 1) for i in range(3))
    weights = torch.tensor((0.299, 0.587, 0.114), device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    grey = (x * weights).sum(1, keepdim=True)
    mean = grey.mean((2, 3), keepdim=True)
    return (x * (s * c * b) + grey * ((1 - s) * c * b) + mean * ((1 - c) * b)).clamp_(0, 1)


def random_conv(x: torch.Tensor, weight: torch.Tensor, mix: float) -> torch.Tensor:
    """RandConv (Xu et al., "Robust and generalizable visual representation learning via random
    convolutions", ICLR 2021), its mixing variant: ``mix * x + (1 - mix) * conv(x, weight)`` of
    float images ``x`` (N, 3, H, W), ``weight`` (3, 3, k, k) with k odd, reflection padding so the
    size stays and the border carries no black frame. Not clipped (as in the paper): the random
    filter may invert or swap colours and blur or sharpen texture, which is the point: a network
    that must read the lesion through any such filter cannot lean on one device's colour response
    or one sensor's texture. Pure: the caller draws ``weight`` and ``mix``."""
    k = int(weight.shape[-1])
    w = weight.to(device=x.device, dtype=x.dtype)
    padded = x if k == 1 else torch.nn.functional.pad(x, (k // 2,) * 4, mode="reflect")
    return x * mix + torch.nn.functional.conv2d(padded, w) * (1.0 - mix)


@dataclass(frozen=True)
class OnlineAugment:
    """The training-time views of a batch (``train.online_*``; see the module docstring).

    RandConv (``randconv``, the probability per batch; :func:`random_conv`), choices the paper
    leaves open or that differ from it:

    * One filter per call, i.e. per batch of one side of the pairs: the left and the right images
      of a batch get independent filters (and each is applied or not on its own draw), so a
      same-class pair may look as if taken by two different devices and the discriminator must
      see through that.
    * Weights ``N(0, 1 / (3 k^2))`` (variance one over the fan-in ``3 k^2``: a filter that keeps
      the images' scale on average), the kernel side ``k`` uniform over ``randconv_kernels``
      (default 1, 3, 5: at 48 px a 7x7 filter smears a lesion's structure away), the mixing
      weight uniform in [0, 1), as in the paper's mixing variant.
    * Measured on HAM10000 (bench/README.md, trials 86-89) it lost macro AUC on every split:
      colour is a class cue in dermoscopy (``vasc`` is red), and a random colour map hides it.
    * Applied last, after the affine and the colour jitter, to the float [0, 1] images before
      they are normalised; validation, the lowest-loss state and the export never see it.
    * A fixed number of draws per call while on (3 uniforms and a 3 x 3 x k_max x k_max normal
      tensor, whose centre k x k is used), so resume stays bit-identical; while off nothing is
      drawn.
    """

    flip_prob: float = 0.0  # 0 = no flips
    rotation: float = 0.0  # degrees
    scale: float = 0.0
    translate: float = 0.0
    color: float = 0.0
    randconv: float = 0.0  # probability per batch
    randconv_kernels: tuple[int, ...] = (1, 3, 5)

    @classmethod
    def from_config(cls, tc: TrainConfig) -> "OnlineAugment":
        return cls(
            flip_prob=tc.flip_prob if tc.online_flip else 0.0, rotation=tc.online_rotation,
            scale=tc.online_scale, translate=tc.online_translate, color=tc.online_color,
            randconv=tc.online_randconv, randconv_kernels=tuple(tc.online_randconv_kernels),
        )  # fmt: skip

    @property
    def geometric(self) -> bool:
        return self.rotation > 0 or self.scale > 0 or self.translate > 0

    def _draw_randconv(self, gen: torch.Generator) -> tuple[torch.Tensor, float] | None:
        """This batch's random filter and mixing weight, or ``None`` (not applied this time)."""
        u = torch.rand(3, generator=gen).tolist()  # applied?, kernel side, mixing weight
        k_max = max(self.randconv_kernels)
        w = torch.randn((3, 3, k_max, k_max), generator=gen)
        if u[0] >= self.randconv:
            return None
        k = self.randconv_kernels[int(u[1] * len(self.randconv_kernels))]  # u[1] < 1: a valid index
        lo = (k_max - k) // 2
        return w[:, :, lo : lo + k, lo : lo + k] / math.sqrt(3 * k * k), u[2]

    def device_transform(self, n: int, gen: torch.Generator) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The affine + colour + random-convolution step for a batch of ``n`` images, its draws
        taken from ``gen`` now (in the main process, in a fixed order); ``None`` when all are off
        (nothing drawn)."""
        if not self.geometric and self.color <= 0 and self.randconv <= 0:
            return None
        u_geo = torch.rand((n, 4), generator=gen) if self.geometric else None
        u_col = torch.rand((n, 3), generator=gen) if self.color > 0 else None
        conv = self._draw_randconv(gen) if self.randconv > 0 else None

        def apply(x: torch.Tensor) -> torch.Tensor:
            if u_geo is not None:
                x = random_affine(x, u_geo, self.rotation, self.scale, self.translate)
            if u_col is not None:
                x = random_color(x, u_col, self.color)
            if conv is not None:
                x = random_conv(x, *conv)
            return x

        return apply

    def __call__(self, x_uint8: torch.Tensor, gen: torch.Generator, ds: "DeviceSetup") -> torch.Tensor:
        """uint8 NCHW on the host -> an augmented, normalised batch on ``ds``'s device."""
        if self.flip_prob > 0:
            x_uint8 = random_flip(x_uint8, gen, self.flip_prob)
        return ds.to_input(x_uint8, self.device_transform(x_uint8.shape[0], gen))


@dataclass(frozen=True)
class MixDraw:
    """One batch's mix: partner ``perm[i]`` of sample ``i``, weight ``lam`` of the sample itself, and
    for CutMix the pasted box ``(top, left, height, width)`` in pixels (``None``: mixup)."""

    lam: float
    perm: torch.Tensor  # int64 (N,), on the host
    box: tuple[int, int, int, int] | None = None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The mixed batch of ``x`` (N, C, H, W), on ``x``'s device and in its memory format
        (channels-last stays channels-last); a new tensor, ``x`` unchanged."""
        perm = self.perm.to(x.device)
        if self.box is None:
            out = x * self.lam + x[perm] * (1.0 - self.lam)
        else:
            top, left, h, w = self.box
            out = x.clone()
            out[:, :, top : top + h, left : left + w] = x[perm][:, :, top : top + h, left : left + w]
        channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        return out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@dataclass(frozen=True)
class BatchMix:
    """Mixup (Zhang et al., ICLR 2018) and CutMix (Yun et al., ICCV 2019) of pair batches
    (``train.mixup_alpha`` / ``cutmix_alpha`` / ``mix_prob``).

    Choices (the patent has no mixing; it leaves the pairs and the joint loss as they are):

    * One draw per batch, as timm does: ``lam ~ Beta(alpha, alpha)`` and a random permutation of the
      batch; the **same** ``lam``, partner and (CutMix) box for the left and the right image of a
      pair, so a mixed pair is ``lam`` of pair ``i`` and ``1 - lam`` of pair ``perm[i]`` on both
      sides and its loss is the same blend of the two pairs' joint losses
      (:func:`pipeline.core.losses.mixed_joint_loss`): soft class targets for both branches and a
      soft same/different target for the discriminator.
    * CutMix box: side ratio ``sqrt(1 - lam)``, centre uniform over the image, clipped at the
      border; ``lam`` is then recomputed as the area kept, so the targets match the pixels.
    * With both alphas on, each mixed batch picks mixup or CutMix with probability 1/2; a batch is
      mixed with probability ``mix_prob``.
    * Applied after the online views, to the normalised batch on the training device (the
      normalisation is affine per channel, so mixing before or after it is the same). Validation,
      the lowest-loss state and the export are untouched.
    * Every draw comes from the training generator (checkpointed), a fixed number per batch while
      on, so resume stays bit-identical; while both alphas are 0 nothing is drawn and training is
      exactly what it was before the knobs existed.
    """

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0

    @classmethod
    def from_config(cls, tc: TrainConfig) -> "BatchMix":
        return cls(mixup_alpha=tc.mixup_alpha, cutmix_alpha=tc.cutmix_alpha, prob=tc.mix_prob)

    @property
    def on(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def draw(self, n: int, size: tuple[int, int], gen: torch.Generator) -> MixDraw | None:
        """The mix of a batch of ``n`` images of ``size`` = (H, W), or ``None`` (not mixed)."""
        if not self.on:
            return None
        u = torch.rand(4, generator=gen).tolist()  # mixed?, which one, box centre y, x
        perm = torch.randperm(n, generator=gen)
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=gen)))
        cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or u[1] < 0.5)
        lam = float(rng.beta(*(2 * [self.cutmix_alpha if cutmix else self.mixup_alpha])))
        if u[0] >= self.prob:
            return None
        if not cutmix:
            return MixDraw(lam, perm)
        h, w = size
        cut_h, cut_w = int(round(h * math.sqrt(1.0 - lam))), int(round(w * math.sqrt(1.0 - lam)))
        cy, cx = int(u[2] * h), int(u[3] * w)
        top, bottom = max(cy - cut_h // 2, 0), min(cy + (cut_h - cut_h // 2), h)
        left, right = max(cx - cut_w // 2, 0), min(cx + (cut_w - cut_w // 2), w)
        if bottom <= top or right <= left:
            return MixDraw(1.0, perm)  # an empty box: the batch as it is
        kept = 1.0 - (bottom - top) * (right - left) / (h * w)
        return MixDraw(kept, perm, (top, left, bottom - top, right - left))


# --------------------------------------------------------------------------------------------
# Optimisation
# --------------------------------------------------------------------------------------------


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of ``train.lr`` at optimizer step ``step`` (linear warmup, then the schedule)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))


def build_optimizer(params: Any, tc: TrainConfig) -> torch.optim.Optimizer:
    if tc.optimizer == "sgd":
        return torch.optim.SGD(params, lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay, nesterov=True)
    return torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)


def build_scheduler(
    opt: torch.optim.Optimizer, tc: TrainConfig, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per optimizer step. ``onecycle`` uses torch's OneCycleLR (its own warmup)."""
    if tc.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=tc.lr, total_steps=max(1, total_steps))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, warmup_steps, tc.schedule))


def optimizer_step(
    objective: torch.Tensor, opt: torch.optim.Optimizer, sched: Any, scaler: Any, non_finite: str
) -> None:
    """One optimizer step on ``objective`` (through the grad scaler, then the scheduler); raises
    :class:`PipelineError` with the message ``non_finite`` when the objective is not finite."""
    if not torch.isfinite(objective):
        raise PipelineError(non_finite)
    opt.zero_grad(set_to_none=True)
    scaler.scale(objective).backward()
    scaler.step(opt)
    scaler.update()
    sched.step()


def float_output(out: Any) -> Any:
    """The model output with every float tensor in float32 (losses run in float32 under AMP).

    Works for a NamedTuple or a dataclass output; anything else is returned unchanged."""
    if hasattr(out, "_asdict"):
        fields = out._asdict()
    elif dataclasses.is_dataclass(out):
        fields = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
    else:
        return out
    conv = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in fields.items()}
    return type(out)(**conv)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(gen: torch.Generator) -> dict[str, Any]:
    """Every RNG state a resumed run needs (torch, CUDA, numpy, python, the flip generator)."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "flip": gen.get_state(),
    }


def set_rng_state(state: dict[str, Any], gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    gen.set_state(state["flip"])


def cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


# --------------------------------------------------------------------------------------------
# One epoch, validation
# --------------------------------------------------------------------------------------------


def build_ema(model: torch.nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """An exponential moving average of ``model``'s weights and buffers (``train.ema_decay``):
    after every optimizer step ``ema = decay * ema + (1 - decay) * weights`` (the first step
    copies them). ``.module`` is the averaged twin; validation, the lowest-loss state and the
    export use it when EMA is on."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def build_swa(model: torch.nn.Module) -> torch.optim.swa_utils.AveragedModel:
    """Stochastic weight averaging (``train.swa_start``; Izmailov et al., UAI 2018): the uniform
    running mean of ``model``'s weights **and** batch-norm buffers, updated once at the end of each
    epoch from ``swa_start`` on (the first update copies them). ``.module`` is the averaged twin;
    from ``swa_start`` on, validation, the lowest-loss state and the export use it.

    Choices where the method leaves room: by default snapshots per epoch (``train.swa_every:
    epoch``, what bench/README.md trials 20-27 measured); ``swa_every: step`` averages every
    optimizer step instead (:func:`swa_per_step`, the dense variant of SWAD, Cha et al., NeurIPS
    2021). The schedule is left as configured (cosine), not switched to a constant SWA learning
    rate. Batch-norm statistics are by default the mean of the snapshots' running statistics, so
    the averaged model is ready after each epoch at no extra cost; ``train.swa_bn: recompute``
    recomputes them by one pass over the train images instead (:func:`recompute_batch_norm`).

    The running mean is torch's per-tensor SWA update, ``avg + (new - avg) / (n + 1)``, on every
    device: torch's default on CUDA is a fused (foreach) update whose integer branch fails on the
    batch-norm counters (``num_batches_tracked``: "Integer division with addcdiv is no longer
    supported", torch 2.11 on an H200), and on CPU torch already takes this per-tensor path, so CPU
    results are unchanged. Integer buffers keep the truncated mean, as on CPU before."""
    from torch.optim.swa_utils import AveragedModel, get_swa_avg_fn

    return AveragedModel(model, avg_fn=get_swa_avg_fn(), use_buffers=True)


def swa_active(epoch: int, swa_start: int | None) -> bool:
    """Whether the weights after 1-based ``epoch`` join the average (``train.swa_start``)."""
    return swa_start is not None and epoch >= swa_start


def swa_per_step(epoch: int, tc: TrainConfig) -> bool:
    """Whether every optimizer step of 1-based ``epoch`` joins the average (``train.swa_every:
    step``, the dense averaging of SWAD, Cha et al., NeurIPS 2021) rather than only the weights at
    the epoch's end. SWAD's window is where the validation loss stays near its minimum; here its
    start is ``swa_start`` and its end is the patent's lowest-loss state: the mean as validated at
    the end of each epoch is a candidate state, so the kept state is the dense mean from the first
    step of epoch ``swa_start`` to the end of the epoch with the lowest validation loss."""
    return tc.swa_every == "step" and swa_active(epoch, tc.swa_start)


@torch.no_grad()
def recompute_batch_norm(
    model: torch.nn.Module, images: Images | np.ndarray, rows: np.ndarray, batch_size: int, ds: DeviceSetup
) -> None:
    """Batch-norm running statistics of ``model`` recomputed from scratch over the images ``rows``
    (``train.swa_bn: recompute``): every batch-norm layer's statistics are reset and become the
    cumulative mean of its per-batch statistics in training mode (momentum ``None``), as
    ``torch.optim.swa_utils.update_bn`` does and SWA / SWAD prescribe for averaged weights, whose
    own activations the averaged running statistics do not describe.

    Choices: the twin gets each image as both halves of a pair, so the shared extractor and both
    branches see every image once (a one-input classifier, e.g. the benchmark's baselines, gets it
    once); the images are the cached training copies without online views; style mixing is
    suspended for the pass (dropout, also active in training mode, sits after the last batch norm
    and changes nothing). Modes, momenta and the style mixing are restored afterwards. ``images``
    is the image cache or a uint8 array (N, 3, S, S)."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not layers or len(rows) == 0:
        return
    pair = isinstance(model, TwinNet)
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    extractor = getattr(model, "extractor", None)
    style_p = getattr(extractor, "style_mix_p", 0.0)
    if style_p:
        extractor.style_mix_p = 0.0  # type: ignore[union-attr]
    was_training = model.training
    model.train()
    try:
        for i in range(0, len(rows), batch_size):
            r = rows[i : i + batch_size]
            batch = images[r] if isinstance(images, np.ndarray) else images.take(r)
            x = ds.to_input(torch.from_numpy(np.ascontiguousarray(batch)))
            with ds.autocast():
                model(x, x) if pair else model(x)
    finally:
        model.train(was_training)
        for m, momentum in zip(layers, momenta, strict=True):
            m.momentum = momentum
        if style_p:
            extractor.style_mix_p = style_p  # type: ignore[union-attr]


def swa_epoch_end(
    swa: torch.optim.swa_utils.AveragedModel,
    model: torch.nn.Module,
    epoch: int,
    tc: TrainConfig,
    images: Images | np.ndarray,
    train_rows: np.ndarray,
    batch_size: int,
    ds: DeviceSetup,
) -> torch.nn.Module:
    """The averaged model to validate at the end of 1-based ``epoch`` (call only while
    :func:`swa_active`): ``model``'s weights join the mean here unless every step already did
    (:func:`swa_per_step`), and with ``train.swa_bn: recompute`` the mean's batch-norm statistics
    are recomputed over ``train_rows`` (:func:`recompute_batch_norm`). One place for the twin's
    stage and the benchmark's baselines."""
    if not swa_per_step(epoch, tc):
        swa.update_parameters(model)
    if tc.swa_bn == "recompute":
        recompute_batch_norm(swa.module, images, train_rows, batch_size, ds)
    return swa.module


@dataclass(frozen=True)
class SiteAdversary:
    """The site-adversarial term of one epoch (``train.site_adversarial``,
    :mod:`pipeline.core.adversarial`): the site head (trained by the same optimizer), the largest
    reversed-gradient coefficient, and the optimizer steps before this epoch and in all, which give
    the ramp's progress at each step (so a resumed run continues the same ramp)."""

    head: torch.nn.Module
    weight: float
    first_step: int
    total_steps: int

    def coefficient(self, step_in_epoch: int) -> float:
        return dann_coefficient((self.first_step + step_in_epoch) / max(1, self.total_steps), self.weight)


def train_epoch(
    model: torch.nn.Module,
    batches: Iterator[tuple[torch.Tensor, ...]],
    *,
    opt: torch.optim.Optimizer,
    sched: Any,
    scaler: Any,
    gen: torch.Generator,
    tc: TrainConfig,
    loss_cfg: LossConfig,
    alpha: torch.Tensor | None,
    ds: DeviceSetup,
    epoch: int,
    on_step: Callable[[dict[str, float], float], None] | None = None,
    averaged: Any = None,
    adversary: SiteAdversary | None = None,
    shift: torch.Tensor | None = None,
) -> tuple[dict[str, float], float]:
    """One pass over ``batches``: ``(loss sums weighted by batch size, pairs seen)``.

    ``averaged`` (:func:`build_ema`, or :func:`build_swa` when :func:`swa_per_step`) is updated
    after every optimizer step. With ``adversary`` the batches carry the two sides' site indices
    (:class:`BatchSet` with ``sites``), the site loss of both halves' GAP vectors joins the
    backward pass and its sum is reported as ``train_site`` (the joint loss sums are unchanged).
    ``shift`` is the logit adjustment of both branches (:func:`pipeline.core.losses.logit_shift`).

    Raises :class:`PipelineError` on a non-finite loss (the learning rate is the usual cause).
    """
    sums = dict.fromkeys(TRAIN_SUMS, 0.0)
    if adversary is not None:
        sums["train_site"] = 0.0
    n_seen = 0.0
    views = OnlineAugment.from_config(tc)
    mixing = BatchMix.from_config(tc)
    non_finite = f"non-finite training loss at epoch {epoch + 1}; lower train.lr"
    for step, (xl_u8, xr_u8, yl, yr, *sites) in enumerate(batches):
        xl, xr = views(xl_u8, gen, ds), views(xr_u8, gen, ds)
        yl, yr = yl.to(ds.device, non_blocking=True), yr.to(ds.device, non_blocking=True)
        mix = mixing.draw(xl.shape[0], (xl.shape[-2], xl.shape[-1]), gen)
        if mix is not None:
            xl, xr = mix.apply(xl), mix.apply(xr)
        with ds.autocast():
            out = model(xl, xr)
        out = float_output(out)
        perm = None if mix is None else mix.perm.to(yl.device)
        if mix is None:
            loss = joint_loss(out, yl, yr, loss_cfg, alpha, shift)
        else:
            loss = mixed_joint_loss(out, yl, yr, loss_cfg, mix.lam, perm, alpha, shift)
        objective = loss.total
        if adversary is not None:
            y2, s2 = torch.cat([yl, yr]), torch.cat(sites).to(ds.device, non_blocking=True)
            site = site_loss(
                adversary.head, torch.cat([out.pooled1, out.pooled2]), y2, s2, adversary.coefficient(step),
                1.0 if mix is None else mix.lam, None if perm is None else torch.cat([perm, perm + yl.shape[0]]),
            )  # fmt: skip
            objective = objective + site
        optimizer_step(objective, opt, sched, scaler, non_finite)
        if averaged is not None:
            averaged.update_parameters(getattr(model, "module", model))
        n = float(yl.shape[0])
        n_seen += n
        for key, val in zip(TRAIN_SUMS, (loss.total, loss.focal1, loss.focal2, loss.disc), strict=True):
            sums[key] += float(val.detach()) * n
        if adversary is not None:
            sums["train_site"] += float(site.detach()) * n
        if on_step is not None:
            on_step(sums, n_seen)
    return sums, n_seen


def _focal_sum(
    logits: torch.Tensor, y: torch.Tensor, loss_cfg: LossConfig, alpha: torch.Tensor | None, shift: torch.Tensor | None
) -> float:
    """Sum over the batch of the per-image focal loss (so sums over batches give the exact mean)."""
    return float(focal_loss(logits.float(), y, loss_cfg.gamma, alpha, reduction="sum", shift=shift))


@torch.no_grad()
def validate(
    twin: torch.nn.Module,
    data: TrainData,
    loss_cfg: LossConfig,
    batch_size: int,
    ds: DeviceSetup,
    alpha: torch.Tensor | None,
    rank: int = 0,
    world: int = 1,
    all_reduce: Reduce = _no_reduce,
    shift: torch.Tensor | None = None,
) -> dict[str, float]:
    """Validation losses of branch 1, branch 2, the discriminator and their weighted total
    (``alpha`` and the logit adjustment ``shift`` as in training; never label smoothing)."""
    was_training = twin.training
    twin.eval()
    rows = data.val_rows[rank::world]
    s1 = s2 = n_img = 0.0
    for i in range(0, len(rows), batch_size):
        r = rows[i : i + batch_size]
        x = ds.to_input(torch.from_numpy(data.images.take(r)))
        y = torch.from_numpy(data.labels[r]).to(ds.device)
        with ds.autocast():
            out = twin(x, x)
        s1 += _focal_sum(out.logits1, y, loss_cfg, alpha, shift)
        s2 += _focal_sum(out.logits2, y, loss_cfg, alpha, shift)
        n_img += len(r)
    vp = data.val_pairs
    pos = np.arange(len(vp))[rank::world]
    sd = n_pair = 0.0
    for i in range(0, len(pos), batch_size):
        p = pos[i : i + batch_size]
        xl = ds.to_input(torch.from_numpy(data.images.take(vp.left[p])))
        xr = ds.to_input(torch.from_numpy(data.images.take(vp.right[p])))
        yl = torch.from_numpy(data.labels[vp.left[p]]).to(ds.device)
        yr = torch.from_numpy(data.labels[vp.right[p]]).to(ds.device)
        with ds.autocast():
            out = twin(xl, xr)
        sd += float(joint_loss(float_output(out), yl, yr, loss_cfg, alpha).disc) * len(p)
        n_pair += len(p)
    s1, s2, n_img, sd, n_pair = all_reduce([s1, s2, n_img, sd, n_pair])
    twin.train(was_training)
    b1 = s1 / max(n_img, 1.0)
    b2 = s2 / max(n_img, 1.0)
    disc = sd / n_pair if n_pair else 0.0
    total = loss_cfg.A * b1 + loss_cfg.B * b2 + loss_cfg.C * disc
    return {
        "val_loss_branch1": b1,
        "val_loss_branch2": b2,
        "val_loss_discriminator": disc,
        "val_loss_total": total,
    }
