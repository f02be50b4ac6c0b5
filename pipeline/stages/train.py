"""Stage ``train``: the twin network on the pair manifest; lowest-validation-loss state kept (S2).

Reads the augmented manifest (and its ``meta.json``: the image size to train at is the size the
images were written at, never ``augment.image_size`` of the current params) and the pair manifest,
decodes every train and val image once into a memory-mapped uint8 cache
(:mod:`pipeline.io.imagecache`) and trains :class:`pipeline.core.model.TwinNet` with the joint loss
``A * focal(branch 1) + B * focal(branch 2) + C * CE(discriminator)`` through the pure loop
pieces of :mod:`pipeline.core.training` (design choices there).

* **Resumable and reproducible.** ``last.pt`` is written atomically after every epoch with model,
  optimizer, scheduler, grad scaler, every RNG state (per rank), history and the best state so
  far. Re-running the same command resumes after the last completed epoch; on CPU the result is
  bitwise identical to an uninterrupted run. ``last.pt`` stores a digest of the training-relevant
  params (seed, model, loss, train except progress/num_workers/cpu_threads/device), the input
  data and the world size; if it does not match, training starts fresh (logged). A finished run
  re-run with the same inputs retrains nothing and rewrites the same outputs.
  ``SKIN_TWIN_STOP_AFTER_EPOCH=N`` (environment) stops the run right after epoch ``N``'s
  checkpoint, to simulate a kill in tests.
* **Devices and DDP** (:mod:`pipeline.io.compute`). Under ``torchrun`` with ``WORLD_SIZE > 1`` the
  model is wrapped in ``DistributedDataParallel``; ``train.batch_size`` is per process. Only rank 0
  writes files.
* **Data loading.** Batches are gathered from the uint8 cache; with ``train.num_workers > 0`` a
  ``DataLoader`` gathers whole batches in worker processes.
* **Colour constancy.** When ``meta.json`` records one (``augment.color_constancy``), the train
  copies already carry it and the val images are corrected here in memory
  (:class:`pipeline.core.training.CorrectedRows`); ``best.pt`` records it (``preprocess``) so the
  export applies it at inference.
* **Label smoothing / EMA.** ``loss.label_smoothing`` smooths both branches' training targets; the
  validation losses stay unsmoothed. With ``train.ema_decay`` an exponential moving average of the
  weights (:func:`pipeline.core.training.build_ema`, updated every optimizer step, kept in
  ``last.pt``) is what is validated: the lowest-loss state, and therefore the branch choice and
  the export, are the EMA weights. Both are left out of the resume digest while off.
* **Logit adjustment.** ``loss.logit_adjust`` > 0: one shift ``tau * log pi`` from the train
  images' class counts (:func:`pipeline.core.losses.logit_shift`), computed once per run and
  passed to every epoch and to validation alike; left out of the resume digest while off (while
  on, the digest's data part already fixes the class counts).
* **Style mixing.** ``train.mixstyle_p`` > 0 turns on MixStyle in the twin's shared extractor
  (:func:`pipeline.core.model.mix_styles`; training mode only, so validation and the export never
  mix). Left out of the resume digest while off.
* **Weight averaging (SWA).** With ``train.swa_start`` the weights and batch-norm buffers at the
  end of each epoch from that epoch on are averaged uniformly
  (:func:`pipeline.core.training.build_swa`, kept in ``last.pt``); from then on the average is
  what is validated, so the patent's lowest-loss state is the lowest-loss of the raw states
  before ``swa_start`` and the averages after it, and the branch choice and the export follow.
  With ``train.swa_every: step`` every optimizer step from the first of epoch ``swa_start`` joins
  the mean instead (dense averaging, as SWAD; :func:`pipeline.core.training.swa_per_step`). With
  ``train.swa_bn: recompute`` the mean's batch-norm statistics are recomputed over every train
  image before each validation (:func:`pipeline.core.training.recompute_batch_norm`). Left out of
  the resume digest while off (``swa_every`` while ``epoch``, ``swa_bn`` while ``mean``).
* **Mixup / CutMix.** ``train.mixup_alpha`` / ``cutmix_alpha`` > 0 blend training batches with a
  shuffled copy of themselves (:class:`pipeline.core.training.BatchMix`), pairs and joint loss
  alike; validation and the export never mix. Left out of the resume digest while off.
* **Contrastive pretraining.** ``train.pretrain_epochs`` > 0: before the first epoch of a fresh
  run, the twin's extractor and both branches are pretrained on the train images with SimCLR's
  loss (:mod:`pipeline.core.pretrain`; a training-only projection head, its own optimizer), then
  the patent's training starts from those weights with a fresh optimizer and the same dropout
  seed as without pretraining. A resumed run skips it (the checkpoint holds the weights since);
  its per-epoch losses are kept in ``last.pt``, ``best.json`` (logged to MLflow) and the summary
  (``pretrain_losses``). Left out of the resume digest while off.
* **Site-adversarial training.** ``train.site_adversarial`` > 0 trains a site classifier
  (:class:`pipeline.core.adversarial.SiteHead`, same optimizer) on the twin's GAP vectors behind a
  gradient reversal; each image's site is the augmented manifest's ``source_site``. Only the
  backward pass sees its loss (``train_site`` in the history); validation, the lowest-loss state
  and the export are the twin's alone. The head is kept in ``last.pt`` for resume, never in
  ``best.pt``. Left out of the resume digest while off; while on, the digest covers which image is
  from which site.
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

import numpy as np
import pandas as pd
import torch

from pipeline.config import Config
from pipeline.core.adversarial import SiteHead
from pipeline.core.imaging import color_constancy
from pipeline.core.losses import class_alpha, logit_shift
from pipeline.core.model import TwinNet, build_twin, count_parameters, inference_model
from pipeline.core.pretrain import ProjectionHead, contrastive_views, pretrain_epoch, pretrain_optimizer, pretrain_order
from pipeline.core.schema import AUGMENTED_SITE, PAIR_COLUMNS
from pipeline.core.training import (
    HISTORY_COLUMNS,
    BatchSet,
    CorrectedRows,
    DeviceSetup,
    PairEpoch,
    SiteAdversary,
    TrainData,
    build_ema,
    build_optimizer,
    build_scheduler,
    build_swa,
    cpu_state,
    epoch_batches,
    iter_batches,
    rng_state,
    seed_everything,
    set_rng_state,
    swa_active,
    swa_epoch_end,
    swa_per_step,
    train_epoch,
    validate,
    validation_pairs,
)
from pipeline.errors import DataError, PipelineError
from pipeline.io import checkpoints
from pipeline.io.compute import Dist, init_dist, resolve_device
from pipeline.io.files import remove_stale_temps, write_json, write_table
from pipeline.io.imagecache import load_image_cache
from pipeline.io.manifests import check_labels, read_augmented, read_pairs, split_rows
from pipeline.io.threads import use_cpu_threads
from pipeline.labels import CLASS_TO_INDEX, CLASSES, NUM_CLASSES
from pipeline.layout import Layout

log = logging.getLogger(__name__)

STOP_ENV = "SKIN_TWIN_STOP_AFTER_EPOCH"
# history columns written only when their knob is on (train_site: train.site_adversarial)
EXTRA_HISTORY_COLUMNS = ("train_site",)
# Train params that change neither the arithmetic nor the result (not part of the digest).
_NON_SEMANTIC_TRAIN_KEYS = ("progress", "num_workers", "cpu_threads", "device")


class TrainingStopped(PipelineError):
    """Raised after the checkpoint of the epoch named by ``SKIN_TWIN_STOP_AFTER_EPOCH``."""


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def _label_index(series: pd.Series, where: str) -> np.ndarray:
    check_labels(series.to_frame("label"), where)
    return series.astype(str).map(CLASS_TO_INDEX).to_numpy(dtype=np.int64)


def _frame_digest(df: pd.DataFrame) -> str:
    hashed = pd.util.hash_pandas_object(df.reset_index(drop=True), index=False).to_numpy()
    return hashlib.sha256(hashed.tobytes()).hexdigest()


def _pair_epochs(pairs: pd.DataFrame, train_index: dict[str, int], labels: np.ndarray, where: Path,
                 aug_path: Path) -> list[PairEpoch]:
    """The pair manifest as row indices per epoch, checked against the augmented manifest."""
    for col in ("left_id", "right_id"):
        unknown = sorted(set(pairs[col]) - set(train_index))
        if unknown:
            raise DataError(f"{where}: {col} not among the train images of the augmented manifest: {unknown[:5]}")
    left = pairs["left_id"].map(train_index).to_numpy(dtype=np.int64)
    right = pairs["right_id"].map(train_index).to_numpy(dtype=np.int64)
    if not np.array_equal(labels[left], _label_index(pairs["left_label"], str(where))) or not np.array_equal(
        labels[right], _label_index(pairs["right_label"], str(where))
    ):
        raise DataError(f"{where}: pair labels disagree with {aug_path}")
    same = (labels[left] == labels[right]).astype(np.int64)
    if not np.array_equal(same, pairs["same"].astype(np.int64).to_numpy()):
        log.warning("%s: 'same' column disagrees with the labels; using the labels", where)
    epoch_col = pairs["epoch"].to_numpy()
    out = []
    for ep in sorted(pd.unique(epoch_col)):
        sel = np.flatnonzero(epoch_col == ep)
        if sel.size >= 2:
            out.append(PairEpoch(left[sel], right[sel], same[sel]))
    if not out:
        raise DataError(f"{where}: no pair epoch with at least 2 pairs")
    return out


def load_train_data(cfg: Config, rank: int = 0, barrier: Any = None) -> TrainData:
    """Read manifests, check them, build/reuse the image cache. Raises :class:`DataError`."""
    layout = Layout.from_config(cfg)
    aug, meta = read_augmented(layout.augmented_dir)
    pairs = read_pairs(layout.pairs)
    where = str(layout.augmented_manifest)
    train_df = split_rows(aug, "train", where)
    val_df = split_rows(aug, "val", where, "model selection needs the val split")
    used = pd.concat([train_df, val_df], ignore_index=True)
    if used["image_id"].duplicated().any():
        dup = used.loc[used["image_id"].duplicated(), "image_id"].head(5).tolist()
        raise DataError(f"{where}: duplicate image_id(s) {dup}")
    labels = _label_index(used["label"], where)
    paths = [layout.augmented_dir / p for p in used["path"].astype(str)]
    ids = used["image_id"].tolist()
    size = int(meta["image_size"])

    # Rank 0 builds the cache; the other ranks wait for it and then map the same file.
    kwargs = {"workers": cfg.train.cache_workers, "root": layout.augmented_dir}
    if rank == 0:
        cache = load_image_cache(ids, paths, size, layout.cache_dir, name="train", **kwargs)
    if barrier is not None:
        barrier()
    if rank != 0:
        cache = load_image_cache(ids, paths, size, layout.cache_dir, name="train", build=False, **kwargs)

    train_index = {i: r for r, i in enumerate(train_df["image_id"])}
    n_train = len(train_df)
    pairs = pairs.assign(left_id=pairs["left_id"].astype(str), right_id=pairs["right_id"].astype(str))
    pair_epochs = _pair_epochs(pairs, train_index, labels, layout.pairs, layout.augmented_manifest)

    val_rows = np.arange(n_train, len(used), dtype=np.int64)
    # Train copies were colour-corrected by augment; the val images are stored uncorrected
    # (pipeline.core.augment) and corrected here, as the export's inference will correct them.
    pre = dict(meta.get("preprocess") or {})
    images: Any = cache
    if pre.get("color_constancy", "none") != "none":
        corrected = color_constancy(cache.take(val_rows), str(pre["color_constancy"]), float(pre["sog_power"]))
        images = CorrectedRows(cache, n_train, corrected)
    site_of = used[AUGMENTED_SITE].astype(str).to_numpy()
    site_names = tuple(sorted(set(site_of[:n_train])))
    site_index = {name: i for i, name in enumerate(site_names)}
    sites = np.array([site_index.get(x, -1) for x in site_of], dtype=np.int64)
    vl, vr, vs = validation_pairs(labels[val_rows], cfg.seed)
    class_counts = np.bincount(labels[:n_train], minlength=NUM_CLASSES)
    # Content and relative paths only (never where the run folder is): a checkpoint resumes after
    # the folder moves or on another worker mounting the same volume elsewhere.
    digest = hashlib.sha256(
        json.dumps(
            {
                "augmented": str(meta.get("digest", "")),
                "size": size,
                "used": _frame_digest(used[["image_id", "path", "label", "split"]].astype(str)),
                "pairs": _frame_digest(pairs[list(PAIR_COLUMNS)].astype(str)),
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()
    return TrainData(
        images=images,
        labels=labels,
        pair_epochs=pair_epochs,
        val_rows=val_rows,
        val_pairs=PairEpoch(val_rows[vl], val_rows[vr], vs),
        class_counts=class_counts,
        image_size=size,
        digest=digest,
        preprocess=pre,
        sites=sites,
        site_names=site_names,
    )


def train_digest(cfg: Config, data: TrainData, world: int) -> str:
    """What a checkpoint must match to be resumed: training-relevant params + input data."""
    tc = {k: v for k, v in cfg.train.model_dump(mode="json").items() if k not in _NON_SEMANTIC_TRAIN_KEYS}
    loss = cfg.loss.model_dump(mode="json")
    # knobs added later are left out while off, so checkpoints written before them stay resumable
    for key in ("ema_decay", "swa_start"):
        if tc.get(key) is None:
            tc.pop(key, None)
    if tc.get("swa_every") == "epoch":
        tc.pop("swa_every", None)
    if tc.get("swa_bn") == "mean":
        tc.pop("swa_bn", None)
    if tc.get("mixstyle_p") == 0.0:
        tc.pop("mixstyle_p", None)
        tc.pop("mixstyle_alpha", None)
    if tc.get("online_randconv") == 0.0:
        tc.pop("online_randconv", None)
        tc.pop("online_randconv_kernels", None)
    if tc.get("mixup_alpha") == 0.0 and tc.get("cutmix_alpha") == 0.0:
        for key in ("mixup_alpha", "cutmix_alpha", "mix_prob"):
            tc.pop(key, None)
    if tc.get("pretrain_epochs") == 0:
        for key in [k for k in tc if k.startswith("pretrain_")]:
            tc.pop(key, None)
    for key in ("label_smoothing", "logit_adjust"):
        if loss.get(key) == 0.0:
            loss.pop(key, None)
    sites = {}
    if tc.get("site_adversarial", 0.0) > 0:  # which image is from which site is an input of the site loss
        sites = {"sites": hashlib.sha256(json.dumps(data.site_names).encode() + data.sites.tobytes()).hexdigest()}
    else:
        for key in ("site_adversarial", "site_adversarial_mode", "site_adversarial_hidden"):
            tc.pop(key, None)
    payload = {
        "seed": cfg.seed,
        "model": cfg.model.recorded(),
        "loss": loss,
        "train": tc,
        "image_size": data.image_size,
        "data": data.digest,
        "world": world,
        **sites,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Stage
# --------------------------------------------------------------------------------------------


def run_train(cfg: Config) -> dict[str, Any]:
    """The ``train`` stage. Returns a JSON-able summary (best epoch, losses, parameter counts)."""
    dist = init_dist()
    try:
        return _run(cfg, dist)
    finally:
        dist.close()


def _run(cfg: Config, dist: Dist) -> dict[str, Any]:
    t_start = time.perf_counter()
    layout = Layout.from_config(cfg)
    tc = cfg.train
    use_cpu_threads(tc.cpu_threads)
    ds = resolve_device(tc, dist.local_rank)
    data = load_train_data(cfg, dist.rank, dist.barrier if dist.enabled else None)
    digest = train_digest(cfg, data, dist.world)

    seed_everything(cfg.seed)
    twin = build_twin(cfg.model, NUM_CLASSES)
    twin.extractor.set_style_mixing(tc.mixstyle_p, tc.mixstyle_alpha)
    params_train = count_parameters(twin)
    params_inference = count_parameters(inference_model(twin, 0))
    twin.to(ds.device)
    if ds.channels_last:
        twin.to(memory_format=torch.channels_last)
    alpha_vals = class_alpha(cfg.loss.alpha, data.class_counts)
    alpha = None if alpha_vals is None else torch.as_tensor(alpha_vals, dtype=torch.float32, device=ds.device)
    shift_vals = logit_shift(cfg.loss.logit_adjust, data.class_counts)
    shift = None if shift_vals is None else shift_vals.to(ds.device)
    site_head = _site_head(cfg, data)
    trained = list(twin.parameters())
    if site_head is not None:
        site_head.to(ds.device)
        trained += list(site_head.parameters())

    opt = build_optimizer(trained, tc)
    per_epoch_batches = [
        len(epoch_batches(data, e, tc.batch_size, cfg.seed, dist.rank, dist.world)[1]) for e in range(tc.epochs)
    ]
    total_steps = sum(per_epoch_batches)
    warmup_steps = sum(per_epoch_batches[: tc.warmup_epochs])
    sched = build_scheduler(opt, tc, total_steps, warmup_steps)
    scaler = torch.amp.GradScaler("cuda", enabled=ds.grad_scaler)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + dist.rank)
    # Dropout draws differ per rank (the model init above is identical on every rank).
    torch.manual_seed(cfg.seed + dist.rank)

    ema = build_ema(twin, tc.ema_decay) if tc.ema_decay is not None else None
    swa = build_swa(twin) if tc.swa_start is not None else None
    history: list[dict[str, float]] = []
    pretrain_losses: list[float] = []
    # the train images (train.pretrain_epochs, train.swa_bn: recompute): every image row that is not a
    # val row; every rank passes over all of them, so the results are the same on every rank
    train_rows = np.setdiff1d(np.arange(len(data.labels)), data.val_rows)
    best: dict[str, Any] | None = None
    start_epoch = 0
    last_path = layout.train_dir / "last.pt"
    best_path = layout.train_dir / "best.pt"
    if dist.rank == 0:  # a kill -9 during a checkpoint write leaves its temporary file behind
        for name in remove_stale_temps(layout.train_dir):
            log.info("removed %s, left by an interrupted checkpoint write", name)
    ckpt = checkpoints.load_resumable(last_path, digest)
    if ckpt is not None:
        twin.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if ema is not None and ckpt.get("ema"):
            ema.load_state_dict(ckpt["ema"])
        if swa is not None and ckpt.get("swa"):
            swa.load_state_dict(ckpt["swa"])
        if site_head is not None:
            site_head.load_state_dict(ckpt["site_head"])
        rng = ckpt["rng"]
        if len(rng) == dist.world:
            set_rng_state(rng[dist.rank], gen)
        history = list(ckpt["history"])
        pretrain_losses = list(ckpt.get("pretrain", []))
        best = ckpt["best"]
        start_epoch = int(ckpt["epoch"])
        if dist.is_main:
            log.info("resuming from %s after epoch %d of %d", last_path, start_epoch, tc.epochs)
    else:
        if dist.is_main:
            layout.train_dir.mkdir(parents=True, exist_ok=True)
            log.info("training from scratch: %d epochs, %s, world size %d", tc.epochs, ds.describe(), dist.world)
        if tc.pretrain_epochs > 0:
            pretrain_losses = _pretrain(cfg, twin, data, train_rows, ds, dist.is_main)
            torch.manual_seed(cfg.seed + dist.rank)  # training's dropout draws as without pretraining
    dist.barrier()

    def wrapped(module: torch.nn.Module) -> torch.nn.Module:  # the trained modules, DDP under torchrun
        if not dist.enabled:
            return module
        return torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[ds.device.index] if ds.device.type == "cuda" else None
        )

    model = wrapped(twin).train()
    adversary_head = None if site_head is None else wrapped(site_head.train())

    stop_after = int(os.environ.get(STOP_ENV, "0") or 0)
    val_batch = max(cfg.evaluate.batch_size, tc.batch_size)
    for epoch in range(start_epoch, tc.epochs):
        t0 = time.perf_counter()
        pe, batches = epoch_batches(data, epoch, tc.batch_size, cfg.seed, dist.rank, dist.world)
        lr_epoch = float(opt.param_groups[0]["lr"])
        bar = _progress(len(batches), f"epoch {epoch + 1}/{tc.epochs}", tc.progress and dist.is_main)

        def on_step(sums: dict[str, float], n_seen: float) -> None:
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k.replace("train_", ""): f"{v / n_seen:.4f}" for k, v in sums.items()})

        adversary = None
        if adversary_head is not None:
            adversary = SiteAdversary(adversary_head, tc.site_adversarial, sum(per_epoch_batches[:epoch]), total_steps)
        batch_set = BatchSet(data.images, data.labels, pe, batches, data.sites if adversary is not None else None)
        sums, n_seen = train_epoch(
            model, iter_batches(batch_set, tc.num_workers, ds.device.type == "cuda"),
            opt=opt, sched=sched, scaler=scaler, gen=gen, tc=tc, loss_cfg=cfg.loss, alpha=alpha, ds=ds,
            epoch=epoch, on_step=on_step, averaged=swa if swa_per_step(epoch + 1, tc) else ema, adversary=adversary,
            shift=shift,
        )  # fmt: skip
        if bar is not None:
            bar.close()
        keys = list(sums)
        reduced = dist.all_reduce_sum([sums[k] for k in keys] + [n_seen], ds.device)
        train_means = {k: v / max(reduced[-1], 1.0) for k, v in zip(keys, reduced[:-1], strict=True)}
        dist.broadcast_buffers(twin)  # same batch-norm statistics on every rank before validating
        # with EMA, or SWA from swa_start on, the averaged weights are validated, kept as the
        # lowest-loss state and exported
        judged = twin if ema is None else ema.module
        if swa is not None and swa_active(epoch + 1, tc.swa_start):
            judged = swa_epoch_end(swa, twin, epoch + 1, tc, data.images, train_rows, val_batch, ds)
        if judged is not twin:
            dist.broadcast_buffers(judged)
        val = validate(
            judged, data, cfg.loss, val_batch, ds, alpha, dist.rank, dist.world,
            lambda v: dist.all_reduce_sum(v, ds.device), shift,
        )  # fmt: skip
        row = {"epoch": epoch + 1, **train_means, **val, "lr": lr_epoch, "seconds": time.perf_counter() - t0}
        history.append(row)
        improved = best is None or val["val_loss_total"] < best["val_loss_total"]
        if improved:
            best = {"epoch": epoch + 1, **val, "state": cpu_state(judged)}
        rng_states = dist.gather_objects(rng_state(gen))
        if dist.is_main:
            site = f" site {train_means['train_site']:.4f}" if "train_site" in train_means else ""
            log.info(
                "epoch %d/%d: train %.4f%s | val b1 %.4f b2 %.4f disc %.4f total %.4f%s (%.1fs)",
                epoch + 1, tc.epochs, train_means["train_loss"], site, val["val_loss_branch1"],
                val["val_loss_branch2"], val["val_loss_discriminator"], val["val_loss_total"],
                " *best*" if improved else "", row["seconds"],
            )  # fmt: skip
            assert best is not None
            if improved:
                checkpoints.save(best_path, _best_payload(best, cfg, data, params_train, params_inference, digest))
            checkpoints.save(
                last_path,
                {
                    "format": checkpoints.CHECKPOINT_FORMAT,
                    "digest": digest,
                    "epoch": epoch + 1,
                    "model": cpu_state(twin),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "scaler": scaler.state_dict() if ds.grad_scaler else None,
                    "rng": [checkpoints.encode_rng(r) for r in rng_states],
                    "history": history,
                    "best": best,
                    **({"pretrain": pretrain_losses} if pretrain_losses else {}),
                    **({"ema": cpu_state(ema)} if ema is not None else {}),
                    **({"swa": cpu_state(swa)} if swa is not None else {}),
                    **({"site_head": cpu_state(site_head)} if site_head is not None else {}),
                },
            )
            _write_history(layout.train_dir, history)
        dist.barrier()
        if stop_after and epoch + 1 == stop_after and epoch + 1 < tc.epochs:
            raise TrainingStopped(f"stopped after epoch {epoch + 1} ({STOP_ENV}={stop_after}); re-run to resume")

    assert best is not None
    summary = {
        "epochs": tc.epochs,
        "resumed_after_epoch": start_epoch,
        "best_epoch": best["epoch"],
        "val_loss_total": best["val_loss_total"],
        "val_loss_branch1": best["val_loss_branch1"],
        "val_loss_branch2": best["val_loss_branch2"],
        "val_loss_discriminator": best["val_loss_discriminator"],
        "params_train": params_train,
        "params_inference": params_inference,
        "device": ds.describe(),
        "world_size": dist.world,
        "image_size": data.image_size,
        "train_images": int(len(data.labels) - len(data.val_rows)),
        "val_images": int(len(data.val_rows)),
        "seconds": round(time.perf_counter() - t_start, 3),
        **({"pretrain_losses": pretrain_losses} if pretrain_losses else {}),
    }
    if dist.is_main:
        if not best_path.is_file():  # resumed a finished run whose best.pt went missing
            checkpoints.save(best_path, _best_payload(best, cfg, data, params_train, params_inference, digest))
        _write_history(layout.train_dir, history)
        write_json(
            layout.train_dir / "best.json",
            {k: best[k] for k in ("epoch", "val_loss_branch1", "val_loss_branch2", "val_loss_discriminator", "val_loss_total")}
            | {"params_train": params_train, "params_inference": params_inference, "host": socket.gethostname(),
               "device": ds.describe(), "world_size": dist.world}
            | ({"pretrain_losses": pretrain_losses} if pretrain_losses else {}),
        )
    return summary


def _best_payload(
    best: dict[str, Any], cfg: Config, data: TrainData, params_train: int, params_inference: int, digest: str
) -> dict[str, Any]:
    """``best.pt``: only tensors and plain values, so ``torch.load(weights_only=True)`` reads it."""
    return {
        "format": checkpoints.CHECKPOINT_FORMAT,
        "model": best["state"],
        "epoch": int(best["epoch"]),
        "val_loss_branch1": float(best["val_loss_branch1"]),
        "val_loss_branch2": float(best["val_loss_branch2"]),
        "val_loss_discriminator": float(best["val_loss_discriminator"]),
        "val_loss_total": float(best["val_loss_total"]),
        "model_config": cfg.model.recorded(),
        "num_classes": NUM_CLASSES,
        "classes": list(CLASSES),
        "image_size": int(data.image_size),
        "params_train": int(params_train),
        "params_inference": int(params_inference),
        "train_digest": digest,
        "config_digest": cfg.digest(),
        **({"preprocess": dict(data.preprocess)} if data.preprocess.get("color_constancy", "none") != "none" else {}),
    }


def _pretrain(
    cfg: Config, twin: TwinNet, data: TrainData, rows: np.ndarray, ds: DeviceSetup, is_main: bool
) -> list[float]:
    """Contrastive pretraining of ``twin`` in place (``train.pretrain_epochs``,
    :mod:`pipeline.core.pretrain`) on the train ``rows``; the mean loss of each epoch. The same on
    every rank (same seed, all rows); under DDP the wrapper then starts every rank from rank 0's
    weights anyway. Run again from the start when a run is interrupted before its first
    checkpoint (it is a pure function of the seed and the data)."""
    tc = cfg.train
    torch.manual_seed(cfg.seed)  # the head's initial weights (and any dropout draw) alike on every rank
    head = ProjectionHead(cfg.model.head_channels, tc.pretrain_projection).to(ds.device)
    steps = [pretrain_order(rows, cfg.seed, e, tc.pretrain_batch_size) for e in range(tc.pretrain_epochs)]
    opt, sched = pretrain_optimizer(twin, head, tc.pretrain_lr, tc.weight_decay, sum(len(b) for b in steps))
    scaler = torch.amp.GradScaler("cuda", enabled=ds.grad_scaler)
    views = contrastive_views(tc.pretrain_scale, tc.pretrain_translate, tc.pretrain_color)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + 0x55C1)
    if is_main:
        log.info("contrastive pretraining: %d epochs over %d train images", tc.pretrain_epochs, len(rows))
    losses: list[float] = []
    for epoch, batches in enumerate(steps):
        t0 = time.perf_counter()
        bar = _progress(len(batches), f"pretrain {epoch + 1}/{tc.pretrain_epochs}", tc.progress and is_main)

        def on_step(mean: float) -> None:
            if bar is not None:
                bar.update(1)
                bar.set_postfix({"loss": f"{mean:.4f}"})

        losses.append(
            pretrain_epoch(
                twin, head, data.images, batches, opt=opt, sched=sched, scaler=scaler, views=views, gen=gen, ds=ds,
                temperature=tc.pretrain_temperature, epoch=epoch, on_step=on_step,
            )  # fmt: skip
        )
        if bar is not None:
            bar.close()
        if is_main:
            log.info("pretraining epoch %d/%d: loss %.4f (%.1fs)", epoch + 1, tc.pretrain_epochs, losses[-1],
                     time.perf_counter() - t0)  # fmt: skip
    return losses


def _site_head(cfg: Config, data: TrainData) -> SiteHead | None:
    """The site classifier of ``train.site_adversarial`` (None while 0), built after the twin so
    the twin's initial weights do not depend on it. Raises :class:`DataError` when the train
    images come from fewer than two sites (nothing to tell apart)."""
    tc = cfg.train
    if tc.site_adversarial == 0.0:
        return None
    if len(data.site_names) < 2:
        raise DataError(
            f"train.site_adversarial needs train images from at least two acquisition sites (the augmented "
            f"manifest's source_site); found {list(data.site_names)}. Set it to 0, or re-run augment if its "
            "manifest predates the source_site column"
        )
    classes = NUM_CLASSES if tc.site_adversarial_mode == "conditional" else 0
    return SiteHead(cfg.model.head_channels, tc.site_adversarial_hidden, len(data.site_names), classes)


def _write_history(train_dir: Path, history: list[dict[str, float]]) -> None:
    extra = [k for k in EXTRA_HISTORY_COLUMNS if history and k in history[0]]
    columns = [*HISTORY_COLUMNS[:-2], *extra, *HISTORY_COLUMNS[-2:]]  # before lr and seconds
    rows = [{k: r[k] for k in columns} for r in history]
    write_table(train_dir / "history.csv", pd.DataFrame(rows, columns=columns))
    write_json(train_dir / "history.json", rows)


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    # disable=None: no bar when stderr is not a terminal (Airflow task logs, make run's log file).
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, disable=None)
