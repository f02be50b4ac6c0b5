"""Select stage (patent S3): branch choice, best-epoch choice, export formats."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_model import trained_look
from test_train import make_work, tiny_cfg

from pipeline.errors import PipelineError


def test_select_branch_rule() -> None:
    from pipeline.core.selection import select_branch

    assert select_branch(0.4, 0.6) == 1
    assert select_branch(0.6, 0.4) == 2
    assert select_branch(0.5, 0.5) == 1  # tie -> branch 1


def _scripted_validate(script: list[tuple[float, float, float]], loss_cfg: Any):
    calls = {"n": 0}

    def fake(*args, **kwargs):  # noqa: ANN002, ANN003 - stands in for pipeline.core.training.validate
        b1, b2, disc = script[calls["n"]]
        calls["n"] += 1
        total = loss_cfg.A * b1 + loss_cfg.B * b2 + loss_cfg.C * disc
        return {"val_loss_branch1": b1, "val_loss_branch2": b2, "val_loss_discriminator": disc, "val_loss_total": total}

    return fake


def test_select_uses_best_epoch_and_lower_branch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Scripted validation history: epoch 2 has the lowest total loss and branch 2 wins there,
    although branch 1 is lower in epochs 1 and 3."""
    import pipeline.stages.train as train
    from pipeline.core.model import build_twin, inference_model
    from pipeline.io.modelstore import load_exported
    from pipeline.stages.select import run_select

    cfg = tiny_cfg(tmp_path / "w", **{"train.epochs": 3})
    make_work(tmp_path / "w")
    script = [(1.0, 1.5, 0.7), (0.9, 0.6, 0.5), (0.5, 1.4, 0.9)]  # totals 2.85, 1.75, 2.35
    monkeypatch.setattr(train, "validate", _scripted_validate(script, cfg.loss))
    summary = train.run_train(cfg)
    assert summary["best_epoch"] == 2

    out = run_select(cfg)
    assert out["selected_branch"] == 2 and out["best_epoch"] == 2
    export_dir = Path(cfg.paths.work_dir) / "models" / "export"
    meta = json.loads((export_dir / "config.json").read_text())
    assert meta["selected_branch"] == 2
    assert meta["best_epoch"] == 2
    assert meta["val_loss_branch1"] == pytest.approx(0.9) and meta["val_loss_branch2"] == pytest.approx(0.6)
    assert meta["image_size"] == 32 and meta["num_classes"] == 7 and len(meta["classes"]) == 7
    assert meta["cam_map"] == [4, 4]  # 32 px through the tiny model's stride 8
    assert meta["params_train"] > meta["params_inference"] > 0
    for key in ("mean", "std", "model", "config_digest"):
        assert key in meta

    # the exported weights are the best epoch's extractor + branch 2
    best = torch.load(Path(cfg.paths.work_dir) / "models" / "train" / "best.pt", weights_only=True)
    twin = build_twin(cfg.model, 7)
    twin.load_state_dict(best["model"])
    expect = inference_model(twin, 1).eval()
    weights = torch.load(export_dir / "weights.pt", weights_only=True)
    assert set(weights) == set(expect.state_dict())
    for k, v in expect.state_dict().items():
        assert torch.equal(weights[k], v), k
    exported = load_exported(export_dir)
    assert not exported.model.training
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(exported.model(x), expect(x), atol=1e-6)


def test_portable_module_matches_eager(tmp_path: Path) -> None:
    from pipeline.core.model import build_twin, count_parameters, inference_model
    from pipeline.core.selection import build_meta
    from pipeline.io.modelstore import export_inference, load_exported, load_portable

    cfg = tiny_cfg(tmp_path)
    torch.manual_seed(0)
    twin = build_twin(cfg.model, 7)
    inf = inference_model(twin, 0).eval()
    best = {"model_config": cfg.model.model_dump(mode="json"), "num_classes": 7, "image_size": 32, "epoch": 1,
            "val_loss_branch1": 0.1, "val_loss_branch2": 0.2}
    folder = tmp_path / "exp"
    folder.mkdir()
    meta = export_inference(inf, build_meta(best, 1, count_parameters(inf)), folder)
    assert (folder / meta["portable"]).is_file()
    portable = load_portable(folder)
    eager = load_exported(folder).model
    for n in (1, 5):  # the traced module is not tied to the example batch size
        x = torch.randn(n, 3, 32, 32)
        with torch.no_grad():
            assert torch.allclose(portable(x), eager(x), atol=1e-5, rtol=1e-4)
    sd = torch.load(folder / "weights.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in sd.values())


def test_inference_runs_folded_and_channels_last_and_the_files_stay_as_trained(tmp_path: Path) -> None:
    """Every inference path gets a copy with its batch norm folded into the convs, channels-last
    (faster on the CPU); the export's files are the trained state dict in the default format
    whatever the format of the model handed in, and the loaded model gives the plain model's outputs."""
    from pipeline.core.inference import inference_ready
    from pipeline.core.model import build_twin, count_parameters, inference_model
    from pipeline.core.selection import build_meta
    from pipeline.io.modelstore import export_inference, load_exported

    cfg = tiny_cfg(tmp_path)
    torch.manual_seed(0)
    plain = trained_look(inference_model(build_twin(cfg.model, 7), 0)).eval()
    trained = {k: v.clone() for k, v in plain.state_dict().items()}
    fast = inference_ready(plain)
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in trained.items())  # the argument is untouched
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    convs = [m.weight for m in fast.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not fast.training
    best = {"model_config": cfg.model.model_dump(mode="json"), "num_classes": 7, "image_size": 32, "epoch": 1,
            "val_loss_branch1": 0.1, "val_loss_branch2": 0.2}
    folder = tmp_path / "exp"
    folder.mkdir()
    export_inference(plain.to(memory_format=torch.channels_last), build_meta(best, 1, count_parameters(plain)), folder)
    saved = torch.load(folder / "weights.pt", weights_only=True)
    assert all(v.is_contiguous() for v in saved.values())
    assert saved.keys() == trained.keys() and all(torch.equal(saved[k], v) for k, v in trained.items())
    loaded = load_exported(folder).model
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in loaded.modules())
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last)
               for m in loaded.modules() if isinstance(m, torch.nn.Conv2d))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expect = plain(x)
        torch.testing.assert_close(loaded(x), expect, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(fast(x), expect, atol=1e-5, rtol=1e-4)


def test_select_without_training_names_the_file(tmp_path: Path) -> None:
    from pipeline.stages.select import run_select

    with pytest.raises(PipelineError, match="best.pt"):
        run_select(tiny_cfg(tmp_path / "nothing"))


def test_export_and_model_card_record_the_cam_map_and_the_extractor() -> None:
    from pipeline.core.model_card import _backbone, _cam_map

    assert _cam_map({"cam_map": [7, 7]}) == "7 x 7 cells"
    assert _cam_map({}) == "an unrecorded resolution"
    assert _backbone({"model": {"extractor": [[1, 16, 1, 1]]}}) == "extractor trained from scratch"
    lite = {"model": {"extractor": "efficientnet_lite0"}, "pretrained": {"pretrained_sha256": "ab" * 32}}
    assert _backbone(lite).startswith("efficientnet_lite0 extractor from ImageNet weights (sha256 abababab")
