"""Run the Airflow DAG end to end on this machine: ``python -m pipeline.app.localrun``.

This is what ``make run`` calls. It uses the embedded defaults: an Airflow home in
``./airflow_home`` with a SQLite metadata DB, the local MLflow store from ``params.yaml`` and the
project's synthetic data. It migrates the Airflow DB, runs ``dag.test()`` (all tasks in-process,
the GPU queue ignored, CPU fallback), checks the DagRun's state (``dag.test()`` does not raise on
failure) and prints the registered model version and how to open the Airflow and MLflow UIs.

Options: ``--conf JSON`` (run-time params, e.g. ``'{"overrides": {"train.epochs": 2}}'``),
``--params PATH``. Exit 0 only when the DagRun succeeded.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_DAG_TEST = r"""
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
if bag.import_errors:
    print("DAG import errors: " + json.dumps(bag.import_errors), file=sys.stderr)
    sys.exit(3)
dag = bag.get_dag(sys.argv[2])
dr = dag.test(run_conf=json.loads(sys.argv[3]))
state = str(getattr(dr.state, "value", dr.state))
tis = {ti.task_id: str(getattr(ti.state, "value", ti.state)) for ti in dr.get_task_instances()}
print("RESULT_JSON:" + json.dumps({"run_id": dr.run_id, "state": state, "tis": tis}))
"""


def airflow_env(home: Path, params: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__")}
    bin_dir = str(Path(sys.executable).parent)
    env.update(
        {
            "PATH": bin_dir + os.pathsep + env.get("PATH", ""),
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__API_AUTH__JWT_SECRET": env.get("AIRFLOW__API_AUTH__JWT_SECRET", secrets.token_hex(32)),
            "SKIN_TWIN_PARAMS": str(params),
            "GX_ANALYTICS_ENABLED": "false",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        }
    )
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.app.localrun", description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--conf", default="{}", help="DAG run params as JSON")
    ap.add_argument("--airflow-home", default=str(ROOT / "airflow_home"))
    ns = ap.parse_args(argv)
    home = Path(ns.airflow_home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    params = Path(ns.params).resolve()
    env = airflow_env(home, params)

    print(f"[skin-twin] Airflow home {home} (SQLite metadata DB); migrating ...", flush=True)
    mig = subprocess.run(["airflow", "db", "migrate"], env=env, cwd=ROOT, capture_output=True, text=True)
    if mig.returncode != 0:
        print(mig.stdout[-3000:] + mig.stderr[-3000:], file=sys.stderr)
        print("error: airflow db migrate failed", file=sys.stderr)
        return 1

    from pipeline.app.orchestration import DAG_ID, load_base_config

    af = load_base_config(params).airflow
    pool = subprocess.run(
        ["airflow", "pools", "set", af.gpu_pool, str(af.gpu_pool_slots), "skin-twin GPU jobs"],
        env=env, cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    if pool.returncode != 0:
        print(pool.stdout[-3000:] + pool.stderr[-3000:], file=sys.stderr)
        print(f"error: creating the pool {af.gpu_pool!r} failed", file=sys.stderr)
        return 1

    print(f"[skin-twin] running DAG {DAG_ID} with dag.test() ...", flush=True)
    proc = subprocess.run(
        [sys.executable, "-c", _DAG_TEST, str(ROOT / "dags"), DAG_ID, ns.conf],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT_JSON:"):
            result = json.loads(line[len("RESULT_JSON:") :])
        else:
            print(line)
    if result is None:
        print(f"error: dag.test() did not finish (exit {proc.returncode})", file=sys.stderr)
        return 1
    print(f"[skin-twin] DagRun {result['run_id']}: {result['state']}")
    for task, state in result["tis"].items():
        print(f"    {task:<10} {state}")
    if result["state"] != "success":
        print("error: the DAG run failed; see the task logs above", file=sys.stderr)
        return 1

    from pipeline.app.orchestration import run_dir_for

    cfg = load_base_config(params)
    run_dir = run_dir_for(result["run_id"], cfg)
    record_path = run_dir / "reports" / "mlflow.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    reg = record.get("registry", {})
    metrics_path = run_dir / "reports" / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    uri = cfg.mlflow.tracking_uri
    print()
    print(f"Run folder:        {run_dir}")
    if metrics:
        print(
            f"Test metrics:      balanced_accuracy={metrics.get('balanced_accuracy')} "
            f"accuracy={metrics.get('accuracy')} macro_auc={metrics.get('macro_auc')} "
            f"(selected branch {metrics.get('selected_branch')})"
        )
    if reg:
        print(
            f"Registered model:  {reg.get('model_name', cfg.registry.model_name)} version {reg.get('version')} "
            f"(alias challenger; gate: {reg.get('decision')} - {reg.get('reason', '')}; "
            f"champion is version {reg.get('champion_version')})"
        )
    print(f"MLflow run:        {record.get('run_id')}  (store {uri})")
    print("Open the MLflow UI:   .venv/bin/mlflow ui --backend-store-uri " + uri + " --port 5000")
    print(f"Open the Airflow UI:  AIRFLOW_HOME={home} PATH=.venv/bin:$PATH .venv/bin/airflow standalone")
    print(
        f"Lineage:              .venv/bin/python -m pipeline lineage --model models:/{cfg.registry.model_name}@challenger"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
