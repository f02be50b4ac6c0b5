"""Training for robustness on tiny project-made data: colour constancy in augment and train,
the augmentation knobs, label smoothing, EMA and averaging of the weights, style mixing, mixup and CutMix."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from test_train import TINY_MODEL, make_work, record_swa_updates, stopped_after_one_epoch, tiny_cfg


def test_train_with_colour_constancy_records_it_and_corrects_val(tmp_path: Path) -> None:
    import pipeline.stages.train as train
    from pipeline.core.imaging import shades_of_gray_chw
    from pipeline.stages.select import run_select

    cfg = tiny_cfg(tmp_path / "w", **{"train.epochs": 1})
    layout = make_work(tmp_path / "w")
    meta_path = layout.augmented_dir / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["preprocess"] = {"color_constancy": "shades_of_gray", "sog_power": 6.0}
    meta_path.write_text(json.dumps(meta))
    data = train.load_train_data(cfg)
    raw = data.images.base.take(data.val_rows[:3])
    np.testing.assert_array_equal(data.images.take(data.val_rows[:3]), shades_of_gray_chw(raw, 6.0))
    np.testing.assert_array_equal(data.images.take(np.arange(3)), data.images.base.take(np.arange(3)))  # train rows
    train.run_train(cfg)
    run_select(cfg)
    export_meta = json.loads((layout.export_dir / "config.json").read_text())
    assert export_meta["preprocess"] == {"color_constancy": "shades_of_gray", "sog_power": 6.0}


# --------------------------------------------------------------------------------------------
# augmentation knobs, label smoothing, EMA
# --------------------------------------------------------------------------------------------


def test_new_augment_knobs_off_by_default_and_seeded_when_on() -> None:
    from pipeline.config import AugmentConfig
    from pipeline.core.augment import augment_image, build_transform, color_corrected

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    default = AugmentConfig(image_size=32)
    names = [type(t).__name__ for t in build_transform(default).transforms]
    assert names == ["ColorJitter", "RandomHorizontalFlip", "RandomVerticalFlip", "RandomAffine"]
    strong = AugmentConfig(image_size=32, crop_scale_min=0.5, gamma=0.3, blur=1.0, blur_sigma=1.5)
    names = [type(t).__name__ for t in build_transform(strong).transforms]
    assert names == ["ColorJitter", "RandomGamma", "RandomResizedCrop", "RandomHorizontalFlip",
                     "RandomVerticalFlip", "RandomAffine", "RandomApply"]
    t = build_transform(strong)
    a, b = augment_image(img, t, 7), augment_image(img, t, 7)
    assert np.array_equal(np.asarray(a), np.asarray(b)) and a.size == (32, 32)
    assert not np.array_equal(np.asarray(a), np.asarray(augment_image(img, build_transform(default), 7)))
    assert color_corrected(img, default) is img
    sog = color_corrected(img, AugmentConfig(color_constancy="shades_of_gray"))
    assert sog.mode == "RGB" and sog.size == img.size


def test_hairs_are_thin_dark_curves_seeded_per_copy_and_drawn_first() -> None:
    from pipeline.config import AugmentConfig
    from pipeline.core.augment import RandomHairs, augment_image, build_transform, hair_mask

    # one straight, horizontal hair across the middle of a 40 px image, 1.2 % of the side wide
    mask = hair_mask(40, 40, np.array([[0.0, 0.5, 0.0, 1.0, 0.5, 1.0]]))
    assert mask.shape == (40, 40) and mask.dtype == np.float32
    assert 0.0 <= mask.min() and mask.max() <= 1.0
    assert mask.sum(axis=1).argmax() in (19, 20)  # the row it runs along
    assert mask[:15].max() == 0 and mask[25:].max() == 0  # nothing far from it
    assert 0 < mask[19:21].max() < 1  # thinner than a pixel: partial coverage, as a resized photo
    assert 18 <= mask.sum() <= 22  # 0.48 px wide (drawn 2 px at 4x) over the 40 px it spans
    assert hair_mask(40, 40, np.zeros((0, 6))).max() == 0

    cfg = AugmentConfig(image_size=32, hair=1.0, hair_max=4)
    names = [type(t).__name__ for t in build_transform(cfg).transforms]
    assert names[:2] == ["RandomHairs", "ColorJitter"]  # in the scene before the camera's colour
    img = Image.fromarray(np.full((32, 32, 3), 230, np.uint8))
    only = RandomHairs(1.0, 4)
    a, b = augment_image(img, only, 5), augment_image(img, only, 5)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # seeded per copy
    arr = np.asarray(a).astype(int)
    assert (arr <= 230).all() and (arr < 200).any()  # darker where drawn, untouched elsewhere
    assert ((arr < 230).any(axis=2)).mean() < 0.5  # thin lines, not a veil
    drop = 230 - arr  # a blend towards a brownish black: red >= green >= blue, so red drops least
    assert (drop[..., 0] <= drop[..., 1] + 1).all() and (drop[..., 1] <= drop[..., 2] + 1).all()
    assert (drop[..., 2] > drop[..., 0] + 2).any()
    assert not np.array_equal(arr, np.asarray(augment_image(img, only, 6)))
    np.testing.assert_array_equal(np.asarray(augment_image(img, RandomHairs(0.0, 4), 5)), np.asarray(img))
    with pytest.raises(ValueError):
        RandomHairs(1.5, 4)
    with pytest.raises(ValueError):
        AugmentConfig(hair=0.5, hair_max=0)


def test_augment_stage_corrects_train_only_and_keeps_default_digest(tmp_path: Path, tiny_config) -> None:
    from pipeline.stages.augment import augmented_digest, run_augment
    from pipeline.stages.ingest import run_ingest
    from pipeline.stages.synthesize import run_synthesize
    from pipeline.stages.validate import run_validate

    cfg = tiny_config.with_overrides({"synthetic.images_per_class": 4, "validate.near_duplicate_distance": -1})
    run_synthesize(cfg)
    run_ingest(cfg)
    run_validate(cfg)
    run_augment(cfg)
    aug_dir = Path(cfg.paths.work_dir) / "data" / "augmented"
    plain = {p.relative_to(aug_dir): np.asarray(Image.open(p)) for p in aug_dir.rglob("*.png")}
    assert "preprocess" not in json.loads((aug_dir / "meta.json").read_text())
    manifest = pd.read_parquet(Path(cfg.paths.work_dir) / "data" / "validated.parquet")
    off = cfg.with_overrides({"augment.gamma": 0.0, "augment.blur_sigma": 1.0, "augment.hair": 0.0})
    assert augmented_digest(manifest, off) == augmented_digest(manifest, cfg)
    assert augmented_digest(manifest, cfg.with_overrides({"augment.hair": 0.5})) != augmented_digest(manifest, cfg)
    sog = cfg.with_overrides({"augment.color_constancy": "shades_of_gray"})
    assert augmented_digest(manifest, sog) != augmented_digest(manifest, cfg)
    run_augment(sog)
    assert json.loads((aug_dir / "meta.json").read_text())["preprocess"]["color_constancy"] == "shades_of_gray"
    for rel, arr in plain.items():
        now = np.asarray(Image.open(aug_dir / rel))
        if rel.parts[0] == "train":
            assert not np.array_equal(now, arr), rel
        else:
            np.testing.assert_array_equal(now, arr)  # val/test stay uncorrected (scoring corrects)


def test_label_smoothing() -> None:
    import torch.nn.functional as F

    from pipeline.core.losses import focal_loss

    torch.manual_seed(0)
    logits, y = torch.randn(6, 7), torch.randint(0, 7, (6,))
    assert torch.equal(focal_loss(logits, y, 2.0, label_smoothing=0.0), focal_loss(logits, y, 2.0))
    torch.testing.assert_close(focal_loss(logits, y, 0.0, label_smoothing=0.1),
                               F.cross_entropy(logits, y, label_smoothing=0.1))
    smoothed = focal_loss(logits, y, 2.0, label_smoothing=0.1)
    assert torch.isfinite(smoothed) and not torch.equal(smoothed, focal_loss(logits, y, 2.0))
    with pytest.raises(ValueError, match="label_smoothing"):
        focal_loss(logits, y, 2.0, label_smoothing=1.0)


def test_ema_weights_are_validated_and_exported(tmp_path: Path) -> None:
    import pipeline.stages.train as train
    from pipeline.core.training import build_ema

    lin = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.constant_(lin.weight, 1.0)
    ema = build_ema(lin, 0.9)
    ema.update_parameters(lin)  # first update copies
    torch.nn.init.constant_(lin.weight, 0.0)
    ema.update_parameters(lin)
    torch.testing.assert_close(ema.module.weight, torch.full((1, 2), 0.9))

    cfg = tiny_cfg(tmp_path / "w", **{"train.ema_decay": 0.5, "loss.label_smoothing": 0.1})
    make_work(tmp_path / "w")
    train.run_train(cfg)
    best = torch.load(tmp_path / "w" / "models" / "train" / "best.pt", map_location="cpu", weights_only=True)
    last = torch.load(tmp_path / "w" / "models" / "train" / "last.pt", map_location="cpu", weights_only=True)
    assert "ema" in last
    if best["epoch"] == last["epoch"]:  # the best state is the EMA's, not the raw weights
        ema_state = {k.removeprefix("module."): v for k, v in last["ema"].items() if k.startswith("module.")}
        for k, v in best["model"].items():
            torch.testing.assert_close(v, ema_state[k])


def test_resume_with_ema_matches_uninterrupted_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.stages.train import run_train

    extra = {"train.epochs": 3, "pairs.epochs": 2, "train.ema_decay": 0.9}
    full, killed, cfg = stopped_after_one_epoch(tmp_path, monkeypatch, extra)
    assert run_train(cfg)["resumed_after_epoch"] == 1
    for name in ("best.pt", "last.pt"):
        a = torch.load(full.train_dir / name, map_location="cpu", weights_only=True)
        b = torch.load(killed.train_dir / name, map_location="cpu", weights_only=True)
        for key in ("model", "ema"):
            if key in a:
                assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), (name, key)


# --------------------------------------------------------------------------------------------
# online views (train.online_*)
# --------------------------------------------------------------------------------------------


def test_random_affine_is_the_identity_at_the_centre_draw_and_turns_both_ways() -> None:
    from pipeline.core.training import random_affine

    img = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    centre = torch.full((2, 4), 0.5)  # angle 0, scale 1, no shift, whatever the strengths
    torch.testing.assert_close(random_affine(img, centre, 180.0, 0.3, 0.2), img, atol=1e-5, rtol=0)
    quarter = torch.tensor([[1.0, 0.5, 0.5, 0.5], [0.0, 0.5, 0.5, 0.5]])  # the two ends of the angle range
    turned = random_affine(img, quarter, 90.0, 0.0, 0.0)
    torch.testing.assert_close(turned[0], torch.rot90(img[0], 1, (1, 2)), atol=1e-5, rtol=0)
    torch.testing.assert_close(turned[1], torch.rot90(img[1], -1, (1, 2)), atol=1e-5, rtol=0)
    # a zoom in (scale draw 1 -> factor 1 + scale) magnifies the centre: a centred disk gets wider
    disk = torch.zeros(1, 1, 16, 16)
    disk[..., 6:10, 6:10] = 1.0
    zoomed = random_affine(disk, torch.tensor([[0.5, 1.0, 0.5, 0.5]]), 0.0, 0.5, 0.0)
    assert (zoomed > 0.5).sum() > (disk > 0.5).sum()


def test_random_color_factors_and_range() -> None:
    from pipeline.core.training import random_color

    img = torch.rand(3, 3, 6, 6, generator=torch.Generator().manual_seed(1)) * 0.5
    torch.testing.assert_close(random_color(img.clone(), torch.full((3, 3), 0.5), 0.4), img)  # factors 1
    # brightness only (contrast and saturation draws at 0.5): factor 1 + (2u - 1) * strength
    bright = random_color(img.clone(), torch.tensor([[1.0, 0.5, 0.5]] * 3), 0.4)
    torch.testing.assert_close(bright, (img * 1.4).clamp(0, 1))
    grey = random_color(img.clone(), torch.tensor([[0.5, 0.5, 0.0]] * 3), 1.0 - 1e-6)  # saturation ~0
    assert float((grey.max(1).values - grey.min(1).values).max()) < 1e-5
    wild = random_color(torch.rand(4, 3, 5, 5), torch.rand(4, 3), 0.9)
    assert float(wild.min()) >= 0.0 and float(wild.max()) <= 1.0


def test_online_views_off_draw_nothing_and_on_are_seeded_per_sample() -> None:
    from pipeline.core.training import CPU, OnlineAugment, random_flip
    from pipeline.core.imaging import to_model_input

    x = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    # flips only: the same draws and images as the flips alone (the training before the knobs)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    torch.testing.assert_close(OnlineAugment(0.5)(x.clone(), g1, CPU), to_model_input(random_flip(x.clone(), g2)))
    assert torch.equal(g1.get_state(), g2.get_state())
    g = torch.Generator().manual_seed(3)
    torch.testing.assert_close(OnlineAugment()(x.clone(), g, CPU), to_model_input(x))
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(3).get_state())
    # on: the same seed gives the same views, and a batch of one image repeated gets different views
    views = OnlineAugment(0.5, rotation=180.0, scale=0.2, translate=0.1, color=0.3)
    a = views(x.clone(), torch.Generator().manual_seed(4), CPU)
    b = views(x.clone(), torch.Generator().manual_seed(4), CPU)
    assert torch.equal(a, b) and not torch.allclose(a, to_model_input(x))
    same = views(x[:1].repeat(4, 1, 1, 1), torch.Generator().manual_seed(5), CPU)
    assert not torch.allclose(same[0], same[1]) and not torch.allclose(same[2], same[3])


ONLINE = {"train.online_rotation": 45.0, "train.online_scale": 0.1, "train.online_translate": 0.05,
          "train.online_color": 0.2}  # fmt: skip


def test_online_views_change_training_and_resume_bit_identically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.stages.train import run_train

    extra = {"train.epochs": 3, "pairs.epochs": 2, **ONLINE}
    full, killed, cfg = stopped_after_one_epoch(tmp_path, monkeypatch, extra)
    assert run_train(cfg)["resumed_after_epoch"] == 1
    a = torch.load(full.train_dir / "last.pt", map_location="cpu", weights_only=True)["model"]
    b = torch.load(killed.train_dir / "last.pt", map_location="cpu", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    pd.testing.assert_frame_equal(pd.read_csv(full.train_dir / "history.csv").drop(columns=["seconds"]),
                                  pd.read_csv(killed.train_dir / "history.csv").drop(columns=["seconds"]))
    plain = make_work(tmp_path / "plain")
    run_train(tiny_cfg(tmp_path / "plain", **{"train.epochs": 3, "pairs.epochs": 2}))
    c = torch.load(plain.train_dir / "last.pt", map_location="cpu", weights_only=True)["model"]
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_random_conv_blends_a_size_keeping_filter_with_the_image() -> None:
    import torch.nn.functional as F

    from pipeline.core.training import random_conv

    x = torch.rand(2, 3, 9, 9, generator=torch.Generator().manual_seed(0))
    eye = torch.eye(3).view(3, 3, 1, 1)
    torch.testing.assert_close(random_conv(x, eye, 0.3), x)  # the identity filter leaves the image
    swap = eye[[2, 1, 0]]  # 1x1: a colour map, here red <-> blue
    torch.testing.assert_close(random_conv(x, swap, 0.0), x[:, [2, 1, 0]])
    torch.testing.assert_close(random_conv(x, swap, 0.25), 0.25 * x + 0.75 * x[:, [2, 1, 0]])
    box = torch.zeros(3, 3, 3, 3)
    for c in range(3):
        box[c, c] = 1 / 9  # 3x3 mean per channel: a blur, reflection-padded, the size kept
    out = random_conv(x, box, 0.0)
    assert out.shape == x.shape
    torch.testing.assert_close(out, F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), 3, stride=1))
    flat = torch.full((1, 3, 5, 5), 0.4)
    torch.testing.assert_close(random_conv(flat, box, 0.0), flat)  # no dark frame at the border


def test_randconv_draws_a_fixed_count_applies_with_its_probability_and_keeps_other_views() -> None:
    from pipeline.core.imaging import MEAN, STD, normalize_unit, to_model_input
    from pipeline.core.training import CPU, OnlineAugment, random_conv

    x = torch.randint(0, 256, (4, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    plain = to_model_input(x)
    # probability 1: every call filtered, a new filter per call, the same for a seed
    on = OnlineAugment(randconv=1.0)
    g = torch.Generator().manual_seed(7)
    a, b = on(x.clone(), g, CPU), on(x.clone(), g, CPU)
    assert not torch.allclose(a, plain) and not torch.allclose(a, b)
    torch.testing.assert_close(on(x.clone(), torch.Generator().manual_seed(7), CPU), a)
    # one filter for the whole batch: images that were equal stay equal
    same = on(x[:1].repeat(3, 1, 1, 1), torch.Generator().manual_seed(8), CPU)
    torch.testing.assert_close(same[0], same[2])
    # a fixed number of draws whatever happens, so resume is bit-identical; probability 0 < p < 1 skips some calls
    applied, states = {}, {}
    for p in (0.0, 0.5, 1.0):
        g = torch.Generator().manual_seed(9)
        outs = [OnlineAugment(randconv=p, randconv_kernels=(1, 5))(x.clone(), g, CPU) for _ in range(40)]
        applied[p], states[p] = sum(not torch.allclose(o, plain) for o in outs), bytes(g.get_state().numpy())
    assert applied[0.0] == 0 and 10 <= applied[0.5] <= 30 and applied[1.0] == 40
    assert states[0.5] == states[1.0] != states[0.0]  # p = 0 draws nothing; 0.5 and 1.0 draw the same count
    # with the colour jitter: the filter is applied after it, to the same jittered images
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    both = OnlineAugment(color=0.3, randconv=1.0)(x.clone(), g1, CPU)
    jitter = OnlineAugment(color=0.3)(x.clone(), g2, CPU)
    assert not torch.allclose(both, jitter)
    unit = jitter * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    u = torch.rand(3, generator=g2).tolist()
    w = torch.randn((3, 3, 5, 5), generator=g2)
    k = (1, 3, 5)[int(u[1] * 3)]
    lo = (5 - k) // 2
    expected = random_conv(unit, w[:, :, lo : lo + k, lo : lo + k] / (3 * k * k) ** 0.5, u[2])
    torch.testing.assert_close(both, normalize_unit(expected), atol=1e-5, rtol=1e-5)


def test_randconv_is_left_out_of_the_resume_digest_while_off_and_checks_its_kernels(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from pipeline.config import ConfigError
    from pipeline.stages.train import train_digest

    data = SimpleNamespace(digest="d", image_size=32)

    def digest(**extra: object) -> str:
        return train_digest(tiny_cfg(tmp_path, **extra), data, 1)  # type: ignore[arg-type]

    assert digest() == digest(**{"train.online_randconv_kernels": [3]})  # off: the kernels mean nothing
    on = digest(**{"train.online_randconv": 0.5})
    assert len({digest(), on, digest(**{"train.online_randconv": 0.5, "train.online_randconv_kernels": [3]})}) == 3
    with pytest.raises(ConfigError, match="online_randconv_kernels"):
        tiny_cfg(tmp_path, **{"train.online_randconv_kernels": [1, 4]})


def test_random_affine_samples_where_affine_grid_says() -> None:
    import math

    import torch.nn.functional as F

    from pipeline.core.training import random_affine

    gen = torch.Generator().manual_seed(6)
    x, u = torch.rand(5, 3, 12, 10, generator=gen), torch.rand(5, 4, generator=gen)
    angle, zoom = (2 * u[:, 0] - 1) * math.radians(120.0), 1 + (2 * u[:, 1] - 1) * 0.2
    tx, ty = (2 * u[:, 2] - 1) * 2 * 0.1, (2 * u[:, 3] - 1) * 2 * 0.1
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    ref = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), padding_mode="reflection",
                        align_corners=False)  # fmt: skip
    torch.testing.assert_close(random_affine(x, u, 120.0, 0.2, 0.1), ref, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------
# style mixing (train.mixstyle_*)
# --------------------------------------------------------------------------------------------


def test_mix_styles_moves_statistics_and_keeps_content() -> None:
    from pipeline.core.model import mix_styles

    torch.manual_seed(0)
    scale, shift = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(4, 1, 1, 1), torch.arange(4.0).view(4, 1, 1, 1)
    x = torch.randn(4, 3, 8, 8) * scale + shift
    perm = torch.tensor([1, 2, 3, 0])
    same = mix_styles(x, torch.ones(4), perm)
    torch.testing.assert_close(same, x, atol=1e-4, rtol=1e-4)  # lam 1: own statistics
    moved = mix_styles(x, torch.zeros(4), perm)  # lam 0: the other image's statistics
    torch.testing.assert_close(moved.mean(dim=(2, 3)), x[perm].mean(dim=(2, 3)), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(moved.std(dim=(2, 3)), x[perm].std(dim=(2, 3)), atol=1e-3, rtol=1e-3)

    def standardised(t: torch.Tensor) -> torch.Tensor:
        return (t - t.mean(dim=(2, 3), keepdim=True)) / t.std(dim=(2, 3), keepdim=True)

    torch.testing.assert_close(standardised(moved), standardised(x), atol=1e-3, rtol=1e-3)  # content kept
    half = mix_styles(x, torch.full((4,), 0.5), perm)
    torch.testing.assert_close(half.mean(dim=(2, 3)), (x.mean(dim=(2, 3)) + x[perm].mean(dim=(2, 3))) / 2,
                               atol=1e-4, rtol=1e-4)  # fmt: skip
    assert mix_styles(x.bfloat16(), torch.zeros(4), perm).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="shape"):
        mix_styles(x, torch.zeros(3), perm)


def test_style_mixing_acts_in_training_only_and_never_in_the_export() -> None:
    from pipeline.config import ModelConfig
    from pipeline.core.model import FeatureExtractor, build_twin, inference_model

    cfg = ModelConfig()  # the default extractor has three rows: mixing after the first two
    assert FeatureExtractor(cfg).mix_after == frozenset({0, 2})
    torch.manual_seed(0)
    ext = FeatureExtractor(cfg).train()
    x = torch.rand(6, 3, 32, 32)
    state = torch.get_rng_state()
    off = ext(x)
    assert torch.equal(torch.get_rng_state(), state)  # off: no draw, training unchanged
    ext.set_style_mixing(1.0, 0.1)
    on = ext(x)
    assert not torch.equal(torch.get_rng_state(), state)
    assert not torch.allclose(on, off)
    torch.set_rng_state(state)
    assert torch.equal(ext(x), on)  # seeded by the torch RNG
    ext.eval()
    ext.set_style_mixing(0.0)
    plain_eval = ext(x)
    ext.set_style_mixing(1.0)
    assert torch.equal(ext(x), plain_eval)  # eval mode: never mixes
    with pytest.raises(ValueError, match="probability"):
        ext.set_style_mixing(1.5)
    with pytest.raises(ValueError, match="alpha"):
        ext.set_style_mixing(0.5, 0.0)

    twin = build_twin(cfg)
    twin.extractor.set_style_mixing(0.5)
    exported = inference_model(twin.train(), 1)
    assert exported.extractor.style_mix_p == 0.0 and twin.extractor.style_mix_p == 0.5
    assert not any("mix" in k for k in exported.state_dict())  # no parameters, no buffers


def test_style_mixing_is_left_out_of_the_resume_digest_while_off(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from pipeline.stages.train import train_digest

    data = SimpleNamespace(digest="d", image_size=32)

    def digest(**extra: object) -> str:
        return train_digest(tiny_cfg(tmp_path, **extra), data, 1)  # type: ignore[arg-type]

    assert digest() == digest(**{"train.mixstyle_alpha": 0.3})  # off: alpha means nothing
    assert digest(**{"train.mixstyle_p": 0.5}) != digest()
    assert digest(**{"train.mixstyle_p": 0.5}) != digest(**{"train.mixstyle_p": 0.5, "train.mixstyle_alpha": 0.3})


@pytest.mark.parametrize("knob", [("train.mixstyle_p", 0.5), ("train.mixup_alpha", 1.0), ("train.cutmix_alpha", 1.0),
                                  ("train.online_randconv", 0.5)])
def test_mixing_changes_training_and_resumes_bit_identically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, knob: tuple[str, float]
) -> None:
    """Style mixing, mixup, CutMix and random convolutions: each changes the training, a stopped run
    resumes to the same weights, and select exports an ordinary model (validation and the export
    never mix)."""
    from pipeline.stages.select import run_select
    from pipeline.stages.train import run_train

    extra = {"train.epochs": 3, "pairs.epochs": 2, knob[0]: knob[1]}
    full, killed, cfg = stopped_after_one_epoch(tmp_path, monkeypatch, extra)
    assert run_train(cfg)["resumed_after_epoch"] == 1
    a = torch.load(full.train_dir / "last.pt", map_location="cpu", weights_only=True)["model"]
    b = torch.load(killed.train_dir / "last.pt", map_location="cpu", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    plain = make_work(tmp_path / "plain")
    run_train(tiny_cfg(tmp_path / "plain", **{"train.epochs": 3, "pairs.epochs": 2}))
    c = torch.load(plain.train_dir / "last.pt", map_location="cpu", weights_only=True)["model"]
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())
    history = json.loads((killed.train_dir / "history.json").read_text())
    assert all(np.isfinite(row["train_loss"]) and np.isfinite(row["val_loss_total"]) for row in history)
    run_select(cfg)
    assert (killed.export_dir / "config.json").exists()


# --------------------------------------------------------------------------------------------
# instance-batch normalisation (model.ibn)
# --------------------------------------------------------------------------------------------


def test_instance_batch_norm_normalises_half_per_image_and_half_per_batch() -> None:
    from pipeline.core.model import InstanceBatchNorm

    torch.manual_seed(0)
    layer = InstanceBatchNorm(5)
    assert layer.half == 2 and layer.instance.num_features == 2 and layer.batch.num_features == 3
    x = torch.randn(4, 5, 6, 6) * torch.arange(1.0, 5.0).view(4, 1, 1, 1) + 3.0  # each image its own scale
    out = layer.train()(x)
    inst = out[:, :2]
    torch.testing.assert_close(inst.mean(dim=(2, 3)), torch.zeros(4, 2), atol=1e-5, rtol=0)  # per image
    torch.testing.assert_close(inst.var(dim=(2, 3), unbiased=False), torch.ones(4, 2), atol=1e-3, rtol=0)
    per_image_std = out[:, 2:].std(dim=(1, 2, 3))
    assert per_image_std[3] > 2 * per_image_std[0]  # batch half: the images' scales survive
    torch.testing.assert_close(out[:, 2:], torch.nn.functional.batch_norm(x[:, 2:], None, None, training=True))
    layer.eval()
    alone, batched = layer(x[:1]), layer(x)
    torch.testing.assert_close(alone, batched[:1])  # eval: an image's output does not depend on its batch
    with pytest.raises(ValueError, match="channels"):
        InstanceBatchNorm(1)


def test_ibn_sits_in_the_shallow_layers_only_and_keeps_the_parameter_count() -> None:
    from pipeline.config import ModelConfig
    from pipeline.core.model import InstanceBatchNorm, build_inference, build_twin, count_parameters

    def ibn_layers(cfg: ModelConfig) -> list[str]:
        twin = build_twin(cfg)
        return [name for name, m in twin.named_modules() if isinstance(m, InstanceBatchNorm)]

    assert ibn_layers(ModelConfig()) == []
    assert ibn_layers(ModelConfig(ibn="stem")) == ["extractor.stem.1"]
    # default extractor rows [1,16,1,1] [4,24,2,2] [4,32,2,2]: stem, block 0 (expansion 1: its
    # depthwise conv), blocks 1-2 (their 1x1 expansion); never row 3, the branches or a projection
    assert ibn_layers(ModelConfig(ibn="extractor")) == [
        "extractor.stem.1", "extractor.stages.0.block.0.1", "extractor.stages.1.block.0.1",
        "extractor.stages.2.block.0.1",
    ]  # fmt: skip
    plain, ibn = build_inference(ModelConfig(), 7), build_inference(ModelConfig(ibn="extractor"), 7)
    assert count_parameters(ibn) == count_parameters(plain)
    with pytest.raises(ValueError, match="ibn"):
        ModelConfig(ibn="all")  # type: ignore[arg-type]


def test_ibn_export_is_batch_independent_traceable_and_loads_from_its_config() -> None:
    import warnings

    from pipeline.config import ModelConfig
    from pipeline.core.model import build_inference, build_twin, inference_model

    cfg = ModelConfig(ibn="extractor")
    torch.manual_seed(0)
    twin = build_twin(cfg).train()
    twin(torch.rand(8, 3, 32, 32), torch.rand(8, 3, 32, 32))  # moves the batch halves' running statistics
    model = inference_model(twin, 1).eval()
    x = torch.rand(5, 3, 32, 32) * torch.linspace(0.3, 1.0, 5).view(5, 1, 1, 1)
    torch.testing.assert_close(model(x[2:3]), model(x)[2:3])
    fresh = build_inference(ModelConfig.model_validate(cfg.model_dump()), 7)  # as load_exported does
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh.eval()(x), model(x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model, x[:2])
    torch.testing.assert_close(traced(x), model(x))
    old = {k: v for k, v in ModelConfig().model_dump().items() if k != "ibn"}  # an export from before the knob
    assert ModelConfig.model_validate(old).ibn == "none"


def test_ibn_is_recorded_only_when_on_so_earlier_releases_read_default_exports() -> None:
    from pydantic import ConfigDict, ValidationError, create_model

    from pipeline.config import ModelConfig

    fields: dict[str, Any] = {n: (f.annotation, f) for n, f in ModelConfig.model_fields.items() if n != "ibn"}
    earlier = create_model("EarlierModelConfig", __config__=ConfigDict(extra="forbid"), **fields)
    assert "ibn" not in ModelConfig().recorded()
    earlier.model_validate(ModelConfig().recorded())  # what a release before the knob reads
    assert ModelConfig.model_validate(ModelConfig().recorded()) == ModelConfig()
    on = ModelConfig(ibn="stem").recorded()
    assert on["ibn"] == "stem" and ModelConfig.model_validate(on).ibn == "stem"
    with pytest.raises(ValidationError, match="ibn"):
        earlier.model_validate(on)  # a model using the knob is refused by name there, never misread


def test_ibn_trains_resumes_bit_identically_and_exports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.core.model import InstanceBatchNorm
    from pipeline.io.modelstore import load_exported
    from pipeline.stages.select import run_select
    from pipeline.stages.train import run_train, train_digest

    extra = {"train.epochs": 3, "pairs.epochs": 2, "model.ibn": "stem"}
    full, killed, cfg = stopped_after_one_epoch(tmp_path, monkeypatch, extra)
    assert run_train(cfg)["resumed_after_epoch"] == 1
    a = torch.load(full.train_dir / "last.pt", map_location="cpu", weights_only=True)["model"]
    b = torch.load(killed.train_dir / "last.pt", map_location="cpu", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(".instance." in k for k in a)
    from types import SimpleNamespace

    data = SimpleNamespace(digest="d", image_size=32)
    assert train_digest(cfg, data, 1) != train_digest(tiny_cfg(tmp_path / "k"), data, 1)  # type: ignore[arg-type]
    run_select(cfg)
    exported = load_exported(killed.export_dir)
    assert any(isinstance(m, InstanceBatchNorm) for m in exported.model.modules())
    assert json.loads((killed.export_dir / "config.json").read_text())["model"]["ibn"] == "stem"


# --------------------------------------------------------------------------------------------
# weight averaging (train.swa_start)
# --------------------------------------------------------------------------------------------


def test_swa_is_the_uniform_mean_of_weights_and_batch_norm_buffers() -> None:
    from pipeline.core.training import build_swa, swa_active

    net = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False), torch.nn.BatchNorm1d(2))
    swa = build_swa(net)
    for value in (1.0, 2.0, 6.0):
        torch.nn.init.constant_(net[0].weight, value)
        net[1].running_mean.fill_(-value)
        swa.update_parameters(net)
    torch.testing.assert_close(swa.module[0].weight, torch.full((2, 2), 3.0))
    torch.testing.assert_close(swa.module[1].running_mean, torch.full((2,), -3.0))
    assert int(swa.n_averaged) == 3
    assert [swa_active(e, 3) for e in (1, 2, 3, 4)] == [False, False, True, True]
    assert not swa_active(5, None)


def test_swa_updates_batch_norm_counters_where_torch_fuses_the_update(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA torch's default SWA update is a fused (foreach) one whose integer branch fails on
    ``num_batches_tracked`` (seen on an H200, torch 2.11). Telling torch that CPU has foreach
    kernels puts this CPU test on that path: the averaged twin must still update, with the same
    values as the per-tensor path."""
    import torch.optim.swa_utils as swa_utils

    from pipeline.core.training import build_swa

    def snapshots(net: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        swa, out = build_swa(net), []
        for _ in range(3):
            net.train()
            net(torch.randn(8, 3, 4, 4))  # moves running stats and num_batches_tracked
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(1.0)
            swa.update_parameters(net)
            out.append({k: v.clone() for k, v in swa.module.state_dict().items()})
        return out

    torch.manual_seed(1)
    base = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1), torch.nn.BatchNorm2d(2))
    per_tensor = snapshots(copy.deepcopy(base))
    monkeypatch.setattr(swa_utils, "_get_foreach_kernels_supported_devices", lambda: ["cpu", "cuda"])
    fused_path = snapshots(copy.deepcopy(base))
    for a, b in zip(per_tensor, fused_path, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    # the counters 1, 2, 3 keep the truncated running mean, as on CPU: 1, 1 + 1/2 -> 1, 1 + 2/3 -> 1
    assert [int(s["1.num_batches_tracked"]) for s in fused_path] == [1, 1, 1]


def test_swa_start_is_checked_against_epochs_and_ema(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="swa_start: must be <= epochs"):
        tiny_cfg(tmp_path, **{"train.epochs": 2, "train.swa_start": 3})
    with pytest.raises(Exception, match="swa_start: weight averaging and ema_decay are exclusive"):
        tiny_cfg(tmp_path, **{"train.swa_start": 1, "train.ema_decay": 0.9})
    with pytest.raises(Exception, match="swa_start"):
        tiny_cfg(tmp_path, **{"train.swa_start": 0})


def test_swa_digest_is_unchanged_while_off(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from pipeline.stages.train import train_digest

    data = SimpleNamespace(digest="d", image_size=32)

    def digest(**extra: object) -> str:
        return train_digest(tiny_cfg(tmp_path, **extra), data, 1)  # type: ignore[arg-type]

    assert digest(**{"train.swa_start": 1}) != digest() != digest(**{"train.swa_start": 2})
    base = tiny_cfg(tmp_path).train.model_dump(mode="json")
    assert base["swa_start"] is None  # off by default, and the default digest does not name it


def test_knobs_added_later_leave_the_resume_digest_of_older_checkpoints_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint written before a knob existed must stay resumable while the knob is off: the
    digest with the knob off equals the digest of the same config without the key at all (what the
    code before it hashed)."""
    from types import SimpleNamespace

    from pipeline.config import LossConfig, TrainConfig
    from pipeline.stages.train import train_digest

    data = SimpleNamespace(digest="d", image_size=32)
    cfg = tiny_cfg(tmp_path)
    today = train_digest(cfg, data, 1)  # type: ignore[arg-type]
    later = {
        TrainConfig: ("ema_decay", "swa_start", "swa_every", "swa_bn", "mixstyle_p", "mixstyle_alpha",
                      "mixup_alpha", "cutmix_alpha", "mix_prob", "online_randconv", "online_randconv_kernels",
                      "site_adversarial", "site_adversarial_mode", "site_adversarial_hidden", "pretrain_epochs",
                      "pretrain_batch_size", "pretrain_lr", "pretrain_temperature", "pretrain_projection",
                      "pretrain_scale", "pretrain_translate", "pretrain_color"),
        LossConfig: ("label_smoothing", "logit_adjust"),
    }
    for cls, keys in later.items():
        dump = cls.model_dump

        def older(self: object, _dump=dump, _keys=keys, **kw: object) -> dict:
            return {k: v for k, v in _dump(self, **kw).items() if k not in _keys}

        monkeypatch.setattr(cls, "model_dump", older)
    assert train_digest(cfg, data, 1) == today  # type: ignore[arg-type]


def test_swa_averages_epoch_states_keeps_the_lowest_loss_one_and_resumes_bit_identically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from pipeline.stages.select import run_select
    from pipeline.stages.train import run_train

    extra = {"train.epochs": 3, "pairs.epochs": 2, "train.swa_start": 2}
    full, killed, cfg = stopped_after_one_epoch(tmp_path, monkeypatch, extra)
    shutil.copy(killed.train_dir / "last.pt", tmp_path / "epoch1.pt")
    # epoch-by-epoch raw states of the uninterrupted run's twin: stop a third copy after epoch 2
    two = make_work(tmp_path / "two")
    from pipeline.stages.train import STOP_ENV, TrainingStopped

    monkeypatch.setenv(STOP_ENV, "2")
    with pytest.raises(TrainingStopped):
        run_train(tiny_cfg(tmp_path / "two", **extra))
    monkeypatch.delenv(STOP_ENV)
    e1 = torch.load(tmp_path / "epoch1.pt", map_location="cpu", weights_only=True)
    e2 = torch.load(two.train_dir / "last.pt", map_location="cpu", weights_only=True)
    assert "swa" in e1 and int(e1["swa"]["n_averaged"]) == 0  # epoch 1 < swa_start: nothing averaged yet
    torch.testing.assert_close({k.removeprefix("module."): v for k, v in e2["swa"].items() if k.startswith("module.")},
                               e2["model"])  # epoch 2: the first snapshot is the average
    assert run_train(cfg)["resumed_after_epoch"] == 1
    e3 = torch.load(full.train_dir / "last.pt", map_location="cpu", weights_only=True)
    avg = {k.removeprefix("module."): v for k, v in e3["swa"].items() if k.startswith("module.")}
    assert int(e3["swa"]["n_averaged"]) == 2
    for k, v in e3["model"].items():  # the mean of the raw states after epochs 2 and 3
        if v.is_floating_point():
            torch.testing.assert_close(avg[k], (e2["model"][k] + v) / 2)
    resumed = torch.load(killed.train_dir / "last.pt", map_location="cpu", weights_only=True)
    for key in ("model", "swa"):
        assert all(torch.equal(e3[key][k], resumed[key][k]) for k in e3[key]), key
    best = torch.load(full.train_dir / "best.pt", map_location="cpu", weights_only=True)
    history = pd.read_csv(full.train_dir / "history.csv")
    assert best["epoch"] == int(history.loc[history["val_loss_total"].idxmin(), "epoch"])
    expected = {1: e1["model"], 2: e2["model"], 3: avg}[best["epoch"]]  # raw before swa_start, averaged after
    for k, v in best["model"].items():
        torch.testing.assert_close(v, expected[k])
    shutil.rmtree(full.export_dir, ignore_errors=True)
    assert run_select(tiny_cfg(tmp_path / "full", **extra))["best_epoch"] == best["epoch"]


def test_dense_swa_averages_every_step_from_swa_start_and_resumes_bit_identically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``train.swa_every: step``: every optimizer step of epochs ``swa_start``.. joins the mean (and
    none before), the kept average is the mean of exactly those states, and a run stopped after
    epoch 1 resumes to the same average."""
    import pipeline.stages.train as train_stage
    from pipeline.stages.train import run_train

    snapshots = record_swa_updates(monkeypatch, train_stage)
    extra = {"train.epochs": 3, "pairs.epochs": 2, "train.swa_start": 2, "train.swa_every": "step"}
    full, killed, cfg = stopped_after_one_epoch(tmp_path, monkeypatch, extra)
    in_full = list(snapshots)
    e3 = torch.load(full.train_dir / "last.pt", map_location="cpu", weights_only=True)
    data = train_stage.load_train_data(cfg)
    steps = [len(train_stage.epoch_batches(data, e, cfg.train.batch_size, cfg.seed, 0, 1)[1]) for e in range(3)]
    assert int(e3["swa"]["n_averaged"]) == len(in_full) == steps[1] + steps[2] > 2  # every step of epochs 2-3
    avg = {k.removeprefix("module."): v for k, v in e3["swa"].items() if k.startswith("module.")}
    for k, v in e3["model"].items():
        assert torch.equal(in_full[-1][k], v)  # the last update is the state after the last step
        if v.is_floating_point():
            torch.testing.assert_close(avg[k], torch.stack([s[k] for s in in_full]).mean(0))
    assert len(snapshots) == len(in_full)  # the run stopped after epoch 1 averaged nothing yet
    assert run_train(cfg)["resumed_after_epoch"] == 1
    resumed = torch.load(killed.train_dir / "last.pt", map_location="cpu", weights_only=True)
    for key in ("model", "swa"):
        assert all(torch.equal(e3[key][k], resumed[key][k]) for k in e3[key]), key
    with pytest.raises(Exception, match="swa_every: 'step' needs swa_start"):
        tiny_cfg(tmp_path, **{"train.swa_every": "step"})


def test_recomputed_batch_norm_is_the_mean_over_the_images_and_leaves_the_model_as_it_was() -> None:
    from pipeline.config import ModelConfig
    from pipeline.core.model import TwinNet
    from pipeline.core.training import CPU, recompute_batch_norm

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 3, 8, 8), dtype=np.uint8)
    images[:, 0] //= 4  # channel means far apart
    net = torch.nn.Sequential(torch.nn.BatchNorm2d(3, momentum=0.3))
    net.eval()
    rows = np.array([1, 3, 5, 7, 9, 11])
    recompute_batch_norm(net, images, rows, 3, CPU)
    x = CPU.to_input(torch.from_numpy(images[rows]))
    torch.testing.assert_close(net[0].running_mean, x.mean((0, 2, 3)))  # equal batches: the exact mean
    assert int(net[0].num_batches_tracked) == 2 and net[0].momentum == 0.3 and not net.training

    cfg = ModelConfig(**{k.removeprefix("model."): v for k, v in TINY_MODEL.items()})
    torch.manual_seed(0)
    twin = TwinNet(cfg)
    twin.extractor.set_style_mixing(0.5)
    before = copy.deepcopy(twin.state_dict())
    big = rng.integers(0, 256, (6, 3, 32, 32), dtype=np.uint8)
    recompute_batch_norm(twin, big, np.arange(6), 6, CPU)
    after = twin.state_dict()
    changed = [k for k in after if "running_mean" in k and not torch.equal(after[k], before[k])]
    assert any(k.startswith("branches.0") for k in changed) and any(k.startswith("branches.1") for k in changed)
    assert all(torch.equal(after[k], before[k]) for k in after if "running" not in k and "num_batches" not in k)
    assert twin.training and twin.extractor.style_mix_p == 0.5  # restored
    # a style-mixed pass would draw from the generator: the recompute is deterministic
    again = copy.deepcopy(twin)
    recompute_batch_norm(again, big, np.arange(6), 6, CPU)
    assert all(torch.equal(again.state_dict()[k], after[k]) for k in after)


def test_swa_with_recomputed_batch_norm_keeps_the_recomputed_statistics_and_resumes_bit_identically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``train.swa_bn: recompute``: the kept average's batch-norm statistics are those of its own
    weights over the train images (recomputed here from ``last.pt``), not the mean of the states'."""
    from pipeline.core.model import build_twin
    from pipeline.core.training import recompute_batch_norm
    from pipeline.io.compute import resolve_device
    from pipeline.stages.train import load_train_data, run_train

    extra = {"train.epochs": 3, "pairs.epochs": 2, "train.swa_start": 2, "train.swa_bn": "recompute"}
    full, killed, cfg = stopped_after_one_epoch(tmp_path, monkeypatch, extra)
    e3 = torch.load(full.train_dir / "last.pt", map_location="cpu", weights_only=True)
    kept = {k.removeprefix("module."): v for k, v in e3["swa"].items() if k.startswith("module.")}
    twin = build_twin(cfg.model)
    twin.load_state_dict(kept)
    data = load_train_data(cfg)
    rows = np.setdiff1d(np.arange(len(data.labels)), data.val_rows)
    plain = {k: v.clone() for k, v in twin.state_dict().items()}
    for k, v in plain.items():  # spoil the statistics: the recompute must not depend on them
        if "running_mean" in k:
            v.add_(5.0)
    twin.load_state_dict(plain)
    ds = resolve_device(cfg.train)  # as the stage: channels-last, which changes the sums' rounding
    if ds.channels_last:
        twin.to(memory_format=torch.channels_last)
    recompute_batch_norm(twin, data.images, rows, max(cfg.evaluate.batch_size, cfg.train.batch_size), ds)
    for k, v in twin.state_dict().items():
        torch.testing.assert_close(kept[k], v, rtol=1e-5, atol=1e-6)
    assert run_train(cfg)["resumed_after_epoch"] == 1
    resumed = torch.load(killed.train_dir / "last.pt", map_location="cpu", weights_only=True)
    for key in ("model", "swa"):
        assert all(torch.equal(e3[key][k], resumed[key][k]) for k in e3[key]), key
    with pytest.raises(Exception, match="swa_bn: 'recompute' needs swa_start"):
        tiny_cfg(tmp_path, **{"train.swa_bn": "recompute"})


# --------------------------------------------------------------------------------------------
# mixup / CutMix (train.mixup_alpha, cutmix_alpha, mix_prob)
# --------------------------------------------------------------------------------------------


def test_mixup_blends_whole_images_and_cutmix_pastes_one_box_with_lam_the_area_kept() -> None:
    from pipeline.core.training import BatchMix, MixDraw

    x = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 8, 8).contiguous()
    perm = torch.tensor([1, 2, 3, 0])
    mixed = MixDraw(0.25, perm).apply(x)
    torch.testing.assert_close(mixed, 0.25 * x + 0.75 * x[perm])
    cut = MixDraw(1 - 12 / 64, perm, (2, 1, 3, 4)).apply(x)
    assert torch.equal(x, torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 8, 8))  # input untouched
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[2:5, 1:5] = True
    assert torch.equal(cut[:, :, inside], x[perm][:, :, inside]) and torch.equal(cut[:, :, ~inside], x[:, :, ~inside])

    gen = torch.Generator().manual_seed(3)
    for _ in range(50):
        d = BatchMix(cutmix_alpha=1.0).draw(4, (8, 6), gen)
        assert d is not None and d.box is not None and sorted(d.perm.tolist()) == [0, 1, 2, 3]
        top, left, h, w = d.box
        assert 0 <= top and top + h <= 8 and 0 <= left and left + w <= 6 and h * w > 0
        assert d.lam == pytest.approx(1 - h * w / 48)  # the targets follow the pixels
        d = BatchMix(mixup_alpha=0.4).draw(4, (8, 6), gen)
        assert d is not None and d.box is None and 0 <= d.lam <= 1
    kinds = {BatchMix(mixup_alpha=0.2, cutmix_alpha=1.0).draw(4, (8, 8), gen).box is None for _ in range(40)}
    assert kinds == {True, False}  # both on: each mixed batch picks one
    unmixed = sum(BatchMix(mixup_alpha=0.2, prob=0.5).draw(4, (8, 8), gen) is None for _ in range(400))
    assert 150 < unmixed < 250
    state = gen.get_state()
    assert BatchMix().draw(4, (8, 8), gen) is None and torch.equal(gen.get_state(), state)  # off: nothing drawn
    a, b = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    da, db = BatchMix(mixup_alpha=0.2).draw(6, (8, 8), a), BatchMix(mixup_alpha=0.2).draw(6, (8, 8), b)
    assert da.lam == db.lam and torch.equal(da.perm, db.perm)  # seeded by the training generator


def test_mixed_joint_loss_is_the_loss_against_soft_targets() -> None:
    import torch.nn.functional as F

    from pipeline.config import LossConfig
    from pipeline.core.losses import joint_loss, mixed_joint_loss
    from pipeline.core.model import TwinOutput

    torch.manual_seed(0)
    n = 6
    out = TwinOutput(logits1=torch.randn(n, 7), logits2=torch.randn(n, 7), same_logits=torch.randn(n, 2),
                     pooled1=torch.zeros(n, 4), pooled2=torch.zeros(n, 4))  # fmt: skip
    y1, y2 = torch.tensor([0, 1, 2, 3, 4, 5]), torch.tensor([0, 2, 2, 6, 4, 1])
    perm = torch.tensor([3, 0, 5, 1, 2, 4])
    lam = 0.3
    cfg = LossConfig(gamma=0.0, C=0.7)
    mixed = mixed_joint_loss(out, y1, y2, cfg, lam, perm)
    soft1 = lam * F.one_hot(y1, 7) + (1 - lam) * F.one_hot(y1[perm], 7)
    soft2 = lam * F.one_hot(y2, 7) + (1 - lam) * F.one_hot(y2[perm], 7)
    same = (y1 == y2).float()
    soft_same = lam * same + (1 - lam) * same[perm]
    f1 = F.cross_entropy(out.logits1, soft1.float())
    f2 = F.cross_entropy(out.logits2, soft2.float())
    disc = F.cross_entropy(out.same_logits, torch.stack([1 - soft_same, soft_same], 1))
    torch.testing.assert_close(mixed.focal1, f1)
    torch.testing.assert_close(mixed.focal2, f2)
    torch.testing.assert_close(mixed.disc, disc)
    torch.testing.assert_close(mixed.total, f1 + f2 + 0.7 * disc)
    focal = LossConfig(gamma=2.0)  # the focal terms: soft targets q, -sum_i q_i (1 - p_i)^gamma log p_i
    logp = F.log_softmax(out.logits1, 1)
    ref = -(soft1 * (1 - logp.exp()) ** 2 * logp).sum(1).mean()
    torch.testing.assert_close(mixed_joint_loss(out, y1, y2, focal, lam, perm).focal1, ref)
    plain = joint_loss(out, y1, y2, focal)
    assert all(torch.equal(getattr(mixed_joint_loss(out, y1, y2, focal, 1.0, perm), k), getattr(plain, k))
               for k in ("total", "focal1", "focal2", "disc"))  # fmt: skip


def test_mixing_is_left_out_of_the_resume_digest_while_off(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from pipeline.stages.train import train_digest

    data = SimpleNamespace(digest="d", image_size=32)

    def digest(**extra: object) -> str:
        return train_digest(tiny_cfg(tmp_path, **extra), data, 1)  # type: ignore[arg-type]

    assert digest() == digest(**{"train.mix_prob": 0.5})  # off: the probability means nothing
    on = digest(**{"train.mixup_alpha": 0.2})
    assert len({digest(), on, digest(**{"train.cutmix_alpha": 0.2}), digest(**{"train.mixup_alpha": 0.4}),
                digest(**{"train.mixup_alpha": 0.2, "train.mix_prob": 0.5})}) == 5  # fmt: skip


def test_training_mixes_both_images_of_every_pair_with_one_draw(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In the train stage the images are mixed, not only the loss: each mixed batch applies one draw
    to the left and to the right images, and the loss gets that draw's ``lam`` and partners."""
    import pipeline.core.training as training
    from pipeline.stages.train import run_train

    applied: list[tuple[int, tuple[int, ...]]] = []
    losses: list[tuple[float, torch.Tensor]] = []
    real_apply, real_loss = training.MixDraw.apply, training.mixed_joint_loss

    def apply(self, x):
        applied.append((id(self), tuple(x.shape)))
        return real_apply(self, x)

    def loss(out, y1, y2, cfg, lam, perm, alpha=None, shift=None):
        losses.append((lam, perm))
        return real_loss(out, y1, y2, cfg, lam, perm, alpha, shift)

    monkeypatch.setattr(training.MixDraw, "apply", apply)
    monkeypatch.setattr(training, "mixed_joint_loss", loss)
    make_work(tmp_path / "w")
    run_train(tiny_cfg(tmp_path / "w", **{"train.epochs": 1, "train.mixup_alpha": 0.4}))
    assert applied and len(applied) == 2 * len(losses)
    assert all(applied[i][0] == applied[i + 1][0] for i in range(0, len(applied), 2))  # one draw, both sides
    assert all(0 <= lam <= 1 and sorted(perm.tolist()) == list(range(len(perm))) for lam, perm in losses)
