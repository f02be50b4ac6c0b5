"""Calibration of the reported probabilities (``select.calibration``): the pure fit, the export's
``calibration`` entry, and that select, predict, the pyfunc and scoring report the same numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_decision import _export, assert_refused_with

from pipeline.core.calibration import A_MAX, A_MIN, apply_calibration, calibration_meta, calibration_of, fit_calibration
from pipeline.labels import CLASSES


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _distorted(n: int = 20000, scale: float = 2.0, shift: tuple[float, ...] = (0.8, -0.5, 0.3, 1.2, -0.9, -1.5, 0.6),
               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from ``softmax(z)`` and a 'network' that reports ``softmax(scale * z + shift)``:
    over-confident by ``scale`` and with a shifted class mix, so the exact calibration is
    ``T = scale`` and ``b = -shift / scale`` (up to a common constant)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n, 7))
    truth = _softmax(z)
    y = np.array([rng.choice(7, p=row) for row in truth])
    return y, _softmax(scale * z + np.asarray(shift)[None, :])


def test_temperature_bias_recovers_a_known_distortion() -> None:
    shift = np.array([0.8, -0.5, 0.3, 1.2, -0.9, -1.5, 0.6])
    y, p = _distorted(shift=tuple(shift))
    temperature, bias, info = fit_calibration(y, p, "temperature_bias")
    assert temperature == pytest.approx(2.0, abs=0.08)
    expect = -shift / 2.0
    np.testing.assert_allclose(bias - bias.mean(), expect - expect.mean(), atol=0.08)
    assert info["nll_after"] < info["nll_before"] - 0.05 and not info["temperature_bounded"]
    # deterministic: the same numbers twice
    again = fit_calibration(y, p, "temperature_bias")
    assert again[0] == temperature and np.array_equal(again[1], bias)


def test_temperature_alone_fits_one_number_and_lowers_the_nll() -> None:
    y, p = _distorted(shift=(0.0,) * 7, scale=0.5)  # under-confident, class mix right
    temperature, bias, info = fit_calibration(y, p, "temperature")
    assert temperature == pytest.approx(0.5, abs=0.03) and np.array_equal(bias, np.zeros(7))
    assert info["nll_after"] < info["nll_before"]
    t, b, info = fit_calibration(y, p, "none")
    assert t == 1.0 and np.array_equal(b, np.zeros(7)) and info["nll_after"] == pytest.approx(info["nll_before"])


def test_class_absent_from_val_keeps_bias_zero_and_stays_predictable() -> None:
    y, p = _distorted(n=3000)
    keep = y != 3
    temperature, bias, _ = fit_calibration(y[keep], p[keep], "temperature_bias")
    assert bias[3] == 0.0 and np.all(np.isfinite(bias))
    assert abs(bias[np.arange(7) != 3].mean()) < 1e-6  # the fitted biases are centred: 0 is their mean
    assert (apply_calibration(p, temperature, bias).argmax(axis=1) == 3).sum() > 10  # class 3 can still win


def test_an_anti_informative_model_gets_a_bounded_temperature() -> None:
    y, p = _distorted(n=3000, shift=(0.0,) * 7)
    _, p_flipped = _distorted(n=3000, shift=(0.0,) * 7, scale=-3.0)  # ranks the classes backwards
    temperature, bias, info = fit_calibration(y, p_flipped, "temperature")
    assert info["temperature_bounded"] and temperature == pytest.approx(1 / A_MIN)
    assert 1 / A_MAX <= fit_calibration(y, p, "temperature")[0] <= 1 / A_MIN


def test_apply_calibration_is_the_formula_and_refuses_bad_input() -> None:
    _, p = _distorted(n=50)
    bias = np.linspace(-1, 1, 7)
    np.testing.assert_allclose(apply_calibration(p, 0.7, bias), _softmax(np.log(p) / 0.7 + bias), atol=1e-12)
    np.testing.assert_allclose(apply_calibration(p), p, atol=1e-12)
    for kwargs, needle in (({"temperature": 0.0}, "temperature"), ({"bias": [0.0] * 6}, "7 finite"),
                           ({"bias": [np.nan] * 7}, "7 finite")):
        with pytest.raises(ValueError, match=needle):
            apply_calibration(p, **kwargs)
    with pytest.raises(ValueError, match="unknown calibration"):
        fit_calibration(np.zeros(3, dtype=int), p[:3], "platt")


def test_meta_round_trip() -> None:
    assert calibration_of({}) == (1.0, None)
    assert calibration_of({"calibration": {"method": "none", "temperature": 1.0, "bias": None}}) == (1.0, None)
    t, b = calibration_of({"calibration": calibration_meta("temperature_bias", 0.9, np.arange(7) / 10)})
    assert t == 0.9 and np.allclose(b, np.arange(7) / 10)


# --------------------------------------------------------------------------------------------
# the export's calibration, applied by every consumer
# --------------------------------------------------------------------------------------------


def test_every_consumer_reports_the_calibrated_probabilities(tmp_path: Path) -> None:
    from PIL import Image
    from test_train import tiny_cfg

    from pipeline.core.inference import predict_batch_uint8, predict_proba
    from pipeline.io.modelstore import load_exported
    from pipeline.io.pyfunc import SkinTwinClassifier, encode_png
    from pipeline.io.scoring import score_model
    from pipeline.stages.predict import run_predict

    bias = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0]
    plain = load_exported(_export(tmp_path / "a"))
    folder = _export(tmp_path / "b", calibration=calibration_meta("temperature_bias", 0.5, np.asarray(bias)))
    cal = load_exported(folder)
    rng = np.random.default_rng(4)
    arrays = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(4)]
    batch = np.stack([a.transpose(2, 0, 1) for a in arrays])
    expect = apply_calibration(predict_batch_uint8(plain, batch, 8), 0.5, bias)
    got = predict_batch_uint8(cal, batch, 3)
    np.testing.assert_allclose(got, expect, atol=1e-12)
    assert not np.allclose(got, predict_batch_uint8(plain, batch, 8), atol=1e-3)
    np.testing.assert_allclose(predict_batch_uint8(cal, batch[2:3], 1), got[2:3], atol=1e-6)  # not batch-dependent
    np.testing.assert_allclose(predict_proba(cal, arrays, 8), got, atol=1e-6)

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(imgs / f"im{i}.png")
    cfg = tiny_cfg(tmp_path / "w")
    run_predict(cfg, str(folder), str(imgs), str(tmp_path / "p.csv"))
    np.testing.assert_allclose(pd.read_csv(tmp_path / "p.csv")[list(CLASSES)].to_numpy(), got, atol=1e-6)
    out = SkinTwinClassifier(folder, 8).predict(pd.DataFrame({"image": [encode_png(a) for a in arrays]}))
    np.testing.assert_allclose(out[list(CLASSES)].to_numpy(), got, atol=1e-6)
    manifest = pd.DataFrame({"image_id": [f"im{i}" for i in range(4)], "path": [f"im{i}.png" for i in range(4)],
                             "label": ["vasc", "nv", "nv", "mel"]})
    _, sprobs = score_model(cal, manifest, imgs, cfg)
    np.testing.assert_allclose(sprobs, got, atol=1e-6)


@pytest.mark.parametrize(
    "calibration, needle",
    [({"method": "temperature_bias", "temperature": 0.9, "bias": [0.0] * 6}, "needs 7 biases"),
     ({"method": "temperature", "temperature": 0.9, "bias": [0.5] * 7}, "zero biases"),
     ({"method": "none", "temperature": 2.0, "bias": None}, "temperature 1"),
     ({"method": "temperature", "temperature": 0.0, "bias": [0.0] * 7}, "temperature"),
     ({"method": "platt", "temperature": 1.0, "bias": None}, "calibration.method")],
)
def test_bad_calibration_in_config_json_is_refused(tmp_path: Path, calibration: dict, needle: str) -> None:
    assert_refused_with(tmp_path, "calibration", calibration, needle)


def test_select_fits_calibration_then_the_rule_on_the_calibrated_val_probabilities(tmp_path: Path) -> None:
    import pipeline.stages.train as train
    from test_train import make_work, tiny_cfg

    from pipeline.core.decision import fit_rule
    from pipeline.core.inference import predict_batch_uint8
    from pipeline.io.modelstore import load_exported
    from pipeline.io.scoring import label_index, load_images
    from pipeline.layout import Layout
    from pipeline.stages.evaluate import run_evaluate
    from pipeline.stages.select import run_select

    cfg = tiny_cfg(tmp_path / "w", **{"select.decision_rule": "prior", "select.calibration": "temperature_bias",
                                      "train.epochs": 1})
    make_work(tmp_path / "w")
    train.run_train(cfg)
    out = run_select(cfg)
    folder = tmp_path / "w" / "models" / "export"
    meta = json.loads((folder / "config.json").read_text())
    assert meta["calibration"]["method"] == "temperature_bias" and len(meta["calibration"]["bias"]) == 7
    assert out["calibration"] == "temperature_bias" and out["val_nll_calibrated"] <= out["val_nll_uncalibrated"]
    # the recorded rule is the one fitted on what the export now reports for the val split
    layout = Layout.from_config(cfg)
    aug = pd.read_parquet(layout.augmented_manifest)
    val = aug[aug["split"] == "val"]
    exported = load_exported(folder)
    probs = predict_batch_uint8(exported, load_images(val, layout.augmented_dir, exported.image_size, cfg), 64)
    offsets, _ = fit_rule("prior", label_index(val, "val"), probs, cfg.select)
    np.testing.assert_allclose(meta["decision"]["offsets"], offsets, atol=1e-9)
    metrics = json.loads(Path(run_evaluate(cfg)["metrics"]).read_text())
    assert 0.0 <= metrics["ece"] <= 1.0
    # calibration none: no entry, the network's probabilities
    run_select(cfg.with_overrides({"select.calibration": "none"}))
    assert "calibration" not in json.loads((folder / "config.json").read_text())


def test_model_card_names_the_calibration() -> None:
    from pipeline.core.model_card import model_card

    def card(export: dict) -> str:
        return model_card(name="skin-twin", version="3", run_id="r", metrics={"ece": 0.04}, export=export, data={},
                          gate={}, lineage={})  # fmt: skip

    assert "calibration temperature_bias (T 0.901)" in card({"calibration": calibration_meta("temperature_bias", 0.901,
                                                                                               np.zeros(7))})
    assert "calibration none" in card({})
