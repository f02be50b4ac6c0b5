"""How the exported model decides, on tiny project-made data: the balanced-accuracy decision rule
fitted on val, test-time augmentation and colour constancy, applied alike by predict, the pyfunc,
scoring (evaluate, gate) and select."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from test_train import make_work, tiny_cfg

from pipeline.errors import DataError
from pipeline.labels import CLASSES

# --------------------------------------------------------------------------------------------
# decision rule (pure)
# --------------------------------------------------------------------------------------------


def _skewed(n_per_class: int = 30, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities that separate the classes but under-rate class 3 (a prior shift)."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(7), n_per_class)
    logits = rng.normal(0, 1, (y.size, 7))
    logits[np.arange(y.size), y] += 2.0
    logits[:, 3] -= 2.5  # the network rarely predicts class 3
    p = np.exp(logits)
    return y, p / p.sum(axis=1, keepdims=True)


def test_offsets_raise_balanced_accuracy_within_bounds_and_deterministically() -> None:
    from pipeline.core.decision import apply_offsets, balanced_accuracy, fit_offsets

    y, p = _skewed()
    off, info = fit_offsets(y, p, limit=2.0, step=0.1)
    assert off.shape == (7,) and np.all(np.abs(off) <= 2.0 + 1e-9)
    assert info["balanced_accuracy_offsets"] > info["balanced_accuracy_argmax"] + 0.05
    assert balanced_accuracy(y, apply_offsets(p, off), 7) == pytest.approx(info["balanced_accuracy_offsets"])
    assert off[3] == max(off)  # the under-predicted class is lifted the most
    again, _ = fit_offsets(y, p, limit=2.0, step=0.1)
    np.testing.assert_array_equal(off, again)
    # on held-out data from the same distribution it still helps
    y2, p2 = _skewed(seed=1)
    assert balanced_accuracy(y2, apply_offsets(p2, off), 7) > balanced_accuracy(y2, p2.argmax(axis=1), 7)


def test_offsets_never_hurt_stay_zero_when_nothing_to_gain_and_skip_absent_classes() -> None:
    from pipeline.core.decision import apply_offsets, fit_offsets

    y = np.arange(7).repeat(3)
    p = np.full((y.size, 7), 0.01)
    p[np.arange(y.size), y] = 0.94  # perfect already
    off, info = fit_offsets(y, p)
    np.testing.assert_array_equal(off, np.zeros(7))
    assert info["balanced_accuracy_offsets"] == info["balanced_accuracy_argmax"] == 1.0
    y_missing = y[y != 5]
    off2, _ = fit_offsets(y_missing, p[y != 5])
    assert off2[5] == 0.0  # a class absent from val is left alone
    np.testing.assert_array_equal(apply_offsets(p, None), p.argmax(axis=1))
    with pytest.raises(ValueError, match="offsets must be 7"):
        apply_offsets(p, [0.0] * 6)
    with pytest.raises(ValueError, match="limit"):
        fit_offsets(y, p, limit=-1)
    # limit 0 = arg-max
    off0, _ = fit_offsets(*_skewed(), limit=0.0)
    np.testing.assert_array_equal(off0, np.zeros(7))


def test_prior_power_divides_out_the_models_prior_with_one_fitted_exponent() -> None:
    from pipeline.core.decision import apply_offsets, balanced_accuracy, fit_prior_power

    y, p = _skewed()
    off, info = fit_prior_power(y, p, max_power=2.0, step=0.25)
    prior = p.mean(axis=0)
    assert info["power"] > 0 and info["power"] % 0.25 == 0 and info["power"] <= 2.0
    np.testing.assert_allclose(off, -info["power"] * np.log(prior), atol=1e-9)
    np.testing.assert_allclose(info["prior"], prior)
    assert off[3] == max(off)  # the class the network rarely predicts is lifted the most
    assert info["balanced_accuracy_offsets"] > info["balanced_accuracy_argmax"] + 0.05
    assert balanced_accuracy(y, apply_offsets(p, off), 7) == pytest.approx(info["balanced_accuracy_offsets"])
    np.testing.assert_array_equal(off, fit_prior_power(y, p, 2.0, 0.25)[0])
    y2, p2 = _skewed(seed=1)  # held-out data from the same distribution
    assert balanced_accuracy(y2, apply_offsets(p2, off), 7) > balanced_accuracy(y2, p2.argmax(axis=1), 7)
    # nothing to gain: tau stays 0 (arg-max); max_power 0 = arg-max; bad grids are refused
    yp = np.arange(7).repeat(3)
    perfect = np.full((yp.size, 7), 0.01)
    perfect[np.arange(yp.size), yp] = 0.94
    off0, info0 = fit_prior_power(yp, perfect)
    assert info0["power"] == 0 and not np.any(off0) and not np.signbit(off0).any()
    assert not np.any(fit_prior_power(y, p, max_power=0.0)[0])
    with pytest.raises(ValueError, match="step"):
        fit_prior_power(y, p, step=0)
    with pytest.raises(ValueError, match="y_true"):
        fit_prior_power(y + 7, p)


def test_decision_meta_round_trip() -> None:
    from pipeline.core.decision import decision_meta, offsets_of

    assert offsets_of({}) is None  # an older export: arg-max
    assert offsets_of({"decision": decision_meta(None)}) is None
    np.testing.assert_allclose(offsets_of({"decision": decision_meta(np.arange(7) / 10)}), np.arange(7) / 10)


# --------------------------------------------------------------------------------------------
# colour constancy (pure)
# --------------------------------------------------------------------------------------------


def test_shades_of_gray_neutralises_a_colour_cast() -> None:
    from pipeline.core.imaging import color_constancy, shades_of_gray

    rng = np.random.default_rng(0)
    base = rng.integers(40, 200, (24, 24, 3)).astype(np.float64)
    cast = np.clip(base * np.array([1.3, 1.0, 0.7]), 0, 255).astype(np.uint8)
    out = shades_of_gray(cast, 6)
    assert out.dtype == np.uint8 and out.shape == cast.shape

    def pnorm(a: np.ndarray) -> np.ndarray:
        x = a.astype(np.float64) / 255
        return np.mean(x**6, axis=(0, 1)) ** (1 / 6)

    before, after = pnorm(cast), pnorm(out)
    assert np.ptp(after) < 0.1 * np.ptp(before)  # the illuminant estimate is (nearly) grey
    grey = np.full((8, 8, 3), 90, np.uint8)
    np.testing.assert_array_equal(shades_of_gray(grey), grey)  # already neutral: unchanged
    black = np.zeros((8, 8, 3), np.uint8)
    np.testing.assert_array_equal(shades_of_gray(black), black)
    batch = np.stack([cast.transpose(2, 0, 1)] * 2)
    np.testing.assert_array_equal(color_constancy(batch, "shades_of_gray", 6)[1], out.transpose(2, 0, 1))
    assert color_constancy(batch, "none") is batch
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        shades_of_gray(cast.astype(np.float32))
    with pytest.raises(ValueError, match="unknown colour-constancy"):
        color_constancy(batch, "retinex")


# --------------------------------------------------------------------------------------------
# exports: decision / tta / preprocess in config.json, applied by predict, pyfunc and scoring
# --------------------------------------------------------------------------------------------


def _export(tmp_path: Path, **meta_changes: object) -> Path:
    from pipeline.core.model import build_twin, count_parameters, inference_model
    from pipeline.core.selection import build_meta
    from pipeline.io.modelstore import export_inference

    cfg = tiny_cfg(tmp_path / "w")
    torch.manual_seed(0)
    twin = build_twin(cfg.model, 7)
    inf = inference_model(twin, 0).eval()
    best = {"model_config": cfg.model.model_dump(mode="json"), "num_classes": 7, "image_size": 32, "epoch": 1,
            "val_loss_branch1": 1.0, "val_loss_branch2": 1.1}
    meta = {**build_meta(best, 1, count_parameters(inf)), **meta_changes}
    folder = tmp_path / "export"
    folder.mkdir(parents=True)
    export_inference(inf, meta, folder)
    return folder


def test_old_export_without_the_new_keys_loads_as_argmax(tmp_path: Path) -> None:
    from pipeline.core.inference import predict_batch_uint8, predicted_labels, preprocess_of, tta_of
    from pipeline.io.modelstore import load_exported

    folder = _export(tmp_path)
    meta = json.loads((folder / "config.json").read_text())
    for key in ("decision", "tta", "preprocess"):
        meta.pop(key)
    (folder / "config.json").write_text(json.dumps(meta))  # digests cover the model files only
    exported = load_exported(folder)
    assert tta_of(exported.meta) == "none" and preprocess_of(exported.meta) == ("none", 6.0)
    batch = np.random.default_rng(0).integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    probs = predict_batch_uint8(exported, batch, 4)
    np.testing.assert_array_equal(predicted_labels(exported, probs), probs.argmax(axis=1))


@pytest.mark.parametrize(
    "decision, needle",
    [({"rule": "offsets", "offsets": [0.0] * 6}, "needs 7 offsets"),
     ({"rule": "argmax", "offsets": [0.0] * 7}, "takes no offsets"),
     ({"rule": "vote"}, "decision.rule")],
)
def test_bad_decision_in_config_json_is_refused(tmp_path: Path, decision: dict, needle: str) -> None:
    assert_refused_with(tmp_path, "decision", decision, needle)


def assert_refused_with(tmp_path: Path, key: str, value: object, needle: str) -> None:
    """An export whose ``config.json`` has ``key: value`` does not load: DataError matching ``needle``."""
    from pipeline.io.modelstore import load_exported

    folder = _export(tmp_path)
    meta = json.loads((folder / "config.json").read_text())
    meta[key] = value
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=needle):
        load_exported(folder)


def test_tta_averages_the_eight_dihedral_views(tmp_path: Path) -> None:
    from pipeline.core.imaging import to_model_input
    from pipeline.core.inference import predict_batch_uint8, tta_views
    from pipeline.io.modelstore import load_exported

    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    views = tta_views(x, "flips")
    assert len(views) == 8 and len({v.numpy().tobytes() for v in views}) == 8
    assert any(torch.equal(v, x.flip(3)) for v in views) and any(torch.equal(v, x.flip(2)) for v in views)
    assert tta_views(x, "none") == [x]

    plain = load_exported(_export(tmp_path / "a"))
    flips = load_exported(_export(tmp_path / "b", tta="flips"))
    batch = np.random.default_rng(1).integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    got = predict_batch_uint8(flips, batch, 2)
    with torch.no_grad():
        xin = to_model_input(torch.from_numpy(batch))
        expect = np.mean([torch.softmax(flips.model(v.contiguous()).double(), 1).numpy()
                          for v in tta_views(xin, "flips")], axis=0)
    np.testing.assert_allclose(got, expect, atol=1e-6)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-9)
    assert not np.allclose(got, predict_batch_uint8(plain, batch, 2))  # same weights, TTA changes them


def test_colour_constancy_of_the_export_is_applied_at_inference(tmp_path: Path) -> None:
    from pipeline.core.imaging import shades_of_gray_chw
    from pipeline.core.inference import predict_batch_uint8
    from pipeline.io.modelstore import load_exported

    plain = load_exported(_export(tmp_path / "a"))
    sog = load_exported(_export(tmp_path / "b", preprocess={"color_constancy": "shades_of_gray", "sog_power": 6.0}))
    batch = np.random.default_rng(2).integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    batch[:, 0] //= 2  # a colour cast
    np.testing.assert_allclose(predict_batch_uint8(sog, batch, 8),
                               predict_batch_uint8(plain, shades_of_gray_chw(batch, 6.0), 8), atol=1e-9)


def test_predict_pyfunc_and_scoring_apply_the_same_rule(tmp_path: Path) -> None:
    """An export with strong offsets: predict (rule), the pyfunc and score_model agree on the
    labels; predict.decision=argmax gives plain arg-max; probabilities are never changed."""
    from pipeline.core.inference import predict_batch_uint8, predict_proba, predicted_labels
    from pipeline.io.modelstore import load_exported
    from pipeline.io.pyfunc import SkinTwinClassifier, encode_png
    from pipeline.io.scoring import score_model
    from pipeline.stages.predict import run_predict

    offsets = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 20.0]  # everything becomes vasc
    folder = _export(tmp_path, decision={"rule": "offsets", "offsets": offsets})
    exported = load_exported(folder)
    rng = np.random.default_rng(3)
    imgs_dir = tmp_path / "imgs"
    imgs_dir.mkdir()
    arrays = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(4)]
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(imgs_dir / f"im{i}.png")
    cfg = tiny_cfg(tmp_path / "w")
    out = run_predict(cfg, str(folder), str(imgs_dir), str(tmp_path / "p.csv"), cam_dir=str(tmp_path / "cams"))
    df = pd.read_csv(tmp_path / "p.csv")
    assert out["labels"] == {"vasc": 4} and set(df["label"]) == {"vasc"}
    probs = predict_proba(exported, arrays, 8)
    np.testing.assert_allclose(df[list(CLASSES)].to_numpy(), probs, atol=1e-6)  # softmax, unchanged
    assert len(list((tmp_path / "cams").glob("*.png"))) == 4

    run_predict(cfg.with_overrides({"predict.decision": "argmax"}), str(folder), str(imgs_dir), str(tmp_path / "a.csv"))
    plain = pd.read_csv(tmp_path / "a.csv")
    assert plain["label"].tolist() == [CLASSES[i] for i in probs.argmax(axis=1)]

    got = SkinTwinClassifier(folder, 8).predict(pd.DataFrame({"image": [encode_png(a) for a in arrays]}))
    assert got["label"].tolist() == ["vasc"] * 4
    np.testing.assert_allclose(got[list(CLASSES)].to_numpy(), probs, atol=1e-6)

    manifest = pd.DataFrame({"image_id": [f"im{i}" for i in range(4)], "path": [f"im{i}.png" for i in range(4)],
                             "label": ["vasc", "vasc", "nv", "mel"]})
    metrics, sprobs = score_model(exported, manifest, imgs_dir, cfg)
    assert metrics["accuracy"] == pytest.approx(0.5)  # the rule's labels
    plain_pred = predict_batch_uint8(exported, np.stack([a.transpose(2, 0, 1) for a in arrays]), 8).argmax(axis=1)
    truth = np.array([CLASSES.index(c) for c in manifest["label"]])
    assert metrics["argmax_accuracy"] == pytest.approx(float((plain_pred == truth).mean()))
    np.testing.assert_array_equal(predicted_labels(exported, sprobs), [6, 6, 6, 6])


# --------------------------------------------------------------------------------------------
# select fits the rule on val; evaluate reports both
# --------------------------------------------------------------------------------------------


def test_select_fits_the_rule_on_val_and_evaluate_reports_both(tmp_path: Path) -> None:
    import pipeline.stages.train as train
    from pipeline.stages.evaluate import run_evaluate
    from pipeline.stages.select import run_select

    cfg = tiny_cfg(tmp_path / "w", **{"select.decision_rule": "balanced", "select.tta": "flips", "train.epochs": 1})
    make_work(tmp_path / "w")
    train.run_train(cfg)
    out = run_select(cfg)
    meta = json.loads((tmp_path / "w" / "models" / "export" / "config.json").read_text())
    assert meta["decision"]["rule"] == "offsets" and len(meta["decision"]["offsets"]) == 7
    assert meta["tta"] == "flips" and meta["preprocess"]["color_constancy"] == "none"
    assert out["val_balanced_accuracy_offsets"] >= out["val_balanced_accuracy_argmax"]
    ev = run_evaluate(cfg)
    metrics = json.loads(Path(ev["metrics"]).read_text())
    for key in ("argmax_accuracy", "argmax_balanced_accuracy", "argmax_macro_f1", "balanced_accuracy"):
        assert key in metrics
    # decision_rule prior: the same kind of export (offsets), one fitted power
    out = run_select(cfg.with_overrides({"select.decision_rule": "prior"}))
    meta = json.loads((tmp_path / "w" / "models" / "export" / "config.json").read_text())
    assert out["decision_fit"] == "prior" and 0 <= out["decision_prior_power"] <= 2.0
    assert meta["decision"]["rule"] == "offsets" and len(meta["decision"]["offsets"]) == 7
    # decision_rule none: arg-max recorded, both metric sets equal
    run_select(cfg.with_overrides({"select.decision_rule": "none"}))
    meta = json.loads((tmp_path / "w" / "models" / "export" / "config.json").read_text())
    assert meta["decision"] == {"rule": "argmax", "offsets": None}


def test_fit_rule_dispatches_to_the_configured_fit() -> None:
    from pipeline.config import SelectConfig
    from pipeline.core.decision import fit_offsets, fit_prior_power, fit_rule

    y, p = _skewed()
    sc = SelectConfig(offset_limit=1.0, offset_step=0.2, prior_power_max=1.5, prior_power_step=0.5)
    np.testing.assert_array_equal(fit_rule("balanced", y, p, sc)[0], fit_offsets(y, p, 1.0, 0.2)[0])
    np.testing.assert_array_equal(fit_rule("prior", y, p, sc)[0], fit_prior_power(y, p, 1.5, 0.5)[0])
    with pytest.raises(ValueError, match="unknown decision rule"):
        fit_rule("none", y, p, sc)
