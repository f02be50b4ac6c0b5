"""Registry stage: champion/challenger gate on aliases, restore on failure, models:/ URIs.

Runs against the embedded SQLite store and against a real ``mlflow server`` started here.
Model quality is scripted: :func:`mlflow_server.make_run` writes ``fake_balanced_accuracy`` into
the export's config.json and :func:`mlflow_server.fake_score` replaces ``score_model``; since the
score is read from the *downloaded* registry artifact, the tests also check that the champion is
fetched from the registry and that both models are scored on the same test manifest.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow_server import fake_score, make_cfg, make_run

from pipeline.core.gate import gate_decision
from pipeline.io.registry import parse_model_uri

NAME = "skin-twin-test"


@pytest.mark.parametrize(
    ("challenger", "champion", "margin", "floor", "promote"),
    [
        (0.50, None, 0.0, 0.2, True),  # first model clears the floor
        (0.10, None, 0.0, 0.2, False),  # first model below the floor
        (0.60, 0.50, 0.0, 0.2, True),  # better
        (0.50, 0.50, 0.0, 0.2, True),  # equal with margin 0: promoted, the reason says "equals"
        (0.40, 0.50, 0.0, 0.2, False),  # worse
        (0.54, 0.50, 0.05, 0.2, False),  # better but not by the margin
        (0.55, 0.50, 0.05, 0.2, True),  # exactly the margin
        (0.15, 0.10, 0.0, 0.2, False),  # better than champion but below the floor
        (None, 0.50, 0.0, 0.2, False),  # no score
        (float("nan"), None, 0.0, 0.0, False),
        (0.30, float("nan"), 0.0, 0.2, True),  # champion unscorable counts as none
    ],
)
def test_gate_decision_table(challenger, champion, margin, floor, promote) -> None:
    ok, reason = gate_decision(challenger, champion, margin, floor)
    assert ok is promote
    assert isinstance(reason, str) and reason


def test_gate_reason_says_equals_for_a_tie_and_beats_only_for_a_gain() -> None:
    assert gate_decision(0.5, 0.5, 0.0, 0.2) == (True, "challenger 0.5000 equals champion 0.5000 (margin 0.0000)")
    ok, reason = gate_decision(0.6, 0.5, 0.05, 0.2)
    assert ok and reason == "challenger 0.6000 beats champion 0.5000 by +0.1000 (margin 0.0500)"
    ok, reason = gate_decision(0.52, 0.5, 0.05, 0.2)
    assert not ok and "does not beat champion 0.5000 by the margin 0.0500" in reason


def test_parse_model_uri() -> None:
    from pipeline.errors import PipelineError

    assert parse_model_uri("models:/m@champion") == ("m", "champion", None)
    assert parse_model_uri("models:/skin-twin/3") == ("skin-twin", None, "3")
    for bad in ("runs:/x/model", "models:/", "models:/a/b/c", "skin-twin@champion"):
        with pytest.raises(PipelineError):
            parse_model_uri(bad)


# --------------------------------------------------------------------------------------------
# stores
# --------------------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("server", marks=pytest.mark.slow)])
def store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A function making configs for distinct pipeline runs sharing one tracking store."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = request.getfixturevalue("server") if request.param == "server" else None
    counter = {"n": 0}
    name = f"{NAME}-{uuid.uuid4().hex[:8]}"  # the server outlives one test: own model per test

    def cfg_for(**extra):
        counter["n"] += 1
        return make_cfg(tmp_path, f"run{counter['n']}", tracking_uri=uri, **{"registry.model_name": name, **extra})

    return cfg_for


def _track_and_register(cfg, ba: float, seed: int) -> dict:
    from pipeline.stages.register import run_register
    from pipeline.stages.track import run_track

    make_run(cfg, seed=seed, fake_ba=ba)
    run_track(cfg)
    return run_register(cfg)


def _aliases(cfg) -> dict[str, str]:
    from pipeline.io.mlflow_service import client_for
    from pipeline.io.registry import get_aliases

    return get_aliases(client_for(cfg), cfg.registry.model_name)


# --------------------------------------------------------------------------------------------
# gate
# --------------------------------------------------------------------------------------------


def test_gate_keeps_champion_when_worse_and_moves_when_better(store, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.io.scoring as evaluate
    from pipeline.io.mlflow_service import client_for

    calls: list = []
    monkeypatch.setattr(evaluate, "score_model", fake_score(calls))

    cfg1 = store()
    s1 = _track_and_register(cfg1, 0.60, seed=1)
    assert s1["promoted"] and s1["version"] == "1" and s1["champion_balanced_accuracy"] is None
    assert _aliases(cfg1) == {"challenger": "1", "champion": "1"}

    calls.clear()
    cfg2 = store()
    s2 = _track_and_register(cfg2, 0.50, seed=2)  # worse
    assert not s2["promoted"] and s2["decision"] == "kept-champion"
    assert _aliases(cfg2) == {"challenger": "2", "champion": "1"}
    # both scored on the same (this run's) test manifest; the champion's score came from v1's artifact
    assert sorted(c[0] for c in calls) == [0.5, 0.6]
    pd.testing.assert_frame_equal(calls[0][1], calls[1][1])
    assert set(calls[0][1]["split"]) == {"test"} and calls[0][2] == calls[1][2]
    assert calls[0][2].startswith(str(Path(cfg2.paths.work_dir)))

    client = client_for(cfg2)
    v2 = client.get_model_version(cfg2.registry.model_name, "2")
    assert v2.tags["gate.decision"] == "kept-champion"
    assert v2.tags["gate.promoted"] == "false"
    assert float(v2.tags["gate.challenger_balanced_accuracy"]) == pytest.approx(0.5)
    assert float(v2.tags["gate.champion_balanced_accuracy"]) == pytest.approx(0.6)
    assert v2.tags["gate.champion_version"] == "1"
    assert "kept-champion" in v2.description and "0.500000" in v2.description and "0.600000" in v2.description

    s3 = _track_and_register(store(), 0.70, seed=3)  # better
    assert s3["promoted"] and s3["previous_champion_version"] == "1" and s3["champion_version"] == "3"
    assert _aliases(cfg1) == {"challenger": "3", "champion": "3"}
    v3 = client.get_model_version(cfg1.registry.model_name, "3")
    assert v3.tags["gate.decision"] == "promoted"
    assert float(v3.tags["gate.champion_balanced_accuracy"]) == pytest.approx(0.6)  # v1 was still champion


def test_margin_and_floor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.io.scoring as evaluate

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(evaluate, "score_model", fake_score())
    s1 = _track_and_register(make_cfg(tmp_path, "a", **{"registry.floor": 0.3}), 0.25, seed=1)
    assert not s1["promoted"] and s1["decision"] == "rejected" and s1["champion_version"] is None
    cfg_b = make_cfg(tmp_path, "b", **{"registry.floor": 0.3, "registry.margin": 0.1})
    s2 = _track_and_register(cfg_b, 0.40, seed=2)
    assert s2["promoted"] and s2["champion_version"] == "2"
    s3 = _track_and_register(make_cfg(tmp_path, "c", **{"registry.floor": 0.3, "registry.margin": 0.1}), 0.45, seed=3)
    assert not s3["promoted"] and s3["champion_version"] == "2"
    assert _aliases(cfg_b) == {"challenger": "3", "champion": "2"}


def test_failure_leaves_aliases_untouched(store, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.io.scoring as evaluate
    from pipeline.io.mlflow_service import client_for
    from pipeline.stages.register import run_register
    from pipeline.stages.track import run_track

    monkeypatch.setattr(evaluate, "score_model", fake_score())
    cfg1 = store()
    _track_and_register(cfg1, 0.6, seed=1)
    before = _aliases(cfg1)

    def broken(*args, **kwargs):
        raise RuntimeError("evaluation exploded")

    monkeypatch.setattr(evaluate, "score_model", broken)
    cfg2 = store()
    make_run(cfg2, seed=2, fake_ba=0.9)
    run_track(cfg2)
    with pytest.raises(RuntimeError, match="evaluation exploded"):
        run_register(cfg2)
    assert _aliases(cfg2) == before == {"challenger": "1", "champion": "1"}
    v2 = client_for(cfg2).get_model_version(cfg2.registry.model_name, "2")
    assert v2.tags["gate.decision"] == "error"
    assert "registry" not in json.loads((Path(cfg2.paths.work_dir) / "reports" / "mlflow.json").read_text())

    # and a re-run after the failure registers nothing new and applies the gate
    monkeypatch.setattr(evaluate, "score_model", fake_score())
    s = run_register(cfg2)
    assert s["version"] == "2" and s["promoted"]
    assert _aliases(cfg2) == {"challenger": "2", "champion": "2"}


def test_register_rerun_is_idempotent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.io.scoring as evaluate
    from pipeline.io.mlflow_service import client_for
    from pipeline.stages.register import run_register

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(evaluate, "score_model", fake_score())
    cfg = make_cfg(tmp_path)
    _track_and_register(cfg, 0.6, seed=1)
    again = run_register(cfg)
    assert again["version"] == "1" and again["decision"] == "already-champion"
    assert len(client_for(cfg).search_model_versions(f"name='{NAME}'")) == 1


# --------------------------------------------------------------------------------------------
# loading back
# --------------------------------------------------------------------------------------------


def test_champion_loads_by_alias_in_both_flavours(store, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow.pyfunc
    import mlflow.pytorch
    import torch

    import pipeline.io.scoring as evaluate
    from pipeline.core.inference import predict_proba
    from pipeline.io.modelstore import load_exported
    from pipeline.io.registry import download_model

    monkeypatch.setattr(evaluate, "score_model", fake_score())
    cfg = store()
    _track_and_register(cfg, 0.6, seed=4)
    uri = f"models:/{cfg.registry.model_name}@champion"
    exported = load_exported(Path(cfg.paths.work_dir) / "models" / "export")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (s, s + 3, 3), dtype=np.uint8) for s in (20, 32, 47)]
    expect = predict_proba(exported, images, 64)

    from pipeline.io.pyfunc import encode_png

    pf = mlflow.pyfunc.load_model(uri)
    got = pf.predict(pd.DataFrame({"image": [encode_png(a) for a in images]}))  # image files of any size
    assert list(got.columns) == ["label", "akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    probs = got.drop(columns="label").to_numpy(dtype=float)
    np.testing.assert_allclose(probs, expect, atol=1e-6)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    assert got["label"].tolist() == [got.columns[1 + i] for i in expect.argmax(axis=1)]  # no rule: arg-max
    with pytest.raises(Exception, match="schema"):  # the input schema is enforced: raw arrays are refused
        pf.predict(rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))

    net = mlflow.pytorch.load_model(uri)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x), exported.model(x), atol=1e-5, rtol=1e-5)

    folder = download_model(uri, cfg)
    assert (folder / "weights.pt").is_file()
    np.testing.assert_allclose(predict_proba(load_exported(folder), images, 64), expect, atol=1e-7)
    assert download_model(f"models:/{cfg.registry.model_name}/1", cfg) == folder  # cached per version


def test_predict_stage_with_registry_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    import pipeline.io.scoring as evaluate
    from pipeline.core.inference import predict_proba
    from pipeline.io.modelstore import load_exported
    from pipeline.stages.predict import run_predict

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(evaluate, "score_model", fake_score())
    cfg = make_cfg(tmp_path)
    _track_and_register(cfg, 0.6, seed=5)
    rng = np.random.default_rng(3)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    arrays = [rng.integers(0, 256, (40, 30, 3), dtype=np.uint8) for _ in range(3)]
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(imgs / f"img{i}.png")
    out = tmp_path / "pred.csv"
    summary = run_predict(cfg, model=f"models:/{NAME}@champion", images=str(imgs), out=str(out))
    assert summary["images"] == 3
    df = pd.read_csv(out)
    expect = predict_proba(load_exported(Path(cfg.paths.work_dir) / "models" / "export"), arrays, 64)
    np.testing.assert_allclose(df[["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]].to_numpy(), expect, atol=2e-6)


def test_gate_with_real_score_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real evaluate.score_model on this run's test split (random tiny model)."""
    from pipeline.stages.register import run_register
    from pipeline.stages.track import run_track

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = make_cfg(tmp_path, **{"registry.floor": 0.0})
    make_run(cfg, seed=6)
    run_track(cfg)
    s = run_register(cfg)
    assert s["promoted"] and 0.0 <= s["challenger_balanced_accuracy"] <= 1.0


def test_model_card_gives_the_bootstrap_intervals_of_metrics_json() -> None:
    from pipeline.core.model_card import model_card

    def card(metrics: dict) -> str:
        return model_card(name="skin-twin", version="3", run_id="r", metrics=metrics, export={}, data={}, gate={},
                          lineage={})  # fmt: skip

    figures = {"balanced_accuracy": 0.61, "accuracy": 0.7, "macro_auc": 0.9}
    with_ci = card({**figures, "ci_level": 0.95, "balanced_accuracy_ci_low": 0.552, "balanced_accuracy_ci_high": 0.667,
                    "macro_auc_ci_low": 0.881, "macro_auc_ci_high": 0.918})  # fmt: skip
    assert "95 % intervals over resamples of the test images: balanced accuracy 0.552-0.667, macro AUC 0.881-0.918" in (
        with_ci)
    assert "intervals" not in card(figures)  # evaluate.bootstrap_samples: 0
