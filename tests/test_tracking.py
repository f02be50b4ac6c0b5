"""Track stage: tracking URI resolution, what one run holds, idempotent re-runs, the run report.

The end-to-end tests run against the embedded SQLite store and a real ``mlflow server``.
The stage's own timings are printed (``-s``) and stored in the tracking record; nothing asserts on
time.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow_server import make_cfg, make_run

from pipeline.core.run_record import build_report, final_metrics, history_metrics, param_value, params_of
from pipeline.io.mlflow_service import redact, resolve_tracking_uri

# --------------------------------------------------------------------------------------------
# pure parts
# --------------------------------------------------------------------------------------------


def test_tracking_uri_env_wins_and_relative_sqlite_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = make_cfg(tmp_path, **{"mlflow.tracking_uri": "sqlite:///nested/store/mlflow.db"})
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = resolve_tracking_uri(cfg)
    assert uri == f"sqlite:///{(tmp_path / 'nested' / 'store' / 'mlflow.db').resolve()}"
    assert (tmp_path / "nested" / "store").is_dir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_tracking_uri(cfg) == "http://127.0.0.1:5999"
    assert redact("https://user:secret@host:5000/x") == "https://host:5000/x"


def test_params_flattened_and_truncated(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    params = params_of(cfg)
    assert set(params) == set(cfg.flat())
    assert params["train.epochs"] == str(cfg.train.epochs)
    assert json.loads(params["model.extractor"]) == [[1, 8, 1, 1]]
    long = param_value("x" * 10000, limit=100)
    assert len(long) == 100 and long.endswith("...")


def test_history_and_final_metrics_mapping() -> None:
    hist = pd.DataFrame({"epoch": [1, 2], "val_loss_branch1": [1.0, 0.8], "val_loss_branch2": [1.2, float("nan")], "lr": [0.1, 0.05]})
    rows = history_metrics(hist)
    assert ("val_loss_branch1", 0.8, 2) in rows and ("lr", 0.1, 1) in rows
    assert not any(k == "epoch" for k, _, _ in rows)
    assert not any(k == "val_loss_branch2" and s == 2 for k, _, s in rows)  # NaN skipped
    fm = final_metrics({"balanced_accuracy": 0.5, "val_loss_branch1": 0.9, "selected_branch": 2, "auc_df": None})
    assert fm == {"test_balanced_accuracy": 0.5, "best_val_loss_branch1": 0.9, "selected_branch": 2.0}


def test_build_report_inlines_plots_and_shows_status(tmp_path: Path) -> None:
    from PIL import Image

    png = tmp_path / "cm.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(png)
    page = build_report(
        title="t",
        run_id="abc",
        metrics={"balanced_accuracy": 0.5, "recall_nv": 0.25, "selected_branch": 1},
        images={"confusion matrix": png.read_bytes(), "missing": None},
        validation={"success": False, "digest": "d1"},
        pairs_summary={"pairs": 3},
        tags={"skin_twin.git_commit": "deadbeef"},
    )
    assert "data:image/png;base64," in page and page.count("<img") == 1
    assert "FAILED" in page and "0.5000" in page and "recall_nv" in page and "deadbeef" in page and "&quot;pairs&quot;" in page


# --------------------------------------------------------------------------------------------
# end to end
# --------------------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("server", marks=pytest.mark.slow)])
def tracked(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from pipeline.stages.track import run_track

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for k in ("AIRFLOW_CTX_DAG_ID", "AIRFLOW_CTX_DAG_RUN_ID", "AIRFLOW_CTX_TRY_NUMBER"):
        monkeypatch.delenv(k, raising=False)
    uri = request.getfixturevalue("server") if request.param == "server" else None
    cfg = make_cfg(tmp_path, tracking_uri=uri, **{"mlflow.experiment": f"exp-{tmp_path.name}"})
    make_run(cfg, seed=1)
    result = run_track(cfg)
    print(f"\n[{request.param}] track stage timings (s): {result['timings']}")
    return cfg, result


def test_run_holds_params_metrics_datasets_tags_artifacts(tracked) -> None:
    import mlflow
    from pipeline.core.lineage import content_digest
    from pipeline.io.mlflow_service import client_for
    from pipeline.io.provenance import dataset_digest

    cfg, result = tracked
    client = client_for(cfg)
    run = client.get_run(result["run_id"])
    work = Path(cfg.paths.work_dir)

    assert set(run.data.params) == set(cfg.flat())
    m = run.data.metrics
    for key in ("test_balanced_accuracy", "test_accuracy", "test_macro_auc", "selected_branch", "best_val_loss_branch1",
                "best_val_loss_branch2", "params_inference", "params_train", "train_seconds", "track_seconds.total"):
        assert key in m, key
    for key in ("val_loss_branch1", "val_loss_branch2", "val_loss_discriminator", "train_loss"):
        hist = client.get_metric_history(result["run_id"], key)
        assert sorted(h.step for h in hist) == [1, 2], key
    assert m["val_loss_branch1"] == pytest.approx(1.1) and m["selected_branch"] == 1

    tags = run.data.tags
    assert tags["skin_twin.params_digest"] == cfg.digest()
    assert tags["skin_twin.validation.success"] == "true"
    assert tags["skin_twin.git_commit"] and tags["skin_twin.version"]
    assert "skin_twin.airflow.dag_id" not in tags

    manifest = pd.read_parquet(work / "data" / "validated.parquet")
    inputs = {
        {t.key: t.value for t in d.tags}["mlflow.data.context"]: d.dataset for d in run.inputs.dataset_inputs
    }
    assert set(inputs) == {"training", "validation", "testing"}
    for split, ctx in (("train", "training"), ("val", "validation"), ("test", "testing")):
        full = content_digest(manifest[manifest["split"] == split])
        source = json.loads(inputs[ctx].source)
        where = source.get("uri") or source.get("url")
        assert f"lineage/manifests/{split}.csv" in where and result["run_id"] in where  # this run's own manifest
        assert inputs[ctx].name == split and inputs[ctx].digest == dataset_digest(full, where)
        assert tags[f"skin_twin.data_digest.{split}"] == full

    arts = set()
    stack = [""]
    while stack:
        for f in client.list_artifacts(result["run_id"], stack.pop() or None):
            (stack.append(f.path) if f.is_dir else arts.add(f.path))
    for path in ("run_report.html", "plots/confusion_matrix.png", "plots/roc.png", "plots/training_curves.png",
                 "cam/grid.png", "validation/result.json", "validation/summary.html", "pairs/pairs_summary.json", "data/ingest_summary.json",
                 "reports/metrics.json", "train/history.csv", "export/config.json"):
        assert path in arts, path
    report = (work / "reports" / "run_report.html").read_text()
    assert report.count("data:image/png;base64,") == 4 and "passed" in report and cfg.digest() in report

    rec = json.loads((work / "reports" / "mlflow.json").read_text())
    assert rec["run_id"] == result["run_id"] and rec["model_uri"].startswith("models:/m-")
    logged = mlflow.get_logged_model(rec["model_id"])
    assert logged.source_run_id == result["run_id"]


def test_logged_model_predicts_like_the_export(tracked) -> None:
    import mlflow.pyfunc
    import mlflow.pytorch
    import torch

    from pipeline.core.inference import predict_proba
    from pipeline.io.modelstore import load_exported

    cfg, result = tracked
    exported = load_exported(Path(cfg.paths.work_dir) / "models" / "export")
    from mlflow.models import Model, convert_input_example_to_serving_input, validate_serving_input

    from pipeline.io.pyfunc import encode_png

    rng = np.random.default_rng(7)
    batch = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    frame = pd.DataFrame({"image": [encode_png(a) for a in batch]})
    got = mlflow.pyfunc.load_model(result["model_uri"]).predict(frame)
    assert got.columns[0] == "label"
    np.testing.assert_allclose(got.drop(columns="label").to_numpy(dtype=float),
                               predict_proba(exported, list(batch), 64), atol=1e-6)
    single = mlflow.pyfunc.load_model(result["run_model_uri"]).predict(frame.iloc[:1])
    assert single.shape == (1, 8)
    # the signature has an input schema, and the logged input example round-trips through serving JSON
    info = Model.load(result["model_uri"])
    assert info.signature.inputs.input_names() == ["image"] and info.signature.inputs.inputs[0].type.name == "binary"
    example = info.load_input_example(mlflow.artifacts.download_artifacts(result["model_uri"]))
    served = validate_serving_input(result["model_uri"], convert_input_example_to_serving_input(example))
    np.testing.assert_allclose(served.drop(columns="label").to_numpy(dtype=float).sum(axis=1), 1.0, atol=1e-9)
    assert list(served.columns) == list(got.columns) and len(served) == len(example)
    net = mlflow.pytorch.load_model(result["model_uri"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x), exported.model(x), atol=1e-5, rtol=1e-5)


def test_rerun_reuses_the_run_and_logs_nothing_twice(tracked) -> None:
    from pipeline.io.mlflow_service import client_for
    from pipeline.stages.track import run_track

    cfg, first = tracked
    second = run_track(cfg)
    print(f"\nre-run timings (s): {second['timings']}")
    assert second["run_id"] == first["run_id"] and second["reused_run"]
    assert second["model_id"] == first["model_id"]
    client = client_for(cfg)
    assert len(client.get_metric_history(first["run_id"], "val_loss_branch1")) == 2
    assert len(client.get_run(first["run_id"]).inputs.dataset_inputs) == 3
    # a changed config starts a new run
    third = run_track(cfg.with_overrides({"train.lr": 0.001}))
    assert third["run_id"] != first["run_id"] and not third["reused_run"]


def test_airflow_context_is_tagged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.io.mlflow_service import client_for
    from pipeline.stages.track import run_track

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("AIRFLOW_CTX_DAG_ID", "skin_twin")
    monkeypatch.setenv("AIRFLOW_CTX_DAG_RUN_ID", "manual__2026-01-01")
    monkeypatch.setenv("AIRFLOW_CTX_TRY_NUMBER", "2")
    cfg = make_cfg(tmp_path)
    make_run(cfg, seed=2)
    res = run_track(cfg, try_number=3)  # explicit wins over env
    run = client_for(cfg).get_run(res["run_id"])
    assert run.data.tags["skin_twin.airflow.dag_id"] == "skin_twin"
    assert run.data.tags["skin_twin.airflow.dag_run_id"] == "manual__2026-01-01"
    assert run.data.tags["skin_twin.airflow.try_number"] == "3"
    assert run.info.run_name == "skin_twin-manual__2026-01-01"


def test_missing_inputs_are_a_pipeline_error(tmp_path: Path) -> None:
    from pipeline.errors import PipelineError
    from pipeline.stages.track import run_track

    with pytest.raises(PipelineError, match="select stage"):
        run_track(make_cfg(tmp_path))


def test_client_for_does_not_leak_the_store_into_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's set_tracking_uri exports MLFLOW_TRACKING_URI; a later config (or a child process) must
    still get its own store, not the one of the previous call."""
    import os

    from pipeline.io.mlflow_service import client_for, resolve_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    first = make_cfg(tmp_path, name="a", tracking_uri=f"sqlite:///{tmp_path / 'one.db'}")
    second = make_cfg(tmp_path, name="b", tracking_uri=f"sqlite:///{tmp_path / 'two.db'}")
    client_for(first).search_experiments()
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
    assert resolve_tracking_uri(second).endswith("two.db")
