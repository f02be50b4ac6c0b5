"""Class activation maps (patent step S4): ``M_c(i, j) = relu(sum_k w_k^c f_k(i, j))``.

``f_k`` is channel ``k`` of the branch's last feature map (the 1x1 head conv, before global average
pooling) and ``w_k^c`` the classifier weight of class ``c`` (Zhou et al., CVPR 2016). Because the
head is exactly GAP -> linear, CAM equals Grad-CAM of that layer up to the positive factor
``1 / (h * w)`` (tested).

Design choices:

* The classifier bias is left out (it is constant over the map and carries no location).
* :func:`upsample_normalize` resizes bilinearly and divides by the maximum, so the map lies in
  [0, 1], 0 keeps meaning "no evidence for the class" and an all-zero map stays all zero (a
  min-max stretch would turn a flat, evidence-free map into noise).
* The colormap is a numpy piecewise-linear "jet" (blue -> cyan -> yellow -> red), so inference
  and serving need no matplotlib.
* A map for a person is drawn on the original picture: the network sees the image squashed to a
  square (:func:`pipeline.core.imaging.resize_square`), so the map of the square input is resized
  straight to the original ``(height, width)`` (``cam_for(..., size=(H, W))``), undoing the squash;
  pixel centres map proportionally on both axes (bilinear, ``align_corners=False``).

Checks of where a map points (pure; masks are boolean ``(H, W)`` of the lesion):

* :func:`pointing_hit`: the pointing game (Zhang et al., ECCV 2016): is the map's maximum inside
  the mask? An all-zero map (no evidence) is a miss; ties go to the first maximum in row-major
  order, so a constant map "points" at the top-left corner.
* :func:`mass_inside`: share of the map's total mass on mask pixels.
* :func:`centre_border_mass`: share of mass in the central box and in the outer border frame (a
  map indifferent to position gives 0.25 and 0.4375), to see a centre or border bias without a mask.
* :func:`cam_map_size`: the (h, w) of the feature map CAM is computed on, for an input size.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.core.model import InferenceModel

ArrayT = TypeVar("ArrayT", Tensor, np.ndarray)


def class_activation_map(feature_map: Tensor, weight: Tensor, class_idx: int | Tensor) -> Tensor:
    """CAM of class ``class_idx``.

    ``feature_map``: (K, h, w) -> returns (h, w); or (N, K, h, w) -> returns (N, h, w), where
    ``class_idx`` is an int (same class for all) or an (N,) integer tensor (one class per map).
    ``weight``: classifier weight (C, K).
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be (C, K), got shape {tuple(weight.shape)}")
    single = feature_map.dim() == 3
    fm = feature_map[None] if single else feature_map
    if fm.dim() != 4 or fm.shape[1] != weight.shape[1]:
        raise ValueError(f"feature map {tuple(feature_map.shape)} does not fit weight {tuple(weight.shape)}")
    idx = torch.as_tensor(class_idx, dtype=torch.long, device=weight.device)
    if idx.dim() == 0:
        idx = idx.expand(fm.shape[0])
    if idx.shape != (fm.shape[0],):
        raise ValueError(f"class_idx must be an int or have shape ({fm.shape[0]},), got {tuple(idx.shape)}")
    if bool((idx < 0).any()) or bool((idx >= weight.shape[0]).any()):
        raise ValueError(f"class_idx out of range 0..{weight.shape[0] - 1}")
    w = weight[idx].to(fm.dtype)  # (N, K)
    cam = torch.relu(torch.einsum("nk,nkhw->nhw", w, fm))
    return cam[0] if single else cam


def upsample_normalize(cam: ArrayT, size: tuple[int, int]) -> ArrayT:
    """Bilinear resize of a CAM (h, w) or (N, h, w) to ``size`` = (H, W), then scale into [0, 1].

    Each map is divided by its maximum (after clamping negatives to 0); an all-zero map stays zero.
    Returns the input's type (float32 ndarray for ndarray input).
    """
    is_np = isinstance(cam, np.ndarray)
    t = torch.as_tensor(np.asarray(cam, dtype=np.float32)) if is_np else cam.detach().float()
    single = t.dim() == 2
    if t.dim() not in (2, 3):
        raise ValueError(f"cam must be (h, w) or (N, h, w), got shape {tuple(t.shape)}")
    t = t[None, None] if single else t[:, None]
    t = F.interpolate(t, size=(int(size[0]), int(size[1])), mode="bilinear", align_corners=False)[:, 0]
    t = t.clamp_min(0)
    peak = t.amax(dim=(1, 2), keepdim=True)
    t = torch.where(peak > 0, t / peak.clamp_min(torch.finfo(t.dtype).tiny), torch.zeros_like(t)).clamp(0, 1)
    t = t[0] if single else t
    return t.cpu().numpy().astype(np.float32) if is_np else t


def jet(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) -> RGB floats in [0, 1] (shape + (3,)), a jet-like colormap."""
    v = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)[..., None]
    centres = np.array([0.75, 0.5, 0.25], dtype=np.float32)  # r, g, b
    return np.clip(1.5 - np.abs(4.0 * (v - centres)), 0.0, 1.0)


def overlay(image: np.ndarray, cam: np.ndarray | Tensor, alpha: float = 0.5) -> np.ndarray:
    """Blend a CAM (H, W) in [0, 1] as a jet heat map over ``image`` (H, W, 3) uint8 -> uint8 (H, W, 3).

    A CAM of a different size is resized (bilinear, without renormalising).
    """
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3), got shape {img.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    c = cam.detach().cpu().float().numpy() if isinstance(cam, Tensor) else np.asarray(cam, dtype=np.float32)
    if c.ndim != 2:
        raise ValueError(f"cam must be (H, W), got shape {c.shape}")
    if c.shape != img.shape[:2]:
        t = torch.from_numpy(np.ascontiguousarray(c))[None, None]
        c = F.interpolate(t, size=img.shape[:2], mode="bilinear", align_corners=False)[0, 0].numpy()
    heat = jet(c) * 255.0
    out = (1.0 - alpha) * img.astype(np.float32) + alpha * heat
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


@torch.no_grad()
def cam_for(
    model: InferenceModel, x: Tensor, class_idx: int | None = None, size: tuple[int, int] | None = None
) -> tuple[np.ndarray, int, np.ndarray]:
    """CAM of one normalised image ``x`` (1, 3, H, W).

    Returns ``(cam, predicted class, probs)``: ``cam`` float32 in [0, 1] for ``class_idx``
    (default: the predicted class), at ``size`` = (height, width) (default: the input's (H, W);
    pass the original picture's size to undo the square resize -- one bilinear resize from the
    feature map, no detour through the input size); ``probs`` float32 (C,) softmax.
    The model is run in eval mode and its previous mode is restored.
    """
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"x must be (1, 3, H, W), got shape {tuple(x.shape)}")
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        x = x.to(device=param.device, dtype=param.dtype)
        fm = model.feature_map(x)
        logits = model.logits_from_feature_map(fm)
        probs = torch.softmax(logits.float(), dim=1)[0]
        pred = int(probs.argmax())
        c = pred if class_idx is None else int(class_idx)
        cam = class_activation_map(fm[0].float(), model.classifier_weight.float(), c)
        out = (int(x.shape[2]), int(x.shape[3])) if size is None else (int(size[0]), int(size[1]))
        cam = upsample_normalize(cam, out)
    finally:
        model.train(was_training)
    return cam.cpu().numpy().astype(np.float32), pred, probs.cpu().numpy().astype(np.float32)


def _as_map(cam: np.ndarray | Tensor) -> np.ndarray:
    c = cam.detach().cpu().float().numpy() if isinstance(cam, Tensor) else np.asarray(cam, dtype=np.float32)
    if c.ndim != 2:
        raise ValueError(f"cam must be (H, W), got shape {c.shape}")
    return c


def _map_and_mask(cam: np.ndarray | Tensor, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c = _as_map(cam)
    m = np.asarray(mask)
    if m.shape != c.shape:
        raise ValueError(f"cam {c.shape} and mask {m.shape} differ in shape (resize the map to the mask first)")
    return c, m.astype(bool) if m.dtype == bool else m > (127 if m.dtype == np.uint8 else 0)


def pointing_hit(cam: np.ndarray | Tensor, mask: np.ndarray) -> bool:
    """The pointing game: is the map's maximum on a mask pixel?

    ``cam`` (H, W) non-negative; ``mask`` (H, W) bool, or 0/255 uint8 (> 127 = lesion), or 0/1.
    The maximum is the first one in row-major order (``argmax``), so a constant map points at the
    top-left pixel; an all-zero (or non-positive) map points nowhere and is a miss.
    """
    c, m = _map_and_mask(cam, mask)
    if not np.isfinite(c).all() or not (c > 0).any():
        return False
    r, col = np.unravel_index(int(np.argmax(c)), c.shape)
    return bool(m[r, col])


def pointing_game(cams: "list[np.ndarray] | np.ndarray", masks: "list[np.ndarray] | np.ndarray") -> float:
    """Share of (map, mask) pairs whose map maximum is inside the mask (:func:`pointing_hit`)."""
    if len(cams) != len(masks):
        raise ValueError(f"{len(cams)} maps but {len(masks)} masks")
    if len(cams) == 0:
        raise ValueError("no maps to score")
    return float(np.mean([pointing_hit(c, m) for c, m in zip(cams, masks, strict=True)]))


def mass_inside(cam: np.ndarray | Tensor, mask: np.ndarray) -> float:
    """Share of the map's mass on mask pixels: ``sum(cam * mask) / sum(cam)`` over the clamped
    (>= 0) map, in [0, 1]; 0.0 for an all-zero map. A map indifferent to position scores the mask's
    area share."""
    c, m = _map_and_mask(cam, mask)
    c = np.clip(c, 0, None).astype(np.float64)
    total = float(c.sum())
    return float(c[m].sum() / total) if total > 0 else 0.0


def centre_border_mass(cam: np.ndarray | Tensor, border: float = 0.125) -> tuple[float, float]:
    """``(centre, border)`` shares of the map's mass (clamped >= 0), each in [0, 1].

    * centre: the central box of half the width and half the height, rows ``[round(H/4),
      round(3H/4))`` and columns ``[round(W/4), round(3W/4))`` (a quarter of the area);
    * border: the outer frame, every pixel within ``round(border * H)`` rows of the top or bottom
      edge or ``round(border * W)`` columns of the left or right edge (default ``border`` 1/8: a
      frame of 1 - (3/4)^2 = 43.75 % of the area).

    A map indifferent to position gives (0.25, 0.4375); a map on a lesion in the middle of the
    picture gives a centre share near 1 and a border share near 0. An all-zero map gives (0, 0).
    """
    if not 0.0 < border < 0.5:
        raise ValueError(f"border must be in (0, 0.5), got {border}")
    c = np.clip(_as_map(cam), 0, None).astype(np.float64)
    h, w = c.shape
    total = float(c.sum())
    if total <= 0:
        return 0.0, 0.0
    centre = float(c[round(h / 4) : round(3 * h / 4), round(w / 4) : round(3 * w / 4)].sum())
    bh, bw = round(border * h), round(border * w)
    inner = float(c[bh : h - bh, bw : w - bw].sum()) if h - 2 * bh > 0 and w - 2 * bw > 0 else 0.0
    return centre / total, (total - inner) / total


@torch.no_grad()
def cam_map_size(model: InferenceModel, image_size: int | tuple[int, int]) -> tuple[int, int]:
    """``(h, w)`` of the feature map CAM is computed on for an input of ``image_size`` (an int
    for a square input, or (height, width)): a zero tensor forwarded through ``model.feature_map``
    in eval mode (the previous mode is restored). E.g. 64 px through a stride-32 network: (2, 2)."""
    hw = (int(image_size), int(image_size)) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        fm = model.feature_map(torch.zeros(1, 3, *hw, device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
    return int(fm.shape[-2]), int(fm.shape[-1])
