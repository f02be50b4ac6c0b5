"""Where a CAM points: the pure checks (pointing game, mass inside a mask, centre / border mass),
the CAM feature-map size, maps at the original picture's size, the side-by-side picture, and the
pointing game of a trained model on the synthetic set's lesion masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_cam import TINY

from pipeline.core.cam import (
    cam_for,
    cam_map_size,
    centre_border_mass,
    class_activation_map,
    mass_inside,
    overlay,
    pointing_game,
    pointing_hit,
    upsample_normalize,
)
from pipeline.core.model import build_inference
from pipeline.io.overlays import caption, explanation_panel



def _disc_mask(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


# ------------------------------------------------------------------------------------ pure metrics
def test_pointing_hit_inside_outside_and_degenerate_maps() -> None:
    mask = _disc_mask(40, 60, 20, 30, 8)
    cam = np.zeros((40, 60), np.float32)
    cam[21, 29] = 1.0
    assert pointing_hit(cam, mask)
    assert pointing_hit(cam, (mask * 255).astype(np.uint8))  # 0/255 masks as written by synthesize
    assert pointing_hit(torch.from_numpy(cam), mask)
    cam[2, 3] = 2.0
    assert not pointing_hit(cam, mask)
    assert not pointing_hit(np.zeros((40, 60)), mask)  # no evidence: a miss
    assert not pointing_hit(np.ones((40, 60)), mask)  # constant: points at the top-left pixel
    assert pointing_hit(np.ones((40, 60)), np.ones((40, 60), bool))
    with pytest.raises(ValueError, match="shape"):
        pointing_hit(np.ones((20, 30)), mask)
    assert pointing_game([cam, np.ones((40, 60))], [mask, np.ones((40, 60), bool)]) == 0.5


def test_mass_inside() -> None:
    mask = np.zeros((10, 10), bool)
    mask[:5] = True
    assert mass_inside(np.ones((10, 10)), mask) == pytest.approx(0.5)  # uniform: the mask's area share
    cam = np.zeros((10, 10))
    cam[2, 2], cam[8, 8] = 3.0, 1.0
    assert mass_inside(cam, mask) == pytest.approx(0.75)
    assert mass_inside(np.zeros((10, 10)), mask) == 0.0


@pytest.mark.parametrize("shape", [(64, 64), (450, 600), (37, 23)])
def test_centre_border_mass_definitions(shape: tuple[int, int]) -> None:
    h, w = shape
    centre, border = centre_border_mass(np.ones(shape))
    # exact area shares of the boxes as rounded to pixels
    cy0, cy1, cx0, cx1 = round(h / 4), round(3 * h / 4), round(w / 4), round(3 * w / 4)
    bh, bw = round(h / 8), round(w / 8)
    assert centre == pytest.approx((cy1 - cy0) * (cx1 - cx0) / (h * w))
    assert border == pytest.approx(1 - (h - 2 * bh) * (w - 2 * bw) / (h * w))
    if shape == (64, 64):
        assert (centre, border) == pytest.approx((0.25, 0.4375))
    only_centre = np.zeros(shape)
    only_centre[cy0:cy1, cx0:cx1] = 1
    assert centre_border_mass(only_centre) == pytest.approx((1.0, 0.0))
    frame = np.ones(shape)
    frame[bh : h - bh, bw : w - bw] = 0
    assert centre_border_mass(frame) == pytest.approx((0.0, 1.0))
    assert centre_border_mass(np.zeros(shape)) == (0.0, 0.0)


def test_a_two_by_two_map_cannot_show_a_centre() -> None:
    """Finding of issue 48: bilinear upsampling of a 2x2 CAM (a 64 px input through a stride-32
    network) gives a map whose centre and border shares are those of a flat map, whatever the
    four values, and whose maximum is always in a corner -- it cannot point at a central lesion."""
    rng = np.random.default_rng(0)
    mask = _disc_mask(128, 128, 64, 64, 30)
    for _ in range(5):
        up = upsample_normalize(rng.random((2, 2)).astype(np.float32) + 0.01, (128, 128))
        assert centre_border_mass(up) == pytest.approx((0.25, 0.4375), abs=1e-6)
        assert not pointing_hit(up, mask)


def test_cam_map_size_and_cam_at_the_original_size() -> None:
    torch.manual_seed(0)
    model = build_inference(TINY, 7).train()
    assert cam_map_size(model, 32) == (4, 4)  # stem 2 x extractor 2 x branch 2: stride 8
    assert cam_map_size(model, (48, 64)) == (6, 8)
    assert model.training  # mode restored
    x = torch.randn(1, 3, 32, 32)
    cam, pred, _ = cam_for(model, x, size=(45, 60))
    assert cam.shape == (45, 60) and cam.dtype == np.float32 and 0 <= cam.min() and cam.max() <= 1
    with torch.no_grad():
        model.eval()
        raw = class_activation_map(model.feature_map(x)[0], model.classifier_weight, pred)
    # straight from the feature map to the original size (no detour through the input size)
    np.testing.assert_allclose(cam, upsample_normalize(raw.numpy(), (45, 60)), atol=1e-6)


def test_explanation_panel_layout() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (45, 60, 3), dtype=np.uint8)
    cam = rng.random((45, 60)).astype(np.float32)
    text = caption("mel", 0.834, "mel")
    assert text == "predicted mel 0.83 | map: mel"
    panel = explanation_panel(img, cam, 0.5, text)
    band = panel.shape[0] - 45
    assert band > 8 and panel.dtype == np.uint8
    np.testing.assert_array_equal(panel[band:, :60], img)  # the plain picture, untouched
    gap = 2
    np.testing.assert_array_equal(panel[band:, 60 + gap : 120 + gap], overlay(img, cam, 0.5))
    assert (panel[:band] < 128).any()  # the caption is drawn
    big = explanation_panel(np.zeros((450, 600, 3), np.uint8), np.zeros((450, 600), np.float32), 0.5, text)
    assert big.shape[1] == 2 * 600 + 6 and big.shape[0] > 450


# ------------------------------------------------------------------------------------ trained model
# The pointing game of the quick-start model (params.yaml's model and augment.image_size) on the
# synthetic set's lesion masks. Measured with bench/cam_pointing.py on the full quick start (40
# images per class, seed 42, 2-core CPU), correctly classified test images:
#   64 px, stride 32 (the default: 2x2 map)           pointing 0.06, mass inside 0.18 (flat: 0.18)
#   64 px, last branch row stride 1 (stride 16, 4x4)  pointing 0.15, mass inside 0.20
#   128 px, stride 32 (4x4)                           pointing 0.44, mass inside 0.29
#   EfficientNet-Lite0 backbone, 112 px, stride 16 (7x7), 3 epochs, 24 images per class:
#                                                     pointing 0.39 (test), 0.40 (val + test, 45
#                                                     images); its maps cover the lesion but peak
#                                                     at the bottom / right edge; the mean of the
#                                                     maps of the 4 flips (flipped back) 0.60
# so the >= 90 % check is an expected failure until the model side gives a finer, better-placed map
# (strict: it reports when it starts to pass, so the marker comes off then).
POINTING_OVERRIDES: dict[str, object] = {
    "synthetic.images_per_class": 24,
    "augment.workers": 1,
    "validate.workers": 1,
    "train.progress": False,
}


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory: pytest.TempPathFactory):
    """The quick-start stages (params.yaml, a smaller synthetic set) up to the export, and the CAM
    checks of the val + test images against their lesion masks."""
    from pipeline.app.params import load_params
    from pipeline.stages.augment import run_augment
    from pipeline.stages.ingest import run_ingest
    from pipeline.stages.pairs import run_pairs
    from pipeline.stages.select import run_select
    from pipeline.stages.synthesize import run_synthesize
    from pipeline.stages.train import run_train
    from pipeline.stages.validate import run_validate

    work = tmp_path_factory.mktemp("pointing")
    cfg = load_params(Path(__file__).resolve().parents[1] / "params.yaml",
                      POINTING_OVERRIDES | {"paths.work_dir": str(work)})  # fmt: skip
    for run in (run_synthesize, run_ingest, run_validate, run_augment, run_pairs, run_train, run_select):
        run(cfg)
    return cfg, *_records(cfg)


def _records(cfg):
    import pandas as pd

    from pipeline.core.schema import AUGMENTED_COLUMNS
    from pipeline.io.explain import localisation_records, mask_paths
    from pipeline.io.images import load_mask
    from pipeline.io.manifests import read_parquet
    from pipeline.io.modelstore import load_exported
    from pipeline.io.scoring import load_images
    from pipeline.layout import Layout

    layout = Layout.from_config(cfg)
    exported = load_exported(layout.export_dir)
    aug = read_parquet(layout.augmented_manifest, "augment", AUGMENTED_COLUMNS)
    rows = aug[aug["split"].isin(["val", "test"])].reset_index(drop=True)
    images = load_images(rows, layout.augmented_dir, exported.image_size, cfg, name="pointing")
    rec = localisation_records(exported, images, rows, cfg)
    masks = [load_mask(p) for p in mask_paths(rows["source_id"].astype(str).tolist(), cfg) if p is not None]
    assert len(rec) == len(rows) == len(masks)  # every synthetic image has its mask
    return pd.DataFrame(rec), masks


@pytest.mark.slow
def test_pointing_game_fails_maps_that_ignore_the_image(synthetic_run) -> None:
    """The check can fail: on the masks of the correctly classified images, a constant map, a map
    hottest in a corner and an upsampled 2x2 map score far below 90 %."""
    _, rec, masks = synthetic_run
    ok_masks = [m for m, c in zip(masks, rec["correct"], strict=True) if c]
    assert len(ok_masks) >= 0.5 * len(rec), f"only {len(ok_masks)} of {len(rec)} correct: the model did not learn"
    constant = [np.ones(m.shape, np.float32) for m in ok_masks]
    corners = []
    for i, m in enumerate(ok_masks):
        c = np.full(m.shape, 0.2, np.float32)
        h, w = m.shape[0] // 8, m.shape[1] // 8
        rows, cols = [(slice(0, h), slice(0, w)), (slice(0, h), slice(-w, None)), (slice(-h, None), slice(0, w)),
                      (slice(-h, None), slice(-w, None))][i % 4]  # fmt: skip
        c[rows, cols] = 1.0
        corners.append(c)
    two_by_two = [upsample_normalize(np.array([[1.0, 0.5], [0.5, 0.2]], np.float32), m.shape) for m in ok_masks]
    for name, cams in (("constant", constant), ("corner", corners), ("2x2", two_by_two)):
        assert pointing_game(cams, ok_masks) < 0.3, name


@pytest.mark.slow
@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="issue 48: the quick-start CAM is 2x2 (64 px, stride 32) and points at a corner; see the "
                   "measurements above")  # fmt: skip
def test_cam_points_at_the_lesion_on_synthetic_images(synthetic_run) -> None:
    """The pointing game: for correctly classified synthetic val + test images, the CAM maximum
    lies inside the lesion mask in >= 90 % of them, with more map mass on the lesion than a flat map."""
    _, rec, _ = synthetic_run
    ok = rec[rec["correct"]]
    score = ok["hit"].mean()
    assert score >= 0.9, f"pointing game {score:.2f} on {len(ok)} correctly classified images"
    assert ok["mass_inside"].mean() > ok["mask_share"].mean()


def test_evaluate_cam_samples_drawn_on_the_original(tmp_path: Path) -> None:
    from PIL import Image

    from pipeline.io.modelstore import load_exported
    from pipeline.labels import CLASSES
    from pipeline.stages.evaluate import write_cam_samples

    folder = _tiny_export(tmp_path)
    exported = load_exported(folder)
    rng = np.random.default_rng(0)
    original = rng.integers(0, 256, (45, 60, 3), dtype=np.uint8)
    Image.fromarray(original).save(tmp_path / "orig.png")
    stored = rng.integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    probs = np.full((3, 7), 0.1)
    probs[[0, 1, 2], [0, 1, 3]] = 0.4
    out = tmp_path / "cam"
    out.mkdir()
    names = write_cam_samples(exported, stored, ["a", "b", "c"], np.array([0, 1, 2]), probs, 1, out, 0.5,
                              originals=[tmp_path / "orig.png", None, tmp_path / "missing.png"])  # fmt: skip
    assert sorted(names) == sorted([f"{CLASSES[0]}_correct_a.png", f"{CLASSES[1]}_correct_b.png",
                                    f"{CLASSES[2]}_wrong_c.png"])  # fmt: skip
    with Image.open(out / f"{CLASSES[0]}_correct_a.png") as im:  # the original, 60 x 45, beside its overlay
        panel = np.asarray(im)
    assert panel.shape[1] >= 120 and panel.shape[0] > 45
    np.testing.assert_array_equal(panel[panel.shape[0] - 45 :, :60], original)
    with Image.open(out / f"{CLASSES[2]}_wrong_c.png") as im:  # no original: the stored 32 x 32 image
        panel = np.asarray(im)
    np.testing.assert_array_equal(panel[panel.shape[0] - 32 :, :32], stored[2].transpose(1, 2, 0))
    assert (out / "grid.png").is_file()


def _tiny_export(tmp_path: Path) -> Path:
    from test_train import tiny_cfg

    from pipeline.core.model import build_twin, count_parameters, inference_model
    from pipeline.core.selection import build_meta
    from pipeline.io.modelstore import export_inference

    cfg = tiny_cfg(tmp_path)
    torch.manual_seed(0)
    inf = inference_model(build_twin(cfg.model, 7), 0).eval()
    best = {"model_config": cfg.model.model_dump(mode="json"), "num_classes": 7, "image_size": 32, "epoch": 1,
            "val_loss_branch1": 0.1, "val_loss_branch2": 0.2}  # fmt: skip
    folder = tmp_path / "export"
    folder.mkdir()
    export_inference(inf, build_meta(best, 1, count_parameters(inf)), folder)
    return folder
