"""Class activation maps: formula, localisation, agreement with Grad-CAM, normalisation, overlays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.config import ModelConfig
from pipeline.core.cam import cam_for, class_activation_map, jet, overlay, upsample_normalize
from pipeline.core.model import Branch, InferenceModel, build_inference
from pipeline.io.overlays import save_overlay_png

TINY = ModelConfig(
    stem_channels=8,
    extractor=[(1, 8, 1, 1), (2, 12, 1, 2)],
    branch=[(2, 16, 1, 2)],
    head_channels=16,
    discriminator_hidden=8,
)


def test_formula_matches_weighted_sum() -> None:
    torch.manual_seed(0)
    fm = torch.randn(5, 3, 4)
    w = torch.randn(3, 5)
    expected = torch.relu((w[2][:, None, None] * fm).sum(0))
    torch.testing.assert_close(class_activation_map(fm, w, 2), expected)
    # batched, one class per map
    fmb = torch.randn(2, 5, 3, 4)
    got = class_activation_map(fmb, w, torch.tensor([0, 2]))
    assert got.shape == (2, 3, 4)
    torch.testing.assert_close(got[1], class_activation_map(fmb[1], w, 2))
    torch.testing.assert_close(class_activation_map(fmb, w, 1)[0], class_activation_map(fmb[0], w, 1))
    with pytest.raises(ValueError):
        class_activation_map(fm, w, 3)
    with pytest.raises(ValueError):
        class_activation_map(torch.randn(4, 3, 4), w, 0)


def test_relu_non_negative() -> None:
    torch.manual_seed(1)
    cam = class_activation_map(torch.randn(2, 8, 6, 6), torch.randn(4, 8), 3)
    assert (cam >= 0).all() and (cam == 0).any()


def test_cam_peaks_in_the_evidence_quadrant() -> None:
    # channel 0 is active only in the bottom-right quadrant, channel 1 everywhere (weakly)
    fm = torch.zeros(3, 8, 8)
    fm[0, 4:, 4:] = 2.0
    fm[1] = 0.3
    w = torch.tensor([[1.0, 0.1, 0.0], [-1.0, 0.5, 0.0]])  # class 0 relies on channel 0
    cam0 = upsample_normalize(class_activation_map(fm, w, 0), (32, 32))
    r, c = np.unravel_index(int(cam0.argmax()), cam0.shape)
    assert r >= 16 and c >= 16
    assert cam0[20:, 20:].min() > 0.9 and cam0[:12, :12].max() < 0.1
    # class 1 is *against* channel 0: its map is zero exactly where class 0's evidence is
    cam1 = class_activation_map(fm, w, 1)
    assert (cam1[4:, 4:] == 0).all() and (cam1[:4, :4] > 0).all()


def _red_detector_model() -> InferenceModel:
    """A hand-built inference model whose head channel 0 fires on red, and class 2 reads channel 0."""
    branch = Branch(nn.Identity(), nn.Sequential(nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6()), 8, 4, 0.0)
    conv, bn = branch.head[0], branch.head[1]
    assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0] = 1.0  # red
        conv.weight[0, 1] = -1.0  # minus green
        bn.reset_parameters()
        bn.reset_running_stats()
        branch.classifier.weight.zero_()
        branch.classifier.bias.zero_()
        branch.classifier.weight[2, 0] = 5.0
    return InferenceModel(nn.AvgPool2d(4), branch).eval()  # type: ignore[arg-type]


def test_cam_for_localises_a_red_patch() -> None:
    model = _red_detector_model()
    x = torch.zeros(1, 3, 32, 32)
    x[0, 0, 4:12, 20:28] = 2.0  # red square top-right
    cam, pred, probs = cam_for(model, x)
    assert pred == 2
    assert probs.shape == (4,) and probs.dtype == np.float32 and probs.sum() == pytest.approx(1.0, abs=1e-5)
    assert cam.shape == (32, 32) and cam.dtype == np.float32
    assert cam.min() >= 0 and cam.max() == pytest.approx(1.0)
    r, c = np.unravel_index(int(cam.argmax()), cam.shape)
    assert 2 <= r < 14 and 18 <= c < 30
    assert cam[20:, :12].max() == 0.0
    # CAM of a class with no weight on any channel is all zero (stays zero after normalisation)
    cam0, _, _ = cam_for(model, x, class_idx=0)
    assert not cam0.any()


def test_cam_equals_gradcam_on_last_feature_map() -> None:
    torch.manual_seed(3)
    model = build_inference(TINY, 7).eval()
    with torch.no_grad():  # non-trivial classifier so CAMs are not tiny
        model.branch.classifier.weight.normal_()
    x = torch.randn(1, 3, 32, 32)
    fm = model.feature_map(x).detach().requires_grad_(True)
    logits = model.logits_from_feature_map(fm)
    for c in range(7):
        (grad,) = torch.autograd.grad(logits[0, c], fm, retain_graph=True)
        weights = grad.mean(dim=(2, 3))  # Grad-CAM channel weights
        gradcam = torch.relu((weights[:, :, None, None] * fm).sum(1))[0].detach()
        cam = class_activation_map(fm[0].detach(), model.classifier_weight.detach(), c)
        h, w = cam.shape
        torch.testing.assert_close(gradcam, cam / (h * w), rtol=1e-4, atol=1e-7)
        norm_grad, norm_cam = upsample_normalize(gradcam, (32, 32)), upsample_normalize(cam, (32, 32))
        torch.testing.assert_close(norm_grad, norm_cam, rtol=1e-4, atol=1e-5)
        assert cam.max() > 0


def test_cam_for_uses_eval_and_restores_mode() -> None:
    torch.manual_seed(0)
    model = build_inference(TINY.model_copy(update={"dropout": 0.9}), 7).train()
    x = torch.randn(1, 3, 32, 32)
    a = cam_for(model, x)
    b = cam_for(model, x)
    assert model.training
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[2], b[2])
    with pytest.raises(ValueError):
        cam_for(model, torch.randn(2, 3, 32, 32))


def test_upsample_normalize_range_and_types() -> None:
    cam = np.array([[0.0, 2.0], [1.0, 4.0]], dtype=np.float64)
    up = upsample_normalize(cam, (8, 6))
    assert isinstance(up, np.ndarray) and up.shape == (8, 6) and up.dtype == np.float32
    assert up.min() >= 0 and up.max() == pytest.approx(1.0)
    t = upsample_normalize(torch.tensor(cam), (2, 2))
    assert isinstance(t, torch.Tensor)
    torch.testing.assert_close(t, torch.tensor([[0.0, 0.5], [0.25, 1.0]]))
    zero = upsample_normalize(np.zeros((3, 3)), (9, 9))
    assert zero.shape == (9, 9) and not zero.any()
    batch = upsample_normalize(torch.rand(3, 4, 4) * 10, (16, 16))
    assert batch.shape == (3, 16, 16)
    torch.testing.assert_close(batch.amax(dim=(1, 2)), torch.ones(3))


def test_jet_colormap_ends() -> None:
    np.testing.assert_allclose(jet(np.array([0.0, 0.5, 1.0])), [[0, 0, 0.5], [0.5, 1, 0.5], [0.5, 0, 0]])


def test_overlay_shape_dtype_and_blend() -> None:
    img = np.full((16, 12, 3), 100, dtype=np.uint8)
    cam = np.zeros((16, 12), dtype=np.float32)
    cam[:8] = 1.0
    out = overlay(img, cam, alpha=0.5)
    assert out.shape == (16, 12, 3) and out.dtype == np.uint8
    assert out[0, 0, 0] > out[0, 0, 2]  # hot: red
    assert out[15, 0, 2] > out[15, 0, 0]  # cold: blue
    np.testing.assert_array_equal(overlay(img, cam, alpha=0.0), img)
    # a CAM at feature-map resolution is resized to the image
    assert overlay(img, np.ones((4, 3)), 0.5).shape == (16, 12, 3)
    with pytest.raises(ValueError):
        overlay(img[..., 0], cam)


def test_save_overlay_png(tmp_path: Path) -> None:
    from PIL import Image

    img = np.random.default_rng(0).integers(0, 256, (10, 14, 3), dtype=np.uint8)
    cam = np.random.default_rng(1).random((10, 14)).astype(np.float32)
    p = save_overlay_png(tmp_path / "sub" / "a.png", img, cam, 0.5)
    with Image.open(p) as im:
        assert im.size == (14, 10) and im.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(im), overlay(img, cam))
