"""The twin network and its inference model: shapes, weight sharing, size budget, export."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from pipeline.config import ModelConfig, load_config
from pipeline.core.model import (
    Branch,
    Discriminator,
    FeatureExtractor,
    InferenceModel,
    InvertedResidual,
    TwinNet,
    TwinOutput,
    build_inference,
    build_twin,
    count_parameters,
    fold_batch_norm,
    inference_model,
)

TINY = ModelConfig(
    stem_channels=8,
    extractor=[(1, 8, 1, 1), (2, 12, 1, 2)],
    branch=[(2, 16, 2, 2)],
    head_channels=16,
    discriminator_hidden=8,
    dropout=0.1,
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_twin_forward_shapes() -> None:
    twin = build_twin(TINY, 7)
    x1, x2 = torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32)
    out = twin(x1, x2)
    assert isinstance(out, TwinOutput)
    assert out.logits1.shape == out.logits2.shape == (3, 7)
    assert out.same_logits.shape == (3, 2)
    assert out.pooled1.shape == out.pooled2.shape == (3, 16)
    assert twin.num_classes == 7
    assert isinstance(twin.extractor, FeatureExtractor) and twin.extractor.out_channels == 12
    assert len(twin.branches) == 2 and all(isinstance(b, Branch) for b in twin.branches)


def test_extractor_shared_and_branches_own_weights() -> None:
    twin = build_twin(TINY, 7)
    b0, b1 = twin.branches
    assert b0 is not b1
    ptrs0 = {p.data_ptr() for p in b0.parameters()}
    ptrs1 = {p.data_ptr() for p in b1.parameters()}
    assert not ptrs0 & ptrs1
    # Gradients: image 1 only through branch 0, image 2 only through branch 1, both through the extractor.
    twin.eval()
    out = twin(torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32))
    out.logits1.sum().backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in b1.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in b0.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in twin.extractor.parameters())


def test_pair_routing_matches_separate_passes_in_eval() -> None:
    twin = build_twin(TINY, 7).eval()
    x1, x2 = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    out = twin(x1, x2)
    l1, p1 = twin.branches[0](twin.extractor(x1))
    l2, p2 = twin.branches[1](twin.extractor(x2))
    torch.testing.assert_close(out.logits1, l1)
    torch.testing.assert_close(out.logits2, l2)
    torch.testing.assert_close(out.same_logits, twin.discriminator(p1, p2))


def test_discriminator_is_symmetric() -> None:
    d = Discriminator(10, 6)
    a, b = torch.randn(4, 10), torch.randn(4, 10)
    torch.testing.assert_close(d(a, b), d(b, a))
    # and it is not a constant: different pairs give different logits
    assert not torch.allclose(d(a, b), d(a, a))
    with pytest.raises(ValueError):
        d(a, torch.randn(4, 9))


def test_twin_rejects_mismatched_pair() -> None:
    with pytest.raises(ValueError):
        build_twin(TINY)(torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32))


def test_inverted_residual_shortcut_rule() -> None:
    assert InvertedResidual(8, 8, 1, 4).use_residual
    assert not InvertedResidual(8, 8, 2, 4).use_residual
    assert not InvertedResidual(8, 12, 1, 4).use_residual
    # expansion 1 has no 1x1 expand conv: depthwise + project only
    assert len(InvertedResidual(8, 8, 1, 1).block) == 2
    assert len(InvertedResidual(8, 8, 1, 4).block) == 3
    with pytest.raises(ValueError):
        InvertedResidual(8, 8, 3, 4)


def test_residual_blocks_start_as_identity() -> None:
    blk = FeatureExtractor(ModelConfig(stem_channels=8, extractor=[(2, 8, 2, 1)])).stages[1]
    assert isinstance(blk, InvertedResidual) and blk.use_residual
    blk.eval()
    x = torch.randn(2, 8, 8, 8)
    torch.testing.assert_close(blk(x), x)


def test_inference_model_is_a_copy_of_the_chosen_branch() -> None:
    twin = build_twin(TINY, 7).eval()
    x = torch.randn(2, 3, 32, 32)
    for idx in (0, 1):
        inf = inference_model(twin, idx)
        assert isinstance(inf, InferenceModel)
        assert not inf.training
        out = twin(x, x)
        torch.testing.assert_close(inf(x), out.logits1 if idx == 0 else out.logits2)
        # deep copy: changing the inference model leaves the twin untouched
        before = twin.branches[idx].classifier.weight.clone()
        with torch.no_grad():
            inf.branch.classifier.weight.add_(1.0)
        torch.testing.assert_close(twin.branches[idx].classifier.weight, before)
    with pytest.raises(ValueError):
        inference_model(twin, 2)


def test_build_inference_loads_state_dict() -> None:
    inf = inference_model(build_twin(TINY, 5), 1).eval()
    fresh = build_inference(TINY, 5)
    fresh.load_state_dict(inf.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(fresh.eval()(x), inf(x))
    assert inf.classifier_weight.shape == (5, TINY.head_channels)
    fm = inf.feature_map(x)
    assert fm.shape == (2, TINY.head_channels, 4, 4)  # stride 8 overall
    assert (fm >= 0).all()
    torch.testing.assert_close(inf.logits_from_feature_map(fm), inf(x))


def test_inference_model_traces_and_exports() -> None:
    inf = build_inference(TINY, 7).eval()
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(inf, x)
    x3 = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(traced(x3), inf(x3))
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(inf, (x,), dynamic_shapes=({0: batch},))
    torch.testing.assert_close(program.module()(x3), inf(x3))


def test_default_config_parameter_budget(params_path) -> None:
    cfg = load_config(params_path).model
    twin = build_twin(cfg, 7)
    n_twin = count_parameters(twin)
    n_inf = count_parameters(inference_model(twin, 0))
    assert n_inf <= 1_000_000
    assert n_inf == count_parameters(build_inference(cfg, 7))
    assert n_twin == n_inf + count_parameters(twin.branches[1]) + count_parameters(twin.discriminator)
    out = twin(torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64))
    assert out.logits1.shape == (2, 7)


def test_count_parameters() -> None:
    lin = torch.nn.Linear(3, 4)
    assert count_parameters(lin) == 16
    lin.bias.requires_grad_(False)
    assert count_parameters(lin, trainable_only=True) == 12
    assert isinstance(build_twin(TINY), TwinNet)


def trained_look(model: torch.nn.Module) -> torch.nn.Module:
    """Batch-norm statistics and affine parameters far from their initial identity, as after training."""
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.3, 3)
        bn.weight.data.uniform_(0.5, 1.5), bn.bias.data.uniform_(-0.5, 0.5)
    return model


def test_fold_batch_norm_computes_the_same_function_without_batch_norm() -> None:
    """The folded copy has no BatchNorm2d, gives the eval-mode outputs, feature maps and CAM of the
    original, and leaves the original, its mode and its state dict alone."""
    from pipeline.core.cam import cam_for

    model = trained_look(build_inference(TINY, 7)).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batch_norm(model)
    assert model.training and not folded.training
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) > 5
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert isinstance(folded, InferenceModel)
    model.eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(folded.feature_map(x), model.feature_map(x), atol=1e-5, rtol=1e-4)
    cam_a, cls_a, _ = cam_for(model, x[:1])
    cam_b, cls_b, _ = cam_for(folded, x[:1])
    assert cls_a == cls_b
    np.testing.assert_allclose(cam_a, cam_b, atol=1e-4)


def test_fold_batch_norm_leaves_a_batch_norm_without_running_statistics() -> None:
    """A BatchNorm2d that normalises with the batch's own statistics (no running ones) is not a fixed
    affine map: it is left in place."""
    seq = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4, track_running_stats=False))
    folded = fold_batch_norm(seq)
    assert [type(m) for m in folded] == [torch.nn.Conv2d, torch.nn.BatchNorm2d]
