"""Focal loss, class weights and the joint loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import LossConfig
from pipeline.core.losses import class_alpha, focal_loss, joint_loss, same_target
from pipeline.core.model import TwinOutput


def direct_focal(logits: torch.Tensor, target: torch.Tensor, gamma: float, alpha: torch.Tensor | None) -> torch.Tensor:
    """The formula written out: FL = -sum_i y_i alpha_i (1 - p_i)^gamma log p_i, averaged over samples."""
    p = torch.softmax(logits.double(), dim=1)
    y = F.one_hot(target, logits.shape[1]).double()
    a = torch.ones(logits.shape[1], dtype=torch.float64) if alpha is None else alpha.double()
    per = -(y * a * (1 - p) ** gamma * torch.log(p)).sum(dim=1)
    return per.mean()


def test_gamma_zero_is_cross_entropy() -> None:
    torch.manual_seed(0)
    logits, y = torch.randn(16, 7) * 3, torch.randint(0, 7, (16,))
    torch.testing.assert_close(focal_loss(logits, y, 0.0), F.cross_entropy(logits, y))
    ce = F.cross_entropy(logits, y, reduction="none")
    torch.testing.assert_close(focal_loss(logits, y, 0.0, reduction="none"), ce)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("use_alpha", [False, True])
def test_matches_direct_formula(gamma: float, use_alpha: bool) -> None:
    g = torch.Generator().manual_seed(int(gamma * 10) + use_alpha)
    logits = torch.randn(32, 7, generator=g) * 2
    y = torch.randint(0, 7, (32,), generator=g)
    alpha = torch.rand(7, generator=g) + 0.1 if use_alpha else None
    got = focal_loss(logits, y, gamma, alpha)
    torch.testing.assert_close(got.double(), direct_focal(logits, y, gamma, alpha), rtol=1e-5, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    gamma=st.floats(0.0, 5.0),
    seed=st.integers(0, 10_000),
    n=st.integers(1, 12),
    scale=st.floats(0.1, 8.0),
)
def test_matches_direct_formula_property(gamma: float, seed: int, n: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 7, generator=g) * scale
    y = torch.randint(0, 7, (n,), generator=g)
    alpha = torch.rand(7, generator=g) + 0.05
    got = focal_loss(logits, y, gamma, alpha)
    torch.testing.assert_close(got.double(), direct_focal(logits, y, gamma, alpha), rtol=1e-4, atol=1e-6)
    assert got >= 0


def test_focal_downweights_easy_examples() -> None:
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    y = torch.tensor([0, 0])
    ce = F.cross_entropy(logits, y, reduction="none")
    fl = focal_loss(logits, y, 2.0, reduction="none")
    assert (fl <= ce).all()
    # the easy (confident, correct) example is down-weighted much more than the hard one
    assert fl[0] / ce[0] < 0.01 < 0.4 < fl[1] / ce[1]


def test_alpha_mean_is_plain_mean_and_reductions() -> None:
    logits, y = torch.zeros(4, 3), torch.tensor([0, 1, 2, 2])
    alpha = torch.tensor([1.0, 2.0, 4.0])
    per = focal_loss(logits, y, 1.0, alpha, reduction="none")
    base = (2 / 3) * math.log(3)
    torch.testing.assert_close(per, torch.tensor([1.0, 2.0, 4.0, 4.0]) * base)
    torch.testing.assert_close(focal_loss(logits, y, 1.0, alpha), per.sum() / 4)
    torch.testing.assert_close(focal_loss(logits, y, 1.0, alpha, reduction="sum"), per.sum())
    with pytest.raises(ValueError):
        focal_loss(logits, y, 1.0, reduction="avg")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        focal_loss(logits, y, 1.0, torch.ones(4))
    with pytest.raises(ValueError):
        focal_loss(logits, y[:3], 1.0)


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_stable_and_finite_gradients_for_extreme_logits(gamma: float) -> None:
    logits = torch.tensor([[200.0, -200.0, 0.0], [-200.0, 200.0, 0.0]], requires_grad=True)
    y = torch.tensor([0, 0])  # first saturated correct, second saturated wrong
    loss = focal_loss(logits, y, gamma)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert loss.item() == pytest.approx(400.0 / 2, rel=1e-4)  # wrong one: (1-0)^g * 400, mean over 2


def test_half_precision_logits_give_float32_loss() -> None:
    logits = torch.randn(4, 7).to(torch.bfloat16)
    loss = focal_loss(logits, torch.tensor([0, 1, 2, 3]), 2.0)
    assert loss.dtype == torch.float32


def test_class_alpha() -> None:
    assert class_alpha(None, [1] * 7) is None
    w = class_alpha("balanced", np.array([10, 20, 40, 10, 20, 40, 10]))
    assert w is not None and w.dtype == torch.float32 and w.shape == (7,)
    assert float(w.mean()) == pytest.approx(1.0)
    assert float(w[0]) == pytest.approx(4 * float(w[2]))
    # mapping input in class order, a missing class gets 1.0 and does not enter the mean
    w2 = class_alpha("balanced", {"akiec": 1, "bcc": 3})
    assert w2 is not None
    assert float(w2[0]) == pytest.approx(1.5) and float(w2[1]) == pytest.approx(0.5)
    assert torch.all(w2[2:] == 1.0)
    explicit = [0.5, 1, 1, 2, 1, 1, 3]
    expected = torch.tensor(explicit, dtype=torch.float32)
    torch.testing.assert_close(class_alpha(explicit, [5] * 7), expected)
    with pytest.raises(ValueError):
        class_alpha([1.0, 2.0], [5] * 7)
    with pytest.raises(ValueError):
        class_alpha("inverse", [5] * 7)
    with pytest.raises(ValueError):
        class_alpha("balanced", [0] * 7)


def _out(logits1: torch.Tensor, logits2: torch.Tensor, same: torch.Tensor) -> TwinOutput:
    z = torch.zeros(1)
    return TwinOutput(logits1=logits1, logits2=logits2, same_logits=same, pooled1=z, pooled2=z)


def test_joint_loss_weighting_and_same_target_from_labels() -> None:
    torch.manual_seed(1)
    l1, l2, s = torch.randn(6, 7), torch.randn(6, 7), torch.randn(6, 2)
    y1 = torch.tensor([0, 1, 2, 3, 4, 5])
    y2 = torch.tensor([0, 2, 2, 6, 4, 1])
    cfg = LossConfig(A=0.7, B=1.3, C=0.25, gamma=1.5)
    alpha = torch.linspace(0.5, 2.0, 7)
    jl = joint_loss(_out(l1, l2, s), y1, y2, cfg, alpha)
    f1 = focal_loss(l1, y1, 1.5, alpha)
    f2 = focal_loss(l2, y2, 1.5, alpha)
    d = F.cross_entropy(s, torch.tensor([1, 0, 1, 0, 1, 0]))
    torch.testing.assert_close(jl.focal1, f1)
    torch.testing.assert_close(jl.focal2, f2)
    torch.testing.assert_close(jl.disc, d)
    torch.testing.assert_close(jl.total, 0.7 * f1 + 1.3 * f2 + 0.25 * d)
    assert set(jl.as_floats()) == {"total", "focal1", "focal2", "disc"}
    assert same_target(y1, y2).tolist() == [1, 0, 1, 0, 1, 0]
    with pytest.raises(ValueError):
        joint_loss(_out(l1, l2, s), y1, y2[:3], cfg)


def test_joint_loss_backward_through_twin() -> None:
    from pipeline.config import ModelConfig
    from pipeline.core.model import build_twin

    torch.manual_seed(0)
    mcfg = ModelConfig(
        stem_channels=8, extractor=[(1, 8, 1, 2)], branch=[(2, 16, 1, 2)], head_channels=16, discriminator_hidden=8
    )
    twin = build_twin(mcfg)
    x = torch.randn(4, 3, 32, 32)
    jl = joint_loss(twin(x, x.flip(0)), torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 1, 0]).flip(0), LossConfig())
    jl.total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in twin.discriminator.parameters())
