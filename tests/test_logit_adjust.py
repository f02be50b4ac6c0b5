"""Logit adjustment (``loss.logit_adjust``, Menon et al., ICLR 2021): the branches' focal terms see
``logits + tau * log pi`` with ``pi`` the training class frequencies, in training and validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_train import make_work, tiny_cfg

from pipeline.config import LossConfig
from pipeline.core.losses import focal_loss, joint_loss, logit_shift, mixed_joint_loss
from pipeline.core.model import TwinOutput


def test_logit_shift_is_tau_times_the_log_class_frequency_and_none_when_off() -> None:
    counts = np.array([10, 30, 0, 60, 0, 0, 0])
    assert logit_shift(0.0, counts) is None
    shift = logit_shift(0.5, counts)
    assert shift is not None and shift.dtype == torch.float32 and shift.shape == (7,)
    total = 10 + 30 + 60 + 4  # a class with no image counts as one
    expect = 0.5 * np.log(np.array([10, 30, 1, 60, 1, 1, 1]) / total)
    np.testing.assert_allclose(shift.numpy(), expect, rtol=1e-6)
    with pytest.raises(ValueError, match="logit_adjust"):
        logit_shift(-0.1, counts)
    with pytest.raises(ValueError, match="logit_adjust"):
        LossConfig(logit_adjust=-1.0)


def test_focal_loss_with_a_shift_is_the_focal_loss_of_the_shifted_logits() -> None:
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(9, 7, generator=g), torch.randint(0, 7, (9,), generator=g)
    shift = torch.randn(7, generator=g)
    for gamma, eps in ((0.0, 0.0), (2.0, 0.0), (1.0, 0.1)):
        torch.testing.assert_close(
            focal_loss(logits, y, gamma, label_smoothing=eps, shift=shift),
            focal_loss(logits + shift, y, gamma, label_smoothing=eps),
        )
    with pytest.raises(ValueError, match="shift must have 7"):
        focal_loss(logits, y, 2.0, shift=torch.zeros(6))
    # both branches of the joint loss and of its mixed form are shifted; the discriminator is not
    out = TwinOutput(logits1=logits, logits2=logits.flip(0), same_logits=torch.randn(9, 2, generator=g),
                     pooled1=torch.zeros(9, 1), pooled2=torch.zeros(9, 1))  # fmt: skip
    cfg, y2 = LossConfig(), y.flip(0)
    adjusted, plain = joint_loss(out, y, y2, cfg, shift=shift), joint_loss(out, y, y2, cfg)
    torch.testing.assert_close(adjusted.focal1, focal_loss(logits + shift, y, cfg.gamma))
    torch.testing.assert_close(adjusted.focal2, focal_loss(logits.flip(0) + shift, y2, cfg.gamma))
    assert torch.equal(adjusted.disc, plain.disc)
    perm = torch.randperm(9, generator=g)
    mixed = mixed_joint_loss(out, y, y2, cfg, 0.3, perm, shift=shift)
    other = joint_loss(out, y[perm], y2[perm], cfg, shift=shift)
    torch.testing.assert_close(mixed.total, 0.3 * adjusted.total + 0.7 * other.total)


def test_adjusted_cross_entropy_learns_the_class_balanced_posterior() -> None:
    """What the knob is for: on imbalanced labels a class bias trained with plain cross-entropy
    learns the training prior, trained with the adjusted loss (tau 1) it learns equal classes."""
    counts = np.array([5, 20, 2, 8, 40, 300, 3])
    y = torch.as_tensor(np.repeat(np.arange(7), counts))
    prior = counts / counts.sum()
    for tau, target in ((0.0, prior), (1.0, np.full(7, 1 / 7))):
        bias = torch.zeros(1, 7, requires_grad=True)
        opt = torch.optim.LBFGS([bias], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")
        shift = logit_shift(tau, counts)

        def closure(b: torch.Tensor = bias, s: Any = shift) -> torch.Tensor:
            opt.zero_grad()
            loss = focal_loss(b.expand(len(y), 7), y, 0.0, shift=s)
            loss.backward()
            return loss

        opt.step(closure)
        np.testing.assert_allclose(torch.softmax(bias.detach(), 1)[0].numpy(), target, atol=1e-4)


def _imbalanced_work(work: Path) -> Any:
    """:func:`make_work` with one train image left of every class but ``akiec`` (4), so the shift
    differs between classes; the pairs that used the dropped images go too."""
    import pandas as pd

    layout = make_work(work)
    aug = pd.read_parquet(layout.augmented_manifest)
    drop = aug["split"].eq("train") & aug["label"].ne("akiec") & ~aug["image_id"].str.endswith("_0")
    aug[~drop].to_parquet(layout.augmented_manifest, index=False)
    gone = set(aug.loc[drop, "image_id"])
    pairs = pd.read_parquet(layout.pairs)
    pairs[~pairs["left_id"].isin(gone) & ~pairs["right_id"].isin(gone)].to_parquet(layout.pairs, index=False)
    return layout


def test_training_passes_the_same_shift_to_every_epoch_and_to_validation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pandas as pd

    import pipeline.stages.train as train

    seen: dict[str, list[Any]] = {"epoch": [], "validate": []}
    real_epoch, real_validate = train.train_epoch, train.validate

    def spy_epoch(*args: Any, **kw: Any) -> Any:
        seen["epoch"].append(kw.get("shift"))
        return real_epoch(*args, **kw)

    def spy_validate(*args: Any, **kw: Any) -> Any:
        seen["validate"].append(args[9] if len(args) > 9 else kw.get("shift"))
        return real_validate(*args, **kw)

    monkeypatch.setattr(train, "train_epoch", spy_epoch)
    monkeypatch.setattr(train, "validate", spy_validate)
    history = {}
    for tau in (0.0, 1.5):
        seen["epoch"].clear()
        seen["validate"].clear()
        layout = _imbalanced_work(tmp_path / str(tau))
        cfg = tiny_cfg(tmp_path / str(tau), **{"loss.logit_adjust": tau})
        train.run_train(cfg)
        data = train.load_train_data(cfg)
        assert list(data.class_counts) == [4, 1, 1, 1, 1, 1, 1]
        expect = logit_shift(tau, data.class_counts)
        assert len(seen["epoch"]) == len(seen["validate"]) == cfg.train.epochs
        for shift in seen["epoch"] + seen["validate"]:
            assert shift is None if expect is None else (shift is not None and torch.equal(shift.cpu(), expect))
        history[tau] = pd.read_csv(layout.train_dir / "history.csv").iloc[0]
        assert (layout.train_dir / "best.pt").is_file()
    # same data, init and batches: the first epoch's focal losses differ only through the shift
    for key in ("train_focal1", "train_focal2", "val_loss_branch1", "val_loss_branch2"):
        assert history[0.0][key] != history[1.5][key], key
    off, on = (train.train_digest(tiny_cfg(tmp_path / "0.0", **{"loss.logit_adjust": t}), data, 1) for t in (0.0, 1.5))
    assert off != on


def test_validation_losses_of_both_branches_are_the_adjusted_focal_losses(tmp_path: Path) -> None:
    import pipeline.stages.train as train
    from pipeline.core.model import build_twin
    from pipeline.core.training import validate
    from pipeline.io.compute import resolve_device

    _imbalanced_work(tmp_path / "w")
    cfg = tiny_cfg(tmp_path / "w", **{"loss.logit_adjust": 1.0})
    data = train.load_train_data(cfg)
    ds = resolve_device(cfg.train, 0)
    torch.manual_seed(0)
    twin = build_twin(cfg.model, 7).eval()
    shift = logit_shift(1.0, data.class_counts)
    assert shift is not None
    got = validate(twin, data, cfg.loss, 64, ds, None, shift=shift)
    x = ds.to_input(torch.from_numpy(data.images.take(data.val_rows)))
    y = torch.from_numpy(data.labels[data.val_rows])
    with torch.no_grad():
        out = twin(x, x)
    for key, logits in (("val_loss_branch1", out.logits1), ("val_loss_branch2", out.logits2)):
        assert got[key] == pytest.approx(float(focal_loss(logits + shift, y, cfg.loss.gamma)), rel=1e-5), key
        assert got[key] != pytest.approx(float(focal_loss(logits, y, cfg.loss.gamma)), rel=1e-5), key
