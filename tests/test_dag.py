"""The Airflow DAG ``skin_twin``: integrity (parse, structure, retries, GPU routing, light parse),
the orchestration glue, and end-to-end ``dag.test()`` runs on tiny data (success and a run whose
data fails validation).

Airflow runs in subprocesses with a temp AIRFLOW_HOME (SQLite metadata DB, ``airflow db migrate``
once per session); the pytest process never configures Airflow itself.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from airflow_env import (
    DAG_ID,
    HEAVY_MODULES,
    ROOT,
    airflow_cli,
    airflow_env,
    dag_test,
    describe_dag,
    run_overrides,
    write_bad_imagefolder,
    write_params,
)

from pipeline.app import orchestration as orch
from pipeline.app.params import load_params
from pipeline.config import ConfigError, load_config
from pipeline.io.digests import path_sha256

EXPECTED_CHAIN = ["ingest", "validate", "augment", "pairs", "train", "select", "evaluate", "track", "register"]


# --------------------------------------------------------------------------- orchestration glue


def test_run_dir_names_are_safe_deterministic_and_unique() -> None:
    a = orch.sanitize_run_id("manual__2025-01-01T00:00:00+00:00")
    assert a == orch.sanitize_run_id("manual__2025-01-01T00:00:00+00:00")
    assert all(c.isalnum() or c in "._-" for c in a)
    # Two ids that sanitise to the same text still get different folders.
    assert orch.sanitize_run_id("run/1") != orch.sanitize_run_id("run:1")
    assert "/" not in orch.sanitize_run_id("../../etc/passwd") and not orch.sanitize_run_id("../x").startswith(".")


def test_run_config_per_run_folder_params_and_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = write_params(tmp_path / "cfg" / "params.yaml", {"runs_dir": "myruns"})
    monkeypatch.setenv(orch.PARAMS_ENV, str(params))
    cfg = orch.build_run_config(
        "manual__1",
        {"data_source": "imagefolder", "data_root": "data/x", "overrides": {"train.epochs": 1}},
    )
    run_dir = Path(cfg.paths.work_dir)
    assert run_dir == (tmp_path / "cfg" / "myruns" / orch.sanitize_run_id("manual__1")).resolve()
    assert cfg.data.source == "imagefolder"
    assert Path(cfg.data.root) == (tmp_path / "cfg" / "data" / "x").resolve()  # relative to the params file
    assert cfg.train.epochs == 1
    other = orch.build_run_config("manual__2", {})
    assert Path(other.paths.work_dir) != run_dir
    assert other.train.epochs == load_config(params).train.epochs
    # Raw-data Asset event extras choose the data when params do not.
    trig = orch.build_run_config("a", {}, trigger_extras=[{"data_root": "/d", "data_source": "ham10000"}])
    assert (trig.data.source, trig.data.root) == ("ham10000", "/d")
    for bad in ({"paths.work_dir": "/elsewhere"}, {"airflow.retries": 0}, {"train.epochs": "many"}):
        with pytest.raises(ConfigError):
            orch.build_run_config("x", {"overrides": bad})


@pytest.mark.parametrize(
    "key",
    ["registry.floor", "registry.margin", "registry.model_name", "mlflow.tracking_uri", "mlflow.artifact_root",
     "paths.work_dir", "airflow.gpu_pool", "validate.min_width", "evaluate.batch_size", "registry", "data",
     "data.split.train", " registry.floor "],
)  # fmt: skip
def test_run_overrides_outside_the_allow_list_are_refused_naming_the_key(
    key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(orch.PARAMS_ENV, str(write_params(tmp_path / "params.yaml", {"runs_dir": "runs"})))
    with pytest.raises(ConfigError, match=rf"params\.overrides: {key.strip()} may not be set per run"):
        orch.build_run_config("r", {"overrides": {key: 0, "train.epochs": 1}})


def test_run_overrides_allow_data_and_training_hyper_parameters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(orch.PARAMS_ENV, str(write_params(tmp_path / "params.yaml", {"runs_dir": "runs"})))
    allowed = {
        "data.source": "imagefolder", "data.root": "imgs", "seed": 7, "synthetic.images_per_class": 9,
        "augment.copies": 1, "augment.max_copies": 1, "pairs.epochs": 3, "model.dropout": 0.2, "loss.gamma": 1.0,
        "train.epochs": 3, "train.lr": 0.01, "select.decision_rule": "balanced", "select.tta": "flips",
    }  # fmt: skip
    cfg = orch.build_run_config("r", {"overrides": allowed})
    assert (cfg.data.source, cfg.seed, cfg.train.lr, cfg.loss.gamma) == ("imagefolder", 7, 0.01, 1.0)
    assert (cfg.select.decision_rule, cfg.select.tta) == ("balanced", "flips")
    assert cfg.data.root == str((tmp_path / "imgs").resolve())  # relative to the params file's folder
    assert all(orch.overridable(k) for k in allowed)


def test_relative_paths_resolve_against_the_params_folder_not_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker or a `lineage` call started elsewhere reads the same store (no new empty one)."""
    folder = tmp_path / "project"
    params = write_params(
        folder / "params.yaml", {"runs_dir": "runs"},
        mlflow={"tracking_uri": "sqlite:///mlflow/mlflow.db", "artifact_root": "mlflow/artifacts"},
        data={"root": "../data/x", "csv": "gt.csv", "source": "imagefolder"},
    )  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv(orch.PARAMS_ENV, str(params))
    for cfg in (load_params(params), orch.load_base_config(), orch.build_run_config("r", {})):
        assert cfg.mlflow.tracking_uri == f"sqlite:///{folder / 'mlflow' / 'mlflow.db'}"
        assert cfg.mlflow.artifact_root == str(folder / "mlflow" / "artifacts")
        assert cfg.data.root == str(tmp_path / "data" / "x") and cfg.data.csv == str(folder / "gt.csv")
        assert cfg.airflow.runs_dir == str(folder / "runs")
    from pipeline.io.mlflow_service import artifact_location, resolve_tracking_uri

    cfg = load_params(params)
    assert resolve_tracking_uri(cfg) == f"sqlite:///{folder / 'mlflow' / 'mlflow.db'}"
    assert artifact_location(cfg, resolve_tracking_uri(cfg)) == (folder / "mlflow" / "artifacts").as_uri()
    assert not (elsewhere / "mlflow").exists(), "a store was created below the current directory"
    # CLI --set values are relative to the params file's folder too; absolute ones stay.
    assert load_params(params, ["data.root=imgs"]).data.root == str(folder / "imgs")
    assert load_params(params, ["mlflow.tracking_uri=sqlite:////abs/m.db"]).mlflow.tracking_uri == "sqlite:////abs/m.db"


def test_frozen_run_config_wins_over_later_params_edits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = write_params(tmp_path / "params.yaml", {"runs_dir": str(tmp_path / "runs")})
    monkeypatch.setenv(orch.PARAMS_ENV, str(params))
    cfg = orch.build_run_config("r1", {"overrides": {"train.epochs": 3}})
    orch.freeze_run_config(cfg, "r1", {})
    assert orch.run_config("r1", {}).train.epochs == 3  # frozen copy, not the params file
    assert orch.run_config("r1", {}, fresh=True).train.epochs != 3 or load_config(params).train.epochs == 3


def test_digests_of_files_and_folders(tmp_path: Path) -> None:
    d = tmp_path / "model"
    d.mkdir()
    (d / "a.bin").write_bytes(b"abc")
    (d / "sub").mkdir()
    (d / "sub" / "b.json").write_text("{}")
    first = path_sha256(d)
    (d / ".tmp.partial").write_bytes(b"ignored")  # atomic-write temporaries do not count
    assert path_sha256(d) == first
    (d / "a.bin").write_bytes(b"abd")
    assert path_sha256(d) != first
    assert path_sha256(d / "a.bin") == path_sha256(d / "a.bin") and len(path_sha256(d / "a.bin")) == 64
    assert path_sha256(tmp_path / "missing") is None
    summary = {"run_id": "r", "outputs": {"metrics": str(tmp_path / "m.json")}, "digests": {}, "result": {"n": 1}}
    (tmp_path / "m.json").write_text(json.dumps({"balanced_accuracy": 0.5, "per_class": {"nv": 1}}))
    extra = orch.asset_extra("evaluate", summary)
    assert extra["metrics"] == {"balanced_accuracy": 0.5} and extra["run_id"] == "r"
    json.dumps(extra)  # JSON-able


def test_bad_data_fails_fast_without_retry(tmp_path: Path) -> None:
    """A PipelineError (e.g. ValidationFailed) becomes AirflowFailException: no retries on bad data."""
    script = f"""
import os
os.environ["SKIN_TWIN_PARAMS"] = {str(write_params(tmp_path / "params.yaml", {"runs_dir": str(tmp_path / "runs")}))!r}
from pipeline.app import orchestration as orch
from pipeline.errors import ValidationFailed
from airflow.sdk.exceptions import AirflowFailException
def boom(cfg):
    raise ValidationFailed("3 rows failed expect_column_values_to_be_in_set(label)")
orch._stage_fn = lambda name: boom
try:
    orch.run_stage("validate", "r1", {{}})
except AirflowFailException as exc:
    assert "ValidationFailed" in str(exc), exc
    print("FAILED_FAST")
"""
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path / "airflow_home")}
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "FAILED_FAST" in proc.stdout, proc.stdout + proc.stderr


def test_make_run_progress_lines_and_terminal_status_line() -> None:
    from pipeline.app.localrun import Progress

    for tty in (False, True):
        out = io.StringIO()
        p = Progress(out, tty=tty)
        p.event({"event": "start", "tasks": ["ingest", "train"]})
        p.event({"event": "running", "task": "ingest", "try_number": 1})
        p.event({"event": "success", "task": "ingest"})
        p.event({"event": "running", "task": "train", "try_number": 2})
        p.event({"event": "failed", "task": "train", "error": "CUDA out of memory"})
        p.close()
        text = out.getvalue()
        lines = [ln.split("\r")[-1] for ln in text.split("\n") if "[skin-twin]" in ln]
        assert [ln.split()[2:4] for ln in lines] == [
            ["DAG", "with"], ["ingest", "started"], ["ingest", "success"], ["train", "started"], ["train", "FAILED"]
        ], text
        assert "(try 2)" in lines[3] and "CUDA out of memory" in lines[4] and "[1/2]" in lines[2]
        assert ("\r" in text and "1/2 tasks" in text) == tty  # the status line only on a terminal


def test_make_ui_opens_the_project_dags_without_examples(tmp_path: Path) -> None:
    """The printed UI command: Airflow standalone on make run's DB, this project's DAG folder, no
    example DAGs (the DAG would otherwise show up stale next to the examples)."""
    from pipeline.app.localrun import airflow_env, ui_command

    argv, env = ui_command(tmp_path / "home", ROOT / "params.yaml", 8123)
    assert argv[-1] == "standalone" and Path(argv[0]).name == "airflow"
    assert env == {**airflow_env(tmp_path / "home", ROOT / "params.yaml"), "AIRFLOW__API__PORT": "8123",
                   "AIRFLOW__API_AUTH__JWT_SECRET": env["AIRFLOW__API_AUTH__JWT_SECRET"]}  # fmt: skip
    assert env["AIRFLOW__CORE__DAGS_FOLDER"] == str(ROOT / "dags")
    assert env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "False"
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == f"sqlite:///{tmp_path / 'home' / 'airflow.db'}"
    assert (ROOT / "Makefile").read_text().count("-m pipeline.app.localrun ui") == 1


# --------------------------------------------------------------------------- DAG integrity


@pytest.fixture(scope="module")
def described(tmp_path_factory: pytest.TempPathFactory) -> dict:
    home = tmp_path_factory.mktemp("airflow_parse")
    return describe_dag(airflow_env(home, params=ROOT / "params.yaml"))


def test_dag_imports_without_errors(described: dict) -> None:
    assert described["import_errors"] == {}
    assert DAG_ID in described["dags"], described["_log_tail"]


def test_dag_tasks_and_dependencies(described: dict) -> None:
    tasks = described["dags"][DAG_ID]["tasks"]
    assert sorted(tasks) == sorted(EXPECTED_CHAIN)
    for prev, cur in zip(EXPECTED_CHAIN, EXPECTED_CHAIN[1:]):
        assert tasks[cur]["upstream"] == [prev], (cur, tasks[cur]["upstream"])
    assert tasks["ingest"]["upstream"] == []


def test_every_task_retries_with_exponential_backoff(described: dict) -> None:
    af = load_config(ROOT / "params.yaml").airflow
    dag = described["dags"][DAG_ID]
    assert dag["max_active_runs"] == af.max_active_runs
    assert dag["catchup"] is False
    for tid, t in dag["tasks"].items():
        assert t["retries"] == af.retries, tid
        assert t["retry_delay_s"] == af.retry_delay_s, tid
        assert t["backoff"] and float(t["backoff"]) > 1, tid


def test_train_routes_to_gpu_queue_and_pool(described: dict) -> None:
    af = load_config(ROOT / "params.yaml").airflow
    tasks = described["dags"][DAG_ID]["tasks"]
    assert (tasks["train"]["queue"], tasks["train"]["pool"], tasks["train"]["pool_slots"]) == (af.gpu_queue, af.gpu_pool, 1)
    for tid, t in tasks.items():
        if tid != "train":
            assert t["queue"] != af.gpu_queue and t["pool"] != af.gpu_pool, tid


def test_outputs_are_assets_and_run_params_exist(described: dict) -> None:
    dag = described["dags"][DAG_ID]
    outlets = {tid: t["outlets"] for tid, t in dag["tasks"].items() if t["outlets"]}
    # The model Asset comes after the champion gate (register), never before it (select).
    assert outlets == {
        "validate": ["skin_twin.validated_manifest"],
        "evaluate": ["skin_twin.metrics"],
        "register": ["skin_twin.model"],
    }
    assert set(dag["params"]) == {"data_source", "data_root", "data_csv", "overrides"}
    assert dag["params"]["overrides"] == {}


def test_parsing_the_dag_is_light(described: dict) -> None:
    assert described["preloaded_heavy"] == [], "airflow itself loaded a heavy module; the check below is void"
    assert described["heavy_imported_by_dag"] == []
    assert described["heavy_after_parse"] == [], f"parsing imported {described['heavy_after_parse']} ({HEAVY_MODULES})"
    assert described["parse_s"] < 5.0, f"DAG folder took {described['parse_s']:.2f}s to parse"


@pytest.mark.parametrize(
    ("airflow", "timetable", "assets"),
    [
        ({"schedule": "0 3 * * 1"}, "CronTriggerTimetable", []),
        ({"schedule_on_asset": True}, "AssetTriggeredTimetable", ["skin_twin.raw_data"]),
        ({"schedule_on_asset": True, "schedule": "0 3 * * 1"}, "AssetOrTimeSchedule", ["skin_twin.raw_data"]),
    ],
)
def test_schedule_from_config(tmp_path: Path, airflow: dict, timetable: str, assets: list[str]) -> None:
    params = write_params(tmp_path / "params.yaml", {**airflow, "max_active_runs": 3, "retries": 1})
    out = describe_dag(airflow_env(tmp_path / "home", params=params))
    dag = out["dags"][DAG_ID]
    assert dag["timetable"] == timetable
    assert dag["asset_names"] == assets
    assert dag["max_active_runs"] == 3
    assert {t["retries"] for t in dag["tasks"].values()} == {1}


# --------------------------------------------------------------------------- end to end (dag.test)


@pytest.fixture(scope="session")
def dagtest_home(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A migrated temp AIRFLOW_HOME (SQLite) + params file whose runs go below the temp folder."""
    base = tmp_path_factory.mktemp("dagtest")
    # One MLflow store for all DAG tests of the session (the deployment's, in the params file): a
    # failed run must not touch the registry.
    mlflow_dir = base / "mlflow"
    mlflow_dir.mkdir(parents=True, exist_ok=True)
    params = write_params(
        base / "params.yaml", {"runs_dir": str(base / "runs"), "retry_delay_s": 1},
        mlflow={"tracking_uri": f"sqlite:///{mlflow_dir / 'mlflow.db'}", "artifact_root": str(mlflow_dir / "artifacts")},
    )  # fmt: skip
    env = airflow_env(base / "airflow_home", params=params)
    airflow_cli(env, "db", "migrate", timeout=600)
    return {"env": env, "params": params, "base": base, "mlflow": mlflow_dir}


def _tiny_conf(tiny_overrides: dict, **params) -> dict:
    return {"overrides": run_overrides(tiny_overrides), **params}


def _registry_state(mlflow_dir: Path, model_name: str) -> dict:
    """Versions and aliases of the registered model (empty when the store or model does not exist)."""
    db = mlflow_dir / "mlflow.db"
    if not db.exists():
        return {"versions": [], "aliases": {}}
    from mlflow.exceptions import MlflowException

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}", registry_uri=f"sqlite:///{db}")
    try:
        model = client.get_registered_model(model_name)
    except MlflowException:
        return {"versions": [], "aliases": {}}
    versions = client.search_model_versions(f"name='{model_name}'")
    return {
        "versions": sorted(int(v.version) for v in versions),
        "aliases": dict(model.aliases or {}),
        "tags": {int(v.version): dict(v.tags) for v in versions},
        "run_ids": {int(v.version): v.run_id for v in versions},
        "run_tags": {int(v.version): dict(client.get_run(v.run_id).data.tags) for v in versions if v.run_id},
    }


def _run_dir(home: dict, run_id: str) -> Path:
    return orch.run_dir_for(run_id, load_params(home["params"]))


def _missing_stage_modules() -> list[str]:
    from pipeline.app.cli import STAGES

    names = ("synthesize", "ingest", "validate", "augment", "pairs", "train", "select", "evaluate", "track", "register")
    return [STAGES[n].target for n in names if not (ROOT / (STAGES[n].target.split(":")[0].replace(".", "/") + ".py")).exists()]


@pytest.mark.slow
def test_dag_end_to_end_registers_a_model_with_lineage(dagtest_home: dict, tiny_overrides: dict) -> None:
    missing = _missing_stage_modules()
    assert not missing, f"stage modules not written yet: {missing}"
    conf = _tiny_conf(tiny_overrides)
    # Through make run's runner: dag.test() with the task listener reporting progress live.
    from pipeline.app.localrun import run_dag

    printed = io.StringIO()
    log = dagtest_home["base"] / "make-run.log"
    out = run_dag(dagtest_home["env"], json.dumps(conf), log, out=printed, tty=False)
    assert out is not None and out["state"] == "success", printed.getvalue() + log.read_text()[-6000:]
    assert out["tis"] == {t: "success" for t in EXPECTED_CHAIN}
    lines = [ln.split()[2:4] for ln in printed.getvalue().splitlines() if ln.split()[2:3] != ["DAG"]]
    assert lines == [[t, e] for t in EXPECTED_CHAIN for e in ("started", "success")], printed.getvalue()
    assert "\r" not in printed.getvalue()  # no status line / progress bar when not on a terminal
    assert "it/s" not in log.read_text()  # and no tqdm bars in the log file either

    run_dir = _run_dir(dagtest_home, out["run_id"])
    layout_metrics = run_dir / "reports" / "metrics.json"
    assert layout_metrics.is_file(), sorted(p.name for p in run_dir.iterdir())
    frozen = json.loads((run_dir / orch.RUN_CONFIG_FILE).read_text())
    assert frozen["run_id"] == out["run_id"] and frozen["config"]["paths"]["work_dir"] == str(run_dir)
    assert frozen["config"]["train"]["epochs"] == tiny_overrides["train.epochs"]

    cfg = load_config(dagtest_home["params"])
    state = _registry_state(dagtest_home["mlflow"], cfg.registry.model_name)
    assert state["versions"], "no model version registered"
    newest = max(state["versions"])
    # Lineage of the newest version: its MLflow run carries code, params, data and Airflow run.
    tags = {**state["run_tags"].get(newest, {}), **state["tags"][newest]}
    assert tags.get("skin_twin.params_digest") == frozen["config_digest"], tags
    assert tags.get("skin_twin.git_commit"), tags
    assert any(k.startswith("skin_twin.data_digest.") for k in tags), tags
    assert tags.get("skin_twin.airflow.dag_id") == DAG_ID, tags
    assert tags.get("skin_twin.airflow.dag_run_id") == out["run_id"], tags
    record = json.loads((run_dir / "reports" / "mlflow.json").read_text())
    assert state["run_ids"][newest] in json.dumps(record), record


@pytest.mark.slow
def test_dag_stops_on_bad_data_before_augmentation(dagtest_home: dict, tiny_overrides: dict, tmp_path: Path) -> None:
    missing = [m for m in _missing_stage_modules() if m.split(":")[0] in ("pipeline.stages.ingest", "pipeline.stages.validate")]
    assert not missing, f"stage modules not written yet: {missing}"
    cfg = load_config(dagtest_home["params"])
    before = _registry_state(dagtest_home["mlflow"], cfg.registry.model_name)
    bad = write_bad_imagefolder(tmp_path / "bad_data")
    conf = _tiny_conf(tiny_overrides, data_source="imagefolder", data_root=str(bad))
    out = dag_test(dagtest_home["env"], conf, timeout=600)

    assert out["state"] == "failed", json.dumps(out["tis"], indent=1) + out["_log_tail"]
    tis = out["tis"]
    assert tis["ingest"]["state"] == "success", tis
    assert tis["validate"]["state"] == "failed", tis
    assert tis["validate"]["try_number"] == 1, "bad data must fail at once, not be retried"
    for t in EXPECTED_CHAIN[2:]:
        assert tis[t]["state"] == "upstream_failed", (t, tis[t])
    run_dir = _run_dir(dagtest_home, out["run_id"])
    assert not (run_dir / "data" / "validated.parquet").exists()
    assert not (run_dir / "data" / "augmented").exists()
    assert not (run_dir / "models").exists()
    assert _registry_state(dagtest_home["mlflow"], cfg.registry.model_name) == before, "registry changed"
