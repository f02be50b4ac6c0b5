"""The training loop of the twin (and of the benchmark's baselines): pair batches, schedules, one
:class:`Trainer`, validation. Pure: no files and no process groups here.

The ``train`` stage (:mod:`pipeline.stages.train`) reads the manifests, builds the image cache,
sets up devices / DDP (:mod:`pipeline.io.compute`) and writes checkpoints
(:mod:`pipeline.io.checkpoints`); everything between is here. ``bench/quality.py`` trains its
single-branch baselines through the same :class:`Trainer` with a cross-entropy loss.

Design choices (the patent leaves these open; each is deliberate):

* **One training epoch = one pair epoch.** Training epoch ``e`` (0-based) uses pair epoch
  ``e mod P`` of the ``P`` epochs in the pair manifest (cycling when ``train.epochs > P``). The
  pairs of an epoch are shuffled with a permutation that is a pure function of ``(seed, e)``
  (:func:`epoch_order`, so a resumed run sees the same order) and cut into batches of
  ``train.batch_size`` pairs; a trailing batch of fewer than 2 pairs is dropped (batch norm).
* **Validation losses, every epoch** (:func:`validate`). ``val_loss_branch1`` / ``val_loss_branch2``
  are the mean focal losses (same ``gamma`` / ``alpha`` as training) of each branch over **all** val
  images (each image goes through both branches). ``val_loss_discriminator`` is the mean
  cross-entropy of the discriminator on a fixed set of val pairs built once by
  :func:`validation_pairs` (one pair per val image, alternating wanted-positive / wanted-negative in
  a seeded order, label computed from the two actual labels). ``val_loss_total = A * branch1 +
  B * branch2 + C * discriminator``, i.e. the joint training loss evaluated on val; the state with
  the lowest total (earliest epoch on ties) is the recognition model (patent S2, :meth:`Trainer.fit`).
* **The trainer's extension points** (:class:`Trainer`): the *loss* (the twin's joint loss,
  :func:`twin_loss`; a baseline's cross-entropy), the *batch transform* (per-sample random flips of
  the cached uint8 images, :func:`flip_transform`, ``train.online_flip`` / ``flip_prob``; both images
  of a pair are flipped independently, labels and the same/different target unchanged) and the
  *weight average* (:class:`WeightAverage`, ``train.swa_start``). Every random draw comes from one
  seeded generator in the main process (checkpointed with the rest of the RNG state), so a resumed
  run is bit-identical and ``train.num_workers`` changes nothing.
* **Sharding.** Under DDP each rank takes every ``world``-th shuffled pair (like
  ``DistributedSampler``, padded to a multiple of the world size) and every ``world``-th val image;
  the loss sums are reduced with the ``reduce`` callable the stage passes in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from pipeline.config import LossConfig, TrainConfig
from pipeline.core.imaging import to_model_input
from pipeline.core.losses import focal_loss, joint_loss
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

Reduce = Callable[[list[float]], list[float]]
Batch = tuple[torch.Tensor, ...]  # uint8 image batches on the host, then their int64 labels
LossFn = Callable[[Any, tuple[torch.Tensor, ...]], dict[str, torch.Tensor]]
Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


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

    def to_input(self, x_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW on the host -> normalised float on the device (channels_last when set)."""
        x = to_model_input(x_uint8.to(self.device, non_blocking=True))
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
    """Whole pair batches as items: (left uint8, right uint8, y_left, y_right)."""

    def __init__(self, images: Images, labels: np.ndarray, pe: PairEpoch, batches: list[np.ndarray]):
        self.images, self.labels, self.pe, self.batches = images, labels, pe, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> Batch:
        idx = self.batches[i]
        lrows, rrows = self.pe.left[idx], self.pe.right[idx]
        return (
            torch.from_numpy(self.images.take(lrows)),
            torch.from_numpy(self.images.take(rrows)),
            torch.from_numpy(self.labels[lrows]),
            torch.from_numpy(self.labels[rrows]),
        )


def iter_batches(ds: BatchSet, num_workers: int, pin: bool) -> Iterator[Batch]:
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


def flip_transform(tc: TrainConfig) -> Transform | None:
    """The batch transform of ``train.online_flip`` / ``flip_prob`` (``None`` when off: nothing drawn)."""
    if not tc.online_flip or tc.flip_prob <= 0:
        return None
    p = tc.flip_prob
    return lambda x, gen: random_flip(x, gen, p)


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


def param_groups(model: torch.nn.Module, tc: TrainConfig, pretrained: list[torch.nn.Parameter]) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: ``pretrained`` (a backbone's weights) at
    ``train.pretrained_lr`` when set, every other parameter at ``train.lr``; one group otherwise."""
    if tc.pretrained_lr is None or not pretrained:
        return [{"params": list(model.parameters()), "lr": tc.lr}]
    ids = {id(p) for p in pretrained}
    return [{"params": list(pretrained), "lr": tc.pretrained_lr},
            {"params": [p for p in model.parameters() if id(p) not in ids], "lr": tc.lr}]  # fmt: skip


def build_optimizer(params: Any, tc: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or SGD over ``params`` (parameters, or :func:`param_groups` with their own ``lr``)."""
    if tc.optimizer == "sgd":
        return torch.optim.SGD(params, lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay, nesterov=True)
    return torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)


def build_scheduler(
    opt: torch.optim.Optimizer, tc: TrainConfig, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per optimizer step; every group's own ``lr`` is scaled alike. ``onecycle`` uses
    torch's OneCycleLR (its own warmup) up to each group's ``lr``."""
    if tc.schedule == "onecycle":
        peaks = [float(g["lr"]) for g in opt.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=peaks, total_steps=max(1, total_steps))
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

    Works for a tensor, a NamedTuple or a dataclass output; anything else is returned unchanged."""
    if torch.is_tensor(out):
        return out.float() if out.is_floating_point() else out
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
# The trainer
# --------------------------------------------------------------------------------------------


class WeightAverage:
    """Stochastic weight averaging (``train.swa_start``; Izmailov et al., UAI 2018): the uniform
    running mean of the weights **and** batch-norm buffers at the end of each epoch from
    ``start`` (1-based) on; from then on the mean is what is validated, kept as the lowest-loss
    state and exported. Choices: the schedule is left as configured (not switched to a constant SWA
    learning rate); batch-norm statistics are the mean of the snapshots' running statistics, so the
    averaged model is ready after each epoch at no extra cost.

    The running mean is torch's per-tensor SWA update, ``avg + (new - avg) / (n + 1)``, on every
    device: torch's default on CUDA is a fused (foreach) update whose integer branch fails on the
    batch-norm counters (``num_batches_tracked``: "Integer division with addcdiv is no longer
    supported"); on CPU torch takes this per-tensor path anyway. Integer buffers keep the
    truncated mean."""

    def __init__(self, model: torch.nn.Module, start: int) -> None:
        from torch.optim.swa_utils import AveragedModel, get_swa_avg_fn

        self.start = int(start)
        self.averaged = AveragedModel(model, avg_fn=get_swa_avg_fn(), use_buffers=True)

    def active(self, epoch: int) -> bool:
        """Whether the weights after 1-based ``epoch`` join the mean."""
        return epoch >= self.start

    def judged(self, model: torch.nn.Module, epoch: int) -> torch.nn.Module:
        """The module to validate after 1-based ``epoch``: ``model`` before ``start``, else the mean
        with ``model``'s weights added."""
        if not self.active(epoch):
            return model
        self.averaged.update_parameters(model)
        return self.averaged.module


def twin_loss(loss_cfg: LossConfig, alpha: torch.Tensor | None) -> LossFn:
    """The patent's joint loss as a :class:`Trainer` loss: the twin's output and ``(y_left,
    y_right)`` -> ``train_loss`` (the objective) and its three unweighted parts."""

    def loss(out: Any, targets: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        parts = joint_loss(out, targets[0], targets[1], loss_cfg, alpha)
        return {"train_loss": parts.total, "train_focal1": parts.focal1, "train_focal2": parts.focal2,
                "train_disc": parts.disc}  # fmt: skip

    return loss


@dataclass
class Trainer:
    """One training loop: forward, loss, optimizer step, weight average, validation, and the
    lowest-validation-loss state (patent S2).

    ``model`` is what the optimizer steps (DDP-wrapped under ``torchrun``), ``net`` the plain
    module inside it. A batch is ``n`` uint8 image tensors followed by their label tensors;
    ``n`` is ``inputs`` (2 for the twin's pairs, 1 for a classifier). Each image tensor goes
    through ``transform`` (drawing from ``gen``) and onto the device; the model's float32 output
    and the labels go to ``loss``, whose first entry is the objective.
    """

    model: torch.nn.Module
    net: torch.nn.Module
    loss: LossFn
    opt: torch.optim.Optimizer
    sched: Any
    scaler: Any
    ds: DeviceSetup
    gen: torch.Generator
    inputs: int = 2
    transform: Transform | None = None
    average: WeightAverage | None = None
    reduce: Reduce = _no_reduce

    def train_epoch(
        self, batches: Iterator[Batch], epoch: int, on_step: Callable[[dict[str, float]], None] | None = None
    ) -> dict[str, float]:
        """One pass over ``batches``; the mean of each loss entry over the samples seen (all ranks).
        Raises :class:`PipelineError` on a non-finite loss (the learning rate is the usual cause)."""
        self.model.train()
        sums: dict[str, float] = {}
        n_seen = 0.0
        non_finite = f"non-finite training loss at epoch {epoch + 1}; lower train.lr"
        for batch in batches:
            xs = [self._input(x) for x in batch[: self.inputs]]
            ys = tuple(y.to(self.ds.device, non_blocking=True) for y in batch[self.inputs :])
            with self.ds.autocast():
                out = self.model(*xs)
            terms = self.loss(float_output(out), ys)
            optimizer_step(next(iter(terms.values())), self.opt, self.sched, self.scaler, non_finite)
            n = float(ys[0].shape[0])
            n_seen += n
            for key, val in terms.items():
                sums[key] = sums.get(key, 0.0) + float(val.detach()) * n
            if on_step is not None:
                on_step({k: v / n_seen for k, v in sums.items()})
        keys = list(sums)
        reduced = self.reduce([sums[k] for k in keys] + [n_seen])
        return {k: v / max(reduced[-1], 1.0) for k, v in zip(keys, reduced[:-1], strict=True)}

    def _input(self, x_uint8: torch.Tensor) -> torch.Tensor:
        if self.transform is not None:
            x_uint8 = self.transform(x_uint8, self.gen)
        return self.ds.to_input(x_uint8)

    def fit(
        self,
        epochs: range,
        batches: Callable[[int], tuple[Iterator[Batch], int]],
        score: Callable[[torch.nn.Module], dict[str, float]],
        *,
        key: str,
        history: list[dict[str, float]] | None = None,
        best: dict[str, Any] | None = None,
        progress: Callable[[int, int], Callable[[dict[str, float]], None] | None] | None = None,
        on_epoch: Callable[[list[dict[str, float]], dict[str, Any], bool], None] | None = None,
    ) -> tuple[list[dict[str, float]], dict[str, Any]]:
        """Train ``epochs`` (0-based, e.g. ``range(resumed, total)``), validating after each with
        ``score``; returns the history rows and the best state: ``{"epoch", **scores, "state"}``
        of the lowest ``scores[key]`` (earliest on ties). ``batches(epoch)`` gives an epoch's
        batches and their count; ``progress(epoch, count)`` an optional per-step callback;
        ``on_epoch(history, best, improved)`` runs after each epoch (the stage's checkpoints)."""
        history = list(history or [])
        for epoch in epochs:
            t0 = time.perf_counter()
            lr = float(self.opt.param_groups[0]["lr"])
            it, count = batches(epoch)
            means = self.train_epoch(it, epoch, progress(epoch, count) if progress is not None else None)
            judged = self.net if self.average is None else self.average.judged(self.net, epoch + 1)
            scores = score(judged)
            row = {"epoch": epoch + 1, **means, **scores, "lr": lr, "seconds": time.perf_counter() - t0}
            history.append(row)
            improved = best is None or scores[key] < best[key]
            if improved:
                best = {"epoch": epoch + 1, **scores, "state": cpu_state(judged)}
            assert best is not None
            if on_epoch is not None:
                on_epoch(history, best, improved)
        if best is None:
            raise PipelineError("no epoch to train: the run has no epoch left and no best state")
        return history, best


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _focal_sum(logits: torch.Tensor, y: torch.Tensor, loss_cfg: LossConfig, alpha: torch.Tensor | None) -> float:
    """Sum over the batch of the per-image focal loss (so sums over batches give the exact mean)."""
    return float(focal_loss(logits.float(), y, loss_cfg.gamma, alpha, reduction="sum"))


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
) -> dict[str, float]:
    """Validation losses of branch 1, branch 2, the discriminator and their weighted total
    (``alpha`` as in training)."""
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
        s1 += _focal_sum(out.logits1, y, loss_cfg, alpha)
        s2 += _focal_sum(out.logits2, y, loss_cfg, alpha)
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
