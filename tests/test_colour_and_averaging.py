"""Colour constancy in augment and train, and weight averaging of the twin (``train.swa_start``),
on tiny project-made data."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from test_train import make_work, stopped_after_one_epoch, tiny_cfg


def test_train_with_colour_constancy_records_it_and_corrects_val(tmp_path: Path) -> None:
    import pipeline.stages.train as train
    from pipeline.core.imaging import shades_of_gray_chw
    from pipeline.io.train_data import load_train_data
    from pipeline.stages.select import run_select

    cfg = tiny_cfg(tmp_path / "w", **{"train.epochs": 1})
    layout = make_work(tmp_path / "w")
    meta_path = layout.augmented_dir / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["preprocess"] = {"color_constancy": "shades_of_gray", "sog_power": 6.0}
    meta_path.write_text(json.dumps(meta))
    data = load_train_data(cfg)
    raw = data.images.base.take(data.val_rows[:3])
    np.testing.assert_array_equal(data.images.take(data.val_rows[:3]), shades_of_gray_chw(raw, 6.0))
    np.testing.assert_array_equal(data.images.take(np.arange(3)), data.images.base.take(np.arange(3)))  # train rows
    train.run_train(cfg)
    run_select(cfg)
    export_meta = json.loads((layout.export_dir / "config.json").read_text())
    assert export_meta["preprocess"] == {"color_constancy": "shades_of_gray", "sog_power": 6.0}


def test_augment_stage_corrects_train_only(tmp_path: Path, tiny_config) -> None:
    from pipeline.stages.augment import augmented_digest, run_augment
    from pipeline.stages.ingest import run_ingest
    from pipeline.stages.synthesize import run_synthesize
    from pipeline.stages.validate import run_validate

    cfg = tiny_config.with_overrides({"synthetic.images_per_class": 4, "validate.near_duplicate_distance": -1})
    run_synthesize(cfg)
    run_ingest(cfg)
    run_validate(cfg)
    run_augment(cfg)
    aug_dir = Path(cfg.paths.work_dir) / "data" / "augmented"
    plain = {p.relative_to(aug_dir): np.asarray(Image.open(p)) for p in aug_dir.rglob("*.png")}
    assert "preprocess" not in json.loads((aug_dir / "meta.json").read_text())
    manifest = pd.read_parquet(Path(cfg.paths.work_dir) / "data" / "validated.parquet")
    assert augmented_digest(manifest, cfg.with_overrides({"augment.workers": 1})) == augmented_digest(manifest, cfg)
    sog = cfg.with_overrides({"augment.color_constancy": "shades_of_gray"})
    assert augmented_digest(manifest, sog) != augmented_digest(manifest, cfg)
    run_augment(sog)
    assert json.loads((aug_dir / "meta.json").read_text())["preprocess"]["color_constancy"] == "shades_of_gray"
    for rel, arr in plain.items():
        now = np.asarray(Image.open(aug_dir / rel))
        if rel.parts[0] == "train":
            assert not np.array_equal(now, arr), rel
        else:
            np.testing.assert_array_equal(now, arr)  # val/test stay uncorrected (scoring corrects)


# --------------------------------------------------------------------------------------------
# weight averaging (train.swa_start)
# --------------------------------------------------------------------------------------------


def test_swa_is_the_uniform_mean_of_weights_and_batch_norm_buffers() -> None:
    from pipeline.core.training import WeightAverage

    net = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False), torch.nn.BatchNorm1d(2))
    average = WeightAverage(net, 2)
    assert average.judged(net, 1) is net  # before swa_start: the raw weights are judged, nothing averaged
    assert int(average.averaged.n_averaged) == 0
    for epoch, value in zip((2, 3, 4), (1.0, 2.0, 6.0), strict=True):
        torch.nn.init.constant_(net[0].weight, value)
        net[1].running_mean.fill_(-value)
        judged = average.judged(net, epoch)
    assert judged is average.averaged.module
    torch.testing.assert_close(judged[0].weight, torch.full((2, 2), 3.0))
    torch.testing.assert_close(judged[1].running_mean, torch.full((2,), -3.0))
    assert int(average.averaged.n_averaged) == 3
    assert [average.active(e) for e in (1, 2, 3)] == [False, True, True]


def test_swa_updates_batch_norm_counters_where_torch_fuses_the_update(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA torch's default SWA update is a fused (foreach) one whose integer branch fails on
    ``num_batches_tracked`` (seen on an H200, torch 2.11). Telling torch that CPU has foreach
    kernels puts this CPU test on that path: the averaged twin must still update, with the same
    values as the per-tensor path."""
    import torch.optim.swa_utils as swa_utils

    from pipeline.core.training import WeightAverage

    def snapshots(net: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        swa, out = WeightAverage(net, 1).averaged, []
        for _ in range(3):
            net.train()
            net(torch.randn(8, 3, 4, 4))  # moves running stats and num_batches_tracked
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(1.0)
            swa.update_parameters(net)
            out.append({k: v.clone() for k, v in swa.module.state_dict().items()})
        return out

    torch.manual_seed(1)
    base = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1), torch.nn.BatchNorm2d(2))
    per_tensor = snapshots(copy.deepcopy(base))
    monkeypatch.setattr(swa_utils, "_get_foreach_kernels_supported_devices", lambda: ["cpu", "cuda"])
    fused_path = snapshots(copy.deepcopy(base))
    for a, b in zip(per_tensor, fused_path, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    # the counters 1, 2, 3 keep the truncated running mean, as on CPU: 1, 1 + 1/2 -> 1, 1 + 2/3 -> 1
    assert [int(s["1.num_batches_tracked"]) for s in fused_path] == [1, 1, 1]


def test_swa_start_is_checked_against_epochs(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="swa_start: must be <= epochs"):
        tiny_cfg(tmp_path, **{"train.epochs": 2, "train.swa_start": 3})
    with pytest.raises(Exception, match="swa_start"):
        tiny_cfg(tmp_path, **{"train.swa_start": 0})


def test_swa_averages_epoch_states_keeps_the_lowest_loss_one_and_resumes_bit_identically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from pipeline.stages.select import run_select
    from pipeline.stages.train import run_train

    extra = {"train.epochs": 3, "pairs.epochs": 2, "train.swa_start": 2}
    full, killed, cfg = stopped_after_one_epoch(tmp_path, monkeypatch, extra)
    shutil.copy(killed.train_dir / "last.pt", tmp_path / "epoch1.pt")
    # epoch-by-epoch raw states of the uninterrupted run's twin: stop a third copy after epoch 2
    two = make_work(tmp_path / "two")
    from pipeline.stages.train import STOP_ENV, TrainingStopped

    monkeypatch.setenv(STOP_ENV, "2")
    with pytest.raises(TrainingStopped):
        run_train(tiny_cfg(tmp_path / "two", **extra))
    monkeypatch.delenv(STOP_ENV)
    e1 = torch.load(tmp_path / "epoch1.pt", map_location="cpu", weights_only=True)
    e2 = torch.load(two.train_dir / "last.pt", map_location="cpu", weights_only=True)
    assert "swa" in e1 and int(e1["swa"]["n_averaged"]) == 0  # epoch 1 < swa_start: nothing averaged yet
    torch.testing.assert_close({k.removeprefix("module."): v for k, v in e2["swa"].items() if k.startswith("module.")},
                               e2["model"])  # epoch 2: the first snapshot is the average
    assert run_train(cfg)["resumed_after_epoch"] == 1
    e3 = torch.load(full.train_dir / "last.pt", map_location="cpu", weights_only=True)
    avg = {k.removeprefix("module."): v for k, v in e3["swa"].items() if k.startswith("module.")}
    assert int(e3["swa"]["n_averaged"]) == 2
    for k, v in e3["model"].items():  # the mean of the raw states after epochs 2 and 3
        if v.is_floating_point():
            torch.testing.assert_close(avg[k], (e2["model"][k] + v) / 2)
    resumed = torch.load(killed.train_dir / "last.pt", map_location="cpu", weights_only=True)
    for key in ("model", "swa"):
        assert all(torch.equal(e3[key][k], resumed[key][k]) for k in e3[key]), key
    best = torch.load(full.train_dir / "best.pt", map_location="cpu", weights_only=True)
    history = pd.read_csv(full.train_dir / "history.csv")
    assert best["epoch"] == int(history.loc[history["val_loss_total"].idxmin(), "epoch"])
    expected = {1: e1["model"], 2: e2["model"], 3: avg}[best["epoch"]]  # raw before swa_start, averaged after
    for k, v in best["model"].items():
        torch.testing.assert_close(v, expected[k])
    shutil.rmtree(full.export_dir, ignore_errors=True)
    assert run_select(tiny_cfg(tmp_path / "full", **extra))["best_epoch"] == best["epoch"]
