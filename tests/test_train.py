"""Train stage: image cache, pure helpers, outputs, resume-after-kill, DDP on gloo.

The fixture builders here (:func:`make_work`, :data:`TINY_MODEL`) are also used by
test_export / test_evaluate / test_predict: they write a small augmented set (class-coloured
32x32 PNGs) and a pair manifest, the two inputs of the train stage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.config import Config, load_config
from pipeline.core.schema import AUGMENTED_COLUMNS, PAIR_COLUMNS
from pipeline.errors import DataError
from pipeline.labels import CLASSES
from pipeline.layout import Layout

ROOT = Path(__file__).resolve().parents[1]

TINY_MODEL: dict[str, Any] = {
    "model.stem_channels": 8,
    "model.extractor": [[1, 8, 1, 1], [2, 16, 1, 2]],
    "model.branch": [[2, 24, 1, 2]],
    "model.head_channels": 32,
    "model.discriminator_hidden": 16,
}

PALETTE = np.array(
    [[200, 60, 60], [60, 200, 60], [60, 60, 200], [200, 200, 60], [200, 60, 200], [60, 200, 200], [120, 120, 120]],
    dtype=np.float64,
)


def _image(rng: np.random.Generator, cls: int, size: int) -> np.ndarray:
    base = np.full((size, size, 3), 40.0)
    yy, xx = np.mgrid[0:size, 0:size]
    blob = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size / 3) ** 2
    base[blob] = PALETTE[cls]
    base += rng.normal(0, 12, base.shape)
    return np.clip(base, 0, 255).astype(np.uint8)


def make_work(
    work: Path,
    size: int = 32,
    per_class: tuple[int, int, int] = (4, 2, 2),
    pair_epochs: int = 2,
    seed: int = 0,
) -> Layout:
    """Write ``augmented/manifest.parquet`` + PNGs and ``pairs.parquet`` below ``work``."""
    layout = Layout(work)
    rng = np.random.default_rng(seed)
    rows = []
    for split, n in zip(("train", "val", "test"), per_class, strict=True):
        for c, cls in enumerate(CLASSES):
            for k in range(n):
                image_id = f"{split}_{cls}_{k}"
                rel = f"{split}/{cls}/{image_id}.png"
                path = layout.augmented_dir / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(_image(rng, c, size)).save(path)
                rows.append(
                    {"image_id": image_id, "source_id": image_id, "path": rel, "label": cls,
                     "group_id": image_id, "split": split, "copy": 0}
                )
    aug = pd.DataFrame(rows, columns=list(AUGMENTED_COLUMNS))
    aug.to_parquet(layout.augmented_manifest, index=False)
    (layout.augmented_dir / "meta.json").write_text(json.dumps({"format": 1, "image_size": size}))

    train = aug[aug["split"] == "train"].reset_index(drop=True)
    labels = train["label"].to_numpy()
    ids = train["image_id"].to_numpy()
    pairs = []
    for ep in range(pair_epochs):
        order = rng.permutation(len(train))
        for pos, i in enumerate(order):
            want_same = pos % 2 == 0
            pool = np.flatnonzero((labels == labels[i]) == want_same)
            pool = pool[pool != i]
            j = int(rng.choice(pool))
            pairs.append(
                {"epoch": ep, "batch": pos // 16, "left_id": ids[i], "right_id": ids[j],
                 "left_label": labels[i], "right_label": labels[j],
                 "same": int(labels[i] == labels[j]), "kind": "positive" if labels[i] == labels[j] else "negative"}
            )
    layout.pairs.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(pairs, columns=list(PAIR_COLUMNS)).to_parquet(layout.pairs, index=False)
    return layout


def tiny_cfg(work: Path, **extra: Any) -> Config:
    overrides: dict[str, Any] = {
        "paths.work_dir": str(work),
        "augment.image_size": 32,
        "train.epochs": 2,
        "train.batch_size": 16,
        "train.progress": False,
        "train.cpu_threads": 1,
        "evaluate.batch_size": 32,
        "evaluate.cam_per_class": 1,
        **TINY_MODEL,
        **extra,
    }
    return load_config(ROOT / "params.yaml", overrides)


def _model_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


# --------------------------------------------------------------------------------------------
# pure helpers
# --------------------------------------------------------------------------------------------


def test_validation_pairs_deterministic_and_labelled() -> None:
    from pipeline.core.training import validation_pairs

    labels = np.array([0, 0, 1, 1, 1, 2, 3, 3, 4, 5, 6, 6])
    a = validation_pairs(labels, 7)
    b = validation_pairs(labels, 7)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y)
    left, right, same = a
    assert len(left) == len(labels)
    assert np.all(left != right)
    assert np.array_equal(same, (labels[left] == labels[right]).astype(int))
    assert 0 < same.sum() < len(same)
    c = validation_pairs(labels, 8)
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_epoch_order_shards_cover_and_are_disjoint() -> None:
    from pipeline.core.training import epoch_order, make_batches

    full = epoch_order(11, 3, 1)
    assert sorted(full) == list(range(11))
    assert not np.array_equal(full, epoch_order(11, 3, 2))
    shards = [epoch_order(11, 3, 1, r, 2) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 6
    assert set(shards[0]) | set(shards[1]) == set(range(11))
    assert list(np.concatenate(shards)[:10]) != []  # padded with the permutation head
    batches = make_batches(np.arange(9), 4)
    assert [len(b) for b in batches] == [4, 4]  # a trailing single item is dropped
    assert [len(b) for b in make_batches(np.arange(10), 4)] == [4, 4, 2]


def test_lr_factor_schedules() -> None:
    from pipeline.core.training import lr_factor

    assert lr_factor(0, 10, 0, "constant") == 1.0
    assert lr_factor(0, 10, 0, "cosine") == pytest.approx(1.0)
    assert lr_factor(10, 10, 0, "cosine") == pytest.approx(0.0)
    assert lr_factor(0, 10, 4, "cosine") == pytest.approx(0.25)
    assert lr_factor(4, 10, 4, "cosine") == pytest.approx(1.0)


def test_random_flip_is_seeded() -> None:
    from pipeline.core.training import random_flip

    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).view(2, 3, 4, 4)
    a = random_flip(x.clone(), torch.Generator().manual_seed(1))
    b = random_flip(x.clone(), torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    flips = [random_flip(x.clone(), torch.Generator().manual_seed(s)) for s in range(8)]
    assert any(not torch.equal(f, x) for f in flips)


# --------------------------------------------------------------------------------------------
# image cache
# --------------------------------------------------------------------------------------------


def test_image_cache_builds_reuses_and_rebuilds(tmp_path: Path) -> None:
    from pipeline.io.imagecache import load_image_cache

    paths = []
    for i in range(3):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(np.full((20, 30, 3), 50 * i, np.uint8)).save(p)
        paths.append(p)
    ids = ["a", "b", "c"]
    c1 = load_image_cache(ids, paths, 16, tmp_path / "cache", workers=2)
    assert c1.array.shape == (3, 3, 16, 16) and c1.array.dtype == np.uint8
    assert c1.index == {"a": 0, "b": 1, "c": 2}
    assert int(c1.array[2].mean()) == 100
    assert np.array_equal(c1.rows(["c", "a"]), [2, 0])
    stamp = c1.path.stat().st_mtime_ns
    c2 = load_image_cache(ids, paths, 16, tmp_path / "cache", workers=2)
    assert c2.path == c1.path and c2.path.stat().st_mtime_ns == stamp  # reused, not rebuilt
    c3 = load_image_cache(ids, paths, 8, tmp_path / "cache", workers=2)  # other size -> other key
    assert c3.path != c1.path and c3.array.shape == (3, 3, 8, 8)
    # a changed input file rebuilds
    Image.fromarray(np.full((20, 30, 3), 7, np.uint8)).save(paths[0])
    os.utime(paths[0], ns=(stamp + 10**9, stamp + 10**9))
    c4 = load_image_cache(ids, paths, 8, tmp_path / "cache", workers=2)
    assert c4.path != c3.path and int(c4.array[0].mean()) == 7
    assert len(list((tmp_path / "cache").glob("images-*.npy"))) == 1  # stale caches removed
    with pytest.raises(DataError, match="not in the image cache"):
        c4.rows(["zzz"])


def test_image_cache_names_corrupt_file(tmp_path: Path) -> None:
    from pipeline.io.imagecache import load_image_cache

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match="bad.png"):
        load_image_cache(["x"], [bad], 8, tmp_path / "cache", workers=2)
    assert not list((tmp_path / "cache").glob("*.npy"))  # nothing half-written


# --------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------


def test_run_train_outputs(tmp_path: Path) -> None:
    from pipeline.core.training import HISTORY_COLUMNS
    from pipeline.stages.train import run_train

    layout = make_work(tmp_path / "w")
    cfg = tiny_cfg(tmp_path / "w", **{"train.epochs": 3})
    summary = run_train(cfg)
    td = layout.train_dir
    for name in ("last.pt", "best.pt", "history.csv", "history.json", "best.json"):
        assert (td / name).is_file(), name
    hist = pd.read_csv(td / "history.csv")
    assert list(hist.columns) == list(HISTORY_COLUMNS)
    assert list(hist["epoch"]) == [1, 2, 3]
    assert np.isfinite(hist.drop(columns=["epoch"]).to_numpy()).all()
    # total = A*b1 + B*b2 + C*disc
    lc = cfg.loss
    expect = lc.A * hist["val_loss_branch1"] + lc.B * hist["val_loss_branch2"] + lc.C * hist["val_loss_discriminator"]
    assert np.allclose(hist["val_loss_total"], expect)
    best_epoch = int(hist.loc[hist["val_loss_total"].idxmin(), "epoch"])
    assert summary["best_epoch"] == best_epoch
    best = torch.load(td / "best.pt", map_location="cpu", weights_only=True)
    assert best["epoch"] == best_epoch
    assert best["val_loss_total"] == pytest.approx(hist["val_loss_total"].min())
    assert summary["params_train"] > summary["params_inference"] > 0
    assert hist["lr"].iloc[0] == pytest.approx(cfg.train.lr)
    assert hist["lr"].iloc[-1] < cfg.train.lr  # cosine decays


def test_run_train_rejects_pairs_with_unknown_ids(tmp_path: Path) -> None:
    from pipeline.stages.train import run_train

    layout = make_work(tmp_path / "w")
    pairs = pd.read_parquet(layout.pairs)
    pairs.loc[0, "left_id"] = "val_akiec_0"  # a val image may not appear in a training pair
    pairs.to_parquet(layout.pairs, index=False)
    with pytest.raises(DataError, match="pairs.parquet.*left_id"):
        run_train(tiny_cfg(tmp_path / "w"))


def stopped_after_one_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: dict, **work: Any):
    """An uninterrupted run in ``full`` and one stopped after its first epoch in ``killed`` (same
    params; ``work``: :func:`make_work`'s options for both). Returns (full layout, killed layout,
    the killed run's config) for the resume checks."""
    from pipeline.stages.train import STOP_ENV, TrainingStopped, run_train

    full = make_work(tmp_path / "full", **work)
    run_train(tiny_cfg(tmp_path / "full", **extra))
    killed = make_work(tmp_path / "killed", **work)
    cfg = tiny_cfg(tmp_path / "killed", **extra)
    monkeypatch.setenv(STOP_ENV, "1")
    with pytest.raises(TrainingStopped):
        run_train(cfg)
    monkeypatch.delenv(STOP_ENV)
    return full, killed, cfg


def test_resume_after_kill_matches_uninterrupted_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    from pipeline.stages.train import run_train

    full, killed, cfg = stopped_after_one_epoch(tmp_path, monkeypatch, {"train.epochs": 3, "pairs.epochs": 2})
    assert len(pd.read_csv(killed.train_dir / "history.csv")) == 1
    caplog.set_level("INFO", logger="pipeline.stages.train")
    summary = run_train(cfg)
    assert summary["resumed_after_epoch"] == 1
    assert "resuming" in caplog.text

    a, b = _model_state(full.train_dir / "last.pt"), _model_state(killed.train_dir / "last.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ha = pd.read_csv(full.train_dir / "history.csv").drop(columns=["seconds"])
    hb = pd.read_csv(killed.train_dir / "history.csv").drop(columns=["seconds"])
    pd.testing.assert_frame_equal(ha, hb)
    ba = torch.load(full.train_dir / "best.pt", weights_only=True)
    bb = torch.load(killed.train_dir / "best.pt", weights_only=True)
    assert ba["epoch"] == bb["epoch"]
    assert all(torch.equal(ba["model"][k], bb["model"][k]) for k in ba["model"])


def test_changed_params_start_fresh(tmp_path: Path, caplog) -> None:
    from pipeline.stages.train import run_train

    make_work(tmp_path / "w")
    run_train(tiny_cfg(tmp_path / "w", **{"train.epochs": 1}))
    caplog.set_level("INFO", logger="pipeline.stages.train")
    summary = run_train(tiny_cfg(tmp_path / "w", **{"train.epochs": 1, "train.lr": 0.001}))
    assert summary["resumed_after_epoch"] == 0
    assert "digest differs" in caplog.text
    # same params again: the finished checkpoint is reused, nothing retrained
    caplog.clear()
    summary = run_train(tiny_cfg(tmp_path / "w", **{"train.epochs": 1, "train.lr": 0.001}))
    assert summary["resumed_after_epoch"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("extra", [{}, {"train.swa_start": 1}])
def test_ddp_gloo_two_processes(tmp_path: Path, extra: dict[str, Any]) -> None:
    """Two processes train one model (the same summary on both ranks), with and without weight averaging."""
    layout = make_work(tmp_path / "w")
    args = [f"paths.work_dir={tmp_path / 'w'}", "augment.image_size=32", "train.epochs=2", "train.batch_size=8",
            "train.progress=false", "train.cpu_threads=1"]
    args += [f"{k}={v}" for k, v in {**TINY_MODEL, **extra}.items()]
    cmd = [
        str(Path(sys.executable).parent / "torchrun"),
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "pipeline",
        "train",
        "--params",
        str(ROOT / "params.yaml"),
    ]
    for a in args:
        cmd += ["--set", a]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summaries = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert summaries and all('"world_size": 2' in s for s in summaries)
    hist = pd.read_csv(layout.train_dir / "history.csv")
    assert list(hist["epoch"]) == [1, 2]
    best = torch.load(layout.train_dir / "best.pt", weights_only=True)
    assert best["epoch"] in (1, 2)
    last = torch.load(layout.train_dir / "last.pt", weights_only=True)
    assert ("swa" in last) == ("train.swa_start" in extra)
    decoder, ranks, text = json.JSONDecoder(), [], "".join(summaries)  # both ranks print to one stdout
    while text.strip():
        obj, end = decoder.raw_decode(text.strip())
        ranks.append(obj)
        text = text.strip()[end:]
    assert len(ranks) == 2 and ranks[0]["val_loss_total"] == ranks[1]["val_loss_total"]  # one model, both ranks


def test_dataloader_workers_do_not_change_the_result(tmp_path: Path) -> None:
    from pipeline.stages.train import run_train

    make_work(tmp_path / "a")
    make_work(tmp_path / "b")
    run_train(tiny_cfg(tmp_path / "a", **{"train.epochs": 1}))
    run_train(tiny_cfg(tmp_path / "b", **{"train.epochs": 1, "train.num_workers": 1}))
    a = _model_state(tmp_path / "a" / "models" / "train" / "last.pt")
    b = _model_state(tmp_path / "b" / "models" / "train" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "extra",
    [
        {"loss.alpha": "balanced", "train.optimizer": "sgd", "train.momentum": 0.9, "train.schedule": "onecycle"},
        {"train.schedule": "constant", "train.warmup_epochs": 1, "train.online_flip": False, "loss.gamma": 0.0},
    ],
)
def test_train_options(tmp_path: Path, extra: dict[str, Any]) -> None:
    from pipeline.stages.train import run_train

    layout = make_work(tmp_path / "w")
    summary = run_train(tiny_cfg(tmp_path / "w", **extra))
    hist = pd.read_csv(layout.train_dir / "history.csv")
    assert np.isfinite(hist["val_loss_total"]).all() and summary["best_epoch"] in (1, 2)
    if extra.get("train.warmup_epochs"):
        assert hist["lr"].iloc[0] < hist["lr"].iloc[1] == pytest.approx(0.003)


def test_image_size_comes_from_the_augmented_data_not_the_params(tmp_path: Path) -> None:
    """``--set augment.image_size=96`` on train alone must not upsample the 32 px images it trains on."""
    from pipeline.stages.train import run_train

    layout = make_work(tmp_path / "w", size=32)
    summary = run_train(tiny_cfg(tmp_path / "w", **{"train.epochs": 1, "augment.image_size": 96}))
    assert summary["image_size"] == 32
    assert torch.load(layout.train_dir / "best.pt", weights_only=True)["image_size"] == 32
    (layout.augmented_dir / "meta.json").unlink()
    with pytest.raises(DataError, match=r"meta\.json not found: run `python -m pipeline augment` first"):
        run_train(tiny_cfg(tmp_path / "w", **{"train.epochs": 1}))


def test_training_removes_temporary_files_of_an_interrupted_checkpoint_write(tmp_path: Path) -> None:
    from pipeline.stages.train import run_train

    work = make_work(tmp_path / "w")
    work.train_dir.mkdir(parents=True, exist_ok=True)
    stale = [work.train_dir / ".best.pt.q06ci429.tmp", work.train_dir / ".last.pt.abc.tmp"]
    for f in stale:
        f.write_bytes(b"half a checkpoint")
    keep = work.train_dir / "notes.txt"
    keep.write_text("not ours to delete")
    run_train(tiny_cfg(tmp_path / "w", **{"train.epochs": 1, "pairs.epochs": 1}))
    assert not any(f.exists() for f in stale) and keep.exists()
    assert (work.train_dir / "best.pt").is_file()


def test_channels_last_on_cpu_trains_the_same_model(tmp_path: Path) -> None:
    """``train.channels_last`` applies on CPU too (a faster layout for this model's depthwise and 1x1
    convolutions); it changes the memory format, not the model: the same weights up to float rounding."""
    from pipeline.stages.train import run_train

    make_work(tmp_path / "a")
    make_work(tmp_path / "b")
    sa = run_train(tiny_cfg(tmp_path / "a", **{"train.epochs": 1, "train.device": "cpu", "train.channels_last": True}))
    sb = run_train(tiny_cfg(tmp_path / "b", **{"train.epochs": 1, "train.device": "cpu", "train.channels_last": False}))
    assert sa["device"] == "cpu fp32 channels_last" and sb["device"] == "cpu fp32"
    a = _model_state(tmp_path / "a" / "models" / "train" / "last.pt")
    b = _model_state(tmp_path / "b" / "models" / "train" / "last.pt")
    # Adam moves near-zero-gradient weights by about lr per step whatever the gradient's size, so
    # rounding differences show up as lr-sized steps; a layout bug would give a different model
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].is_floating_point())
    assert worst < 0.02, worst
    assert sa["val_loss_total"] == pytest.approx(sb["val_loss_total"], rel=1e-4)


def test_optimizer_step_steps_on_a_finite_objective_and_refuses_a_non_finite_one() -> None:
    from pipeline.core.training import optimizer_step
    from pipeline.errors import PipelineError

    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    optimizer_step((w * w).sum(), opt, sched, scaler, "unused")
    assert torch.equal(w.detach(), torch.zeros(3)) and opt.param_groups[0]["lr"] == 0.25  # 1 - 0.5 * 2; scheduled
    with pytest.raises(PipelineError, match="lower train.lr"):
        optimizer_step(w.sum() * float("nan"), opt, sched, scaler, "non-finite training loss; lower train.lr")
    assert torch.equal(w.detach(), torch.zeros(3)) and opt.param_groups[0]["lr"] == 0.25  # nothing stepped
