"""Contrastive pretraining of the twin (``train.pretrain_*``, :mod:`pipeline.core.pretrain`)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_train import make_work, stopped_after_one_epoch, tiny_cfg

from pipeline.core.model import build_twin
from pipeline.core.pretrain import (
    ProjectionHead,
    contrastive_views,
    nt_xent,
    pretrain_epoch,
    pretrain_optimizer,
    pretrain_order,
)
from pipeline.core.training import CPU
from pipeline.errors import PipelineError

PRETRAIN = {"train.pretrain_epochs": 2, "train.pretrain_batch_size": 8}


def test_nt_xent_is_the_cross_entropy_of_picking_the_other_view() -> None:
    g = torch.Generator().manual_seed(0)
    za, zb = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    z = F.normalize(torch.cat([za, zb]), dim=1)
    sim = z @ z.t() / 0.5
    expect = 0.0
    for i in range(10):
        partner = (i + 5) % 10
        others = torch.cat([sim[i, :i], sim[i, i + 1 :]])
        expect += float(torch.logsumexp(others, 0) - sim[i, partner])
    assert float(nt_xent(za, zb, 0.5)) == pytest.approx(expect / 10, rel=1e-5)
    # agreeing views of distinct images: near 0 at a low temperature; random views: near log(2N - 1)
    e = torch.eye(6, 8)
    assert float(nt_xent(e, e * 3, 0.05)) < 1e-6
    assert float(nt_xent(za, zb, 1.0)) == pytest.approx(np.log(9), abs=0.5)
    with pytest.raises(ValueError, match="nt_xent"):
        nt_xent(za, zb[:4], 0.5)
    with pytest.raises(ValueError, match="nt_xent"):
        nt_xent(za[:1], zb[:1], 0.5)


def test_pretrain_order_is_a_pure_function_of_seed_and_epoch_over_the_rows_once() -> None:
    rows = np.arange(10, 31)  # 21 rows: batches of 10, 10 and a trailing one, dropped
    a = pretrain_order(rows, 3, 0, 10)
    assert [len(b) for b in a] == [10, 10]
    flat = np.concatenate(a)
    assert len(set(flat.tolist())) == 20 and set(flat.tolist()) <= set(rows.tolist())
    assert all(np.array_equal(x, y) for x, y in zip(a, pretrain_order(rows, 3, 0, 10), strict=True))
    assert not np.array_equal(flat, np.concatenate(pretrain_order(rows, 3, 1, 10)))
    assert not np.array_equal(flat, np.concatenate(pretrain_order(rows, 4, 0, 10)))


class _Images:
    def __init__(self, x: np.ndarray) -> None:
        self.x = x

    def take(self, rows: np.ndarray) -> np.ndarray:
        return self.x[rows].copy()


def _blobs(n: int, size: int = 24, seed: int = 0) -> np.ndarray:
    """``n`` distinct uint8 images: a coloured disc of its own colour, radius and place each."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = np.empty((n, 3, size, size), dtype=np.uint8)
    for i in range(n):
        cy, cx, r = rng.uniform(8, size - 8), rng.uniform(8, size - 8), rng.uniform(3, 7)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        skin, lesion = rng.integers(120, 230, 3), rng.integers(10, 120, 3)
        out[i] = np.where(disc[None], lesion[:, None, None], skin[:, None, None])
    return out


def test_pretraining_learns_to_match_views_and_trains_only_the_extractor_and_branches(tmp_path: Path) -> None:
    cfg = tiny_cfg(tmp_path)
    torch.manual_seed(0)
    twin = build_twin(cfg.model, 7)
    before = {k: v.clone() for k, v in twin.state_dict().items()}
    head = ProjectionHead(cfg.model.head_channels, 16)
    images = _Images(_blobs(32))
    epochs = [pretrain_order(np.arange(32), 0, e, 16) for e in range(30)]
    opt, sched = pretrain_optimizer(twin, head, 1e-2, 1e-4, sum(len(b) for b in epochs))
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    views, gen = contrastive_views(0.2, 0.05, 0.2), torch.Generator().manual_seed(0)
    steps: list[float] = []
    losses = [
        pretrain_epoch(twin, head, images, b, opt=opt, sched=sched, scaler=scaler, views=views, gen=gen, ds=CPU,
                       temperature=0.2, epoch=e, on_step=steps.append)  # fmt: skip
        for e, b in enumerate(epochs)
    ]
    assert len(steps) == 60 and steps[1] == pytest.approx(losses[0])  # the running mean of the epoch
    assert np.mean(losses[-5:]) < 0.6 * losses[0], losses  # log(31) = 3.4 when the views are not matched
    after = twin.state_dict()
    for key in before:
        moved = not torch.equal(before[key], after[key])
        untouched = ".classifier." in key or key.startswith("discriminator.")
        if before[key].is_floating_point() and key.endswith("weight"):
            assert moved != untouched, key
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)  # cosine to 0 over every step


def test_a_non_finite_pretraining_loss_stops_with_the_knob_to_lower(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.core.pretrain as pretrain

    monkeypatch.setattr(pretrain, "nt_xent", lambda *a: torch.tensor(float("nan"), requires_grad=True))
    cfg = tiny_cfg(tmp_path)
    twin, head = build_twin(cfg.model, 7), ProjectionHead(cfg.model.head_channels, 8)
    opt, sched = pretrain_optimizer(twin, head, 1e-3, 0.0, 1)
    with pytest.raises(PipelineError, match=r"pretraining epoch 3.*train\.pretrain_lr"):
        pretrain_epoch(
            twin, head, _Images(_blobs(4)), [np.arange(4)], opt=opt, sched=sched,
            scaler=torch.amp.GradScaler("cuda", enabled=False), views=contrastive_views(0.1, 0.1, 0.1),
            gen=torch.Generator().manual_seed(0), ds=CPU, temperature=0.2, epoch=2,
        )  # fmt: skip


def test_pretraining_is_left_out_of_the_resume_digest_while_off(tmp_path: Path) -> None:
    from pipeline.stages.train import train_digest

    data = SimpleNamespace(digest="d", image_size=32)

    def digest(**extra: object) -> str:
        return train_digest(tiny_cfg(tmp_path, **extra), data, 1)  # type: ignore[arg-type]

    assert digest() == digest(**{"train.pretrain_lr": 0.1, "train.pretrain_temperature": 0.5})
    assert digest(**PRETRAIN) != digest()
    assert digest(**PRETRAIN) != digest(**PRETRAIN, **{"train.pretrain_temperature": 0.5})


def test_pretraining_starts_training_from_its_weights_resumes_bit_identically_and_exports_an_ordinary_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.stages.train as train
    from pipeline.stages.select import run_select

    calls: list[int] = []
    real = train._pretrain

    def spy(cfg: Any, twin: Any, data: Any, rows: np.ndarray, *rest: Any) -> list[float]:
        calls.append(len(rows))
        assert not np.isin(rows, data.val_rows).any()  # never a val image
        return real(cfg, twin, data, rows, *rest)

    monkeypatch.setattr(train, "_pretrain", spy)
    extra = {"train.epochs": 3, "pairs.epochs": 2, **PRETRAIN}
    full, killed, cfg = stopped_after_one_epoch(tmp_path, monkeypatch, extra)
    assert calls == [28, 28]  # the full run and the killed run, over the 7 x 4 train images
    summary = train.run_train(cfg)
    assert calls == [28, 28] and summary["resumed_after_epoch"] == 1  # a resumed run does not pretrain again
    a = torch.load(full.train_dir / "last.pt", map_location="cpu", weights_only=True)
    b = torch.load(killed.train_dir / "last.pt", map_location="cpu", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert len(a["pretrain"]) == 2 and a["pretrain"] == b["pretrain"] == summary["pretrain_losses"]
    assert all(np.isfinite(a["pretrain"]))
    assert json.loads((killed.train_dir / "best.json").read_text())["pretrain_losses"] == a["pretrain"]

    plain = make_work(tmp_path / "plain")
    plain_summary = train.run_train(tiny_cfg(tmp_path / "plain", **{"train.epochs": 3, "pairs.epochs": 2}))
    assert "pretrain_losses" not in plain_summary and len(calls) == 2
    c = torch.load(plain.train_dir / "last.pt", map_location="cpu", weights_only=True)
    assert "pretrain" not in c and "pretrain_losses" not in json.loads((plain.train_dir / "best.json").read_text())
    assert any(not torch.equal(a["model"][k], c["model"][k]) for k in a["model"] if a["model"][k].is_floating_point())
    best = torch.load(killed.train_dir / "best.pt", map_location="cpu", weights_only=True)
    assert set(best["model"]) == set(c["model"])  # the twin only, no projection head
    run_select(cfg)
    exported = json.loads((killed.export_dir / "config.json").read_text())
    assert exported["params_inference"] == best["params_inference"]


def test_the_first_epoch_starts_from_the_pretrained_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.stages.train as train

    seen: list[dict[str, torch.Tensor]] = []
    real_epoch, real_pretrain = train.train_epoch, train._pretrain
    pretrained: list[dict[str, torch.Tensor]] = []

    def spy_pretrain(cfg: Any, twin: Any, *rest: Any) -> list[float]:
        out = real_pretrain(cfg, twin, *rest)
        pretrained.append({k: v.clone() for k, v in twin.state_dict().items()})
        return out

    def spy_epoch(model: Any, *args: Any, **kw: Any) -> Any:
        if kw["epoch"] == 0:
            seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return real_epoch(model, *args, **kw)

    monkeypatch.setattr(train, "_pretrain", spy_pretrain)
    monkeypatch.setattr(train, "train_epoch", spy_epoch)
    for name, extra in (("plain", {}), ("pre", PRETRAIN)):
        make_work(tmp_path / name)
        train.run_train(tiny_cfg(tmp_path / name, **extra))
    assert len(pretrained) == 1 and len(seen) == 2
    assert all(torch.equal(pretrained[0][k], seen[1][k]) for k in seen[1])
    moved = [k for k in seen[0] if seen[0][k].is_floating_point() and not torch.equal(seen[0][k], seen[1][k])]
    assert any(k.startswith("extractor.") for k in moved) and any(k.startswith("branches.1.") for k in moved)
