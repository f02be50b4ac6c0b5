"""The twin on the pretrained EfficientNet-Lite0 backbone (``model.extractor: efficientnet_lite0``):
built from the locked weight file, trained, exported and scored through the same stages as the
from-scratch family, on tiny project-made data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_train import make_work, tiny_cfg

from pipeline.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
LITE0: dict[str, Any] = {
    "model.extractor": "efficientnet_lite0",
    "model.branch": None,
    "model.split": 4,
    "model.output_stride": 16,
    "model.head_channels": 1280,
}


@pytest.fixture(scope="module")
def weights():
    from pipeline.io.pretrained import load_lite0_weights

    return load_lite0_weights(include_classifier=False)


def lite0_cfg(work: Path, **extra: Any):
    return tiny_cfg(work, **{**LITE0, **extra})


def test_config_names_what_contradicts_a_backbone() -> None:
    params = ROOT / "params.yaml"
    with pytest.raises(ConfigError, match="model.branch: must be null with extractor: efficientnet_lite0"):
        load_config(params, {"model.extractor": "efficientnet_lite0"})
    with pytest.raises(ConfigError, match="model.split: only with a pretrained backbone"):
        load_config(params, {"model.split": 4})
    with pytest.raises(ConfigError, match="model.head_channels: efficientnet_lite0's pretrained head has 1280"):
        load_config(params, {**LITE0, "model.head_channels": 256})
    with pytest.raises(ConfigError, match="train.pretrained_lr: only with a pretrained backbone"):
        load_config(params, {"train.pretrained_lr": 0.001})
    with pytest.raises(ConfigError, match="model.extractor"):
        load_config(params, {**LITE0, "model.extractor": "resnet50"})


def test_twin_starts_from_the_pretrained_weights_with_two_own_branches(weights) -> None:
    from pipeline.core.model import build_inference, build_twin, count_parameters, inference_model

    cfg = load_config(ROOT / "params.yaml", LITE0).model
    twin = build_twin(cfg, 7, weights.state_dict)
    ext = twin.extractor.state_dict()
    assert torch.equal(ext["body.conv_stem.weight"], weights.state_dict["conv_stem.weight"])
    assert torch.equal(ext["body.blocks.3.2.conv_dw.weight"], weights.state_dict["blocks.3.2.conv_dw.weight"])
    for b in twin.branches:  # each branch: its own copy of stages 4.. and the head conv, same start
        assert torch.equal(b.stages[0][0].conv_pw.weight, weights.state_dict["blocks.4.0.conv_pw.weight"])
        assert torch.equal(b.head[0].weight, weights.state_dict["conv_head.weight"])
    a, b = twin.branches
    assert a.stages[0][0].conv_pw.weight.data_ptr() != b.stages[0][0].conv_pw.weight.data_ptr()
    assert not torch.equal(a.classifier.weight, b.classifier.weight)  # new classifiers, drawn apart
    n_pre = sum(p.numel() for p in twin.pretrained_parameters())
    assert 0 < n_pre < count_parameters(twin) and count_parameters(inference_model(twin, 0)) < 5_000_000
    inf = inference_model(twin, 1).eval()
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        assert tuple(inf.feature_map(x).shape) == (2, 1280, 8, 8)  # stride 16: an 8x8 CAM map at 128 px
        rebuilt = build_inference(cfg, 7)  # what select / predict build before loading an export
        rebuilt.load_state_dict(inf.state_dict())
        torch.testing.assert_close(rebuilt.eval()(x), inf(x))


def test_pretrained_lr_applies_to_the_backbone_only(weights) -> None:
    from pipeline.core.model import build_twin
    from pipeline.core.training import build_optimizer, build_scheduler, param_groups

    cfg = load_config(ROOT / "params.yaml", {**LITE0, "train.lr": 0.01, "train.pretrained_lr": 0.001})
    twin = build_twin(cfg.model, 7, weights.state_dict)
    groups = param_groups(twin, cfg.train, twin.pretrained_parameters())
    assert [g["lr"] for g in groups] == [0.001, 0.01]
    new = {id(p) for p in groups[1]["params"]}
    assert id(twin.discriminator.mlp[0].weight) in new and id(twin.branches[0].classifier.weight) in new
    assert sum(len(g["params"]) for g in groups) == len(list(twin.parameters()))
    opt = build_optimizer(groups, cfg.train)
    sched = build_scheduler(opt, cfg.train, 10, 0)
    opt.step()
    sched.step()
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs[0] / lrs[1] == pytest.approx(0.1)  # the schedule scales both alike


@pytest.mark.slow
def test_pretrained_twin_trains_exports_and_predicts(tmp_path: Path, weights) -> None:
    from pipeline.io.modelstore import load_exported
    from pipeline.stages.predict import run_predict
    from pipeline.stages.select import run_select
    from pipeline.stages.train import run_train

    layout = make_work(tmp_path / "w", size=64)
    cfg = lite0_cfg(tmp_path / "w", **{"augment.image_size": 64, "train.epochs": 2, "train.pretrained_lr": 0.0005})
    summary = run_train(cfg)
    assert summary["image_size"] == 64 and summary["params_inference"] < 5_000_000
    best = torch.load(layout.train_dir / "best.pt", weights_only=True)
    assert best["pretrained"]["pretrained_sha256"] == weights.sha256
    run_select(cfg)
    meta = json.loads((layout.export_dir / "config.json").read_text())
    assert meta["model"]["extractor"] == "efficientnet_lite0" and meta["pretrained"]["pretrained_sha256"] == weights.sha256
    exported = load_exported(layout.export_dir)
    assert exported.image_size == 64
    out = tmp_path / "pred.csv"
    run_predict(cfg, layout.export_dir, layout.augmented_dir / "test", out)
    assert len(out.read_text().splitlines()) == 1 + 7 * 2
