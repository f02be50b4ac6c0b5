"""Site-adversarial training (train.site_adversarial): the gradient reversal, the ramp, the
class-conditional site head and its loss, and the train stage with it on tiny project-made data."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from test_train import make_work, stopped_after_one_epoch, tiny_cfg

from pipeline.core.adversarial import SiteHead, dann_coefficient, grad_reverse, pick_sites, site_loss


def test_gradient_reversal_is_the_identity_forward_and_flips_the_gradient() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    y = grad_reverse(x, 0.25)
    assert torch.equal(y, x)
    w = torch.randn(4, 3)
    (y * w).sum().backward()
    torch.testing.assert_close(x.grad, -0.25 * w)


def test_dann_coefficient_ramps_from_zero_towards_the_weight() -> None:
    assert dann_coefficient(0.0, 2.0) == 0.0
    assert dann_coefficient(-1.0, 2.0) == 0.0  # clamped
    assert dann_coefficient(0.5, 2.0) == pytest.approx(2.0 * (2 / (1 + math.exp(-5)) - 1))
    assert dann_coefficient(1.0, 2.0) == pytest.approx(2.0 * (2 / (1 + math.exp(-10)) - 1))
    assert dann_coefficient(3.0, 2.0) == dann_coefficient(1.0, 2.0)
    ramp = [dann_coefficient(p / 10, 1.0) for p in range(11)]
    assert ramp == sorted(ramp) and 0.98 < ramp[5] < ramp[-1] < 1.0


def test_conditional_site_head_reads_each_rows_label_block() -> None:
    torch.manual_seed(0)
    head = SiteHead(8, 16, num_sites=3, num_classes=7)
    pooled = torch.randn(5, 8)
    out = head(pooled)
    assert out.shape == (5, 7, 3)
    labels = torch.tensor([0, 6, 2, 2, 4])
    picked = pick_sites(out, labels)
    assert picked.shape == (5, 3)
    for i, y in enumerate(labels.tolist()):
        assert torch.equal(picked[i], out[i, y])
    marginal = SiteHead(8, 16, num_sites=3)
    assert marginal(pooled).shape == (5, 1, 3)
    assert torch.equal(pick_sites(marginal(pooled), labels), marginal(pooled)[:, 0])
    with pytest.raises(ValueError, match="2 sites"):
        SiteHead(8, 16, num_sites=1)


def test_site_loss_trains_the_head_and_reverses_the_feature_gradient() -> None:
    torch.manual_seed(0)
    head = SiteHead(6, 12, num_sites=2, num_classes=3)
    pooled = torch.randn(8, 6, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    sites = torch.tensor([0, 1, 1, 0, 0, 1, 1, 0])
    plain = F.cross_entropy(pick_sites(head(pooled), labels), sites)
    feat_grad, *head_grads = torch.autograd.grad(plain, [pooled, *head.parameters()])

    loss = site_loss(head, pooled, labels, sites, coeff=0.5)
    torch.testing.assert_close(loss, plain)
    loss.backward()
    torch.testing.assert_close(pooled.grad, -0.5 * feat_grad)  # the features are pushed away ...
    for p, g in zip(head.parameters(), head_grads, strict=True):
        torch.testing.assert_close(p.grad, g)  # ... the head learns at full strength

    perm = torch.tensor([3, 2, 1, 0, 7, 6, 5, 4])
    other = F.cross_entropy(pick_sites(head(pooled), labels[perm]), sites[perm])
    mixed = site_loss(head, pooled, labels, sites, 0.5, lam=0.7, perm=perm)
    torch.testing.assert_close(mixed, 0.7 * plain + 0.3 * other)
    torch.testing.assert_close(site_loss(head, pooled, labels, sites, 0.5, lam=1.0, perm=perm), plain)


# --------------------------------------------------------------------------------------------
# the train stage
# --------------------------------------------------------------------------------------------


def test_sites_are_read_from_the_augmented_manifest(tmp_path: Path) -> None:
    from pipeline.stages.train import load_train_data

    make_work(tmp_path / "w", sites=3)
    data = load_train_data(tiny_cfg(tmp_path / "w"))
    assert data.site_names == ("site0", "site1", "site2")
    aug = pd.read_parquet(tmp_path / "w" / "data" / "augmented" / "manifest.parquet")
    used = pd.concat([aug[aug["split"] == "train"], aug[aug["split"] == "val"]])
    assert [data.site_names[i] for i in data.sites] == used["source_site"].tolist()

    make_work(tmp_path / "old")  # written before augment recorded sites: one "unknown" site
    assert load_train_data(tiny_cfg(tmp_path / "old")).site_names == ("unknown",)


def test_site_adversarial_needs_two_sites_and_says_so(tmp_path: Path) -> None:
    from pipeline.errors import DataError
    from pipeline.stages.train import run_train

    layout = make_work(tmp_path / "w")
    with pytest.raises(DataError, match=r"at least two acquisition sites.*\['unknown'\].*re-run augment"):
        run_train(tiny_cfg(tmp_path / "w", **{"train.site_adversarial": 1.0}))
    assert not (layout.train_dir / "best.pt").exists()


def test_site_adversarial_is_left_out_of_the_resume_digest_while_off(tmp_path: Path) -> None:
    from pipeline.stages.train import train_digest

    sites = np.array([0, 1, 0, 1])
    data = SimpleNamespace(digest="d", image_size=32, sites=sites, site_names=("a", "b"))

    def digest(d: object = data, **extra: object) -> str:
        return train_digest(tiny_cfg(tmp_path, **extra), d, 1)  # type: ignore[arg-type]

    off = {"train.site_adversarial_mode": "marginal", "train.site_adversarial_hidden": 7}
    assert digest() == digest(**off)
    assert digest(SimpleNamespace(digest="d", image_size=32)) == digest()  # off: the sites are not read
    on = {"train.site_adversarial": 1.0}
    assert digest(**on) != digest()
    assert digest(**on) != digest(**on, **off)
    moved = SimpleNamespace(digest="d", image_size=32, sites=np.array([1, 0, 0, 1]), site_names=("a", "b"))
    assert digest(moved, **on) != digest(**on)  # which image is from which site is an input
    assert digest(moved) == digest()


@pytest.mark.parametrize("mode", ["conditional", "marginal"])
def test_site_adversarial_changes_training_resumes_bit_identically_and_exports_an_ordinary_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    from pipeline.stages.select import run_select
    from pipeline.stages.train import run_train

    extra = {"train.epochs": 3, "pairs.epochs": 2, "train.site_adversarial": 1.0, "train.site_adversarial_mode": mode}
    full, killed, cfg = stopped_after_one_epoch(tmp_path, monkeypatch, extra, sites=2)
    assert run_train(cfg)["resumed_after_epoch"] == 1
    a = torch.load(full.train_dir / "last.pt", map_location="cpu", weights_only=True)
    b = torch.load(killed.train_dir / "last.pt", map_location="cpu", weights_only=True)
    for part in ("model", "site_head"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    groups = 7 if mode == "conditional" else 1
    assert a["site_head"]["mlp.2.weight"].shape == (groups * 2, 128)

    plain = make_work(tmp_path / "plain", sites=2)
    run_train(tiny_cfg(tmp_path / "plain", **{"train.epochs": 3, "pairs.epochs": 2}))
    c = torch.load(plain.train_dir / "last.pt", map_location="cpu", weights_only=True)
    assert "site_head" not in c
    assert any(not torch.equal(a["model"][k], c["model"][k]) for k in a["model"] if a["model"][k].is_floating_point())

    history = pd.read_csv(killed.train_dir / "history.csv")
    assert list(history.columns[-3:]) == ["train_site", "lr", "seconds"]
    assert np.isfinite(history["train_site"]).all() and (history["train_site"] > 0).all()
    assert "train_site" not in pd.read_csv(plain.train_dir / "history.csv").columns
    best = torch.load(killed.train_dir / "best.pt", map_location="cpu", weights_only=True)
    assert set(best["model"]) == set(c["model"])  # the twin only
    run_select(cfg)
    exported = json.loads((killed.export_dir / "config.json").read_text())
    assert exported["params_inference"] == best["params_inference"]
