"""Run the Airflow DAG end to end on this machine: ``python -m pipeline.app.localrun``.

This is what ``make run`` calls. It uses the embedded defaults: an Airflow home in
``./airflow_home`` with a SQLite metadata DB, the local MLflow store from ``params.yaml`` and the
project's synthetic data. It migrates the Airflow DB, creates the GPU pool, runs ``dag.test()``
(all tasks in-process, the GPU queue ignored, CPU fallback) and checks the DagRun's state
(``dag.test()`` does not raise on failure).

While it runs it prints one line per task start and finish, live (an Airflow task listener in the
``dag.test()`` process reports them through a pipe); on a terminal a status line with the elapsed
time stays below them. The full Airflow and pipeline log goes to
``airflow_home/logs/make-run-<time>.log`` (its tail is printed when the run fails). At the end it
prints the registered model version and the commands that open the Airflow and MLflow UIs.

``python -m pipeline.app.localrun ui`` (``make ui``) starts ``airflow standalone`` on the same
metadata DB with the project's DAG folder and no example DAGs.

Options: ``--conf JSON`` (run-time params, e.g. ``'{"overrides": {"train.epochs": 2}}'``),
``--params PATH``, ``--airflow-home PATH``. Exit 0 only when the DagRun succeeded.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "[skin-twin]"
DEFAULTS = {"params": ROOT / "params.yaml", "airflow-home": ROOT / "airflow_home"}

# Runs in the dag.test() subprocess. argv: dags folder, dag id, conf JSON, progress pipe fd.
_DAG_TEST = r"""
import json, os, sys, time
from airflow.dag_processing.dagbag import DagBag
from airflow.sdk._shared.listeners import hookimpl
from airflow.sdk.listener import get_listener_manager

events = os.fdopen(int(sys.argv[4]), "w", buffering=1)

def emit(**event):
    events.write(json.dumps({"t": time.time(), **event}) + "\n")

class Progress:
    @hookimpl
    def on_task_instance_running(self, previous_state, task_instance):
        emit(event="running", task=task_instance.task_id, try_number=task_instance.try_number)

    @hookimpl
    def on_task_instance_success(self, previous_state, task_instance):
        emit(event="success", task=task_instance.task_id)

    @hookimpl
    def on_task_instance_failed(self, previous_state, task_instance, error):
        emit(event="failed", task=task_instance.task_id, try_number=task_instance.try_number, error=str(error)[:300])

bag = DagBag(dag_folder=sys.argv[1])
if bag.import_errors:
    emit(event="error", error="DAG import errors: " + json.dumps(bag.import_errors))
    sys.exit(3)
dag = bag.get_dag(sys.argv[2])
emit(event="start", tasks=[t.task_id for t in dag.tasks])
get_listener_manager().add_listener(Progress())
dr = dag.test(run_conf=json.loads(sys.argv[3]))
state = str(getattr(dr.state, "value", dr.state))
tis = {ti.task_id: str(getattr(ti.state, "value", ti.state)) for ti in dr.get_task_instances()}
emit(event="result", run_id=dr.run_id, state=state, tis=tis)
"""


def airflow_env(home: Path, params: Path) -> dict[str, str]:
    """The environment of every Airflow command of ``make run`` and ``make ui``: this project's DAG
    folder, no example DAGs, the SQLite metadata DB in ``home``, every user an admin."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__")}
    bin_dir = str(Path(sys.executable).parent)
    env.update(
        {
            "PATH": bin_dir + os.pathsep + env.get("PATH", ""),
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p),
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__API_AUTH__JWT_SECRET": env.get("AIRFLOW__API_AUTH__JWT_SECRET", secrets.token_hex(32)),
            "SKIN_TWIN_PARAMS": str(params),
            "GX_ANALYTICS_ENABLED": "false",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


class Progress:
    """One line per task start/finish; on a terminal also a status line kept below them."""

    def __init__(self, out: TextIO, tty: bool) -> None:
        self.out, self.tty = out, tty
        self.t0 = time.monotonic()
        self.tasks: list[str] = []
        self.done: set[str] = set()
        self.running: dict[str, float] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        if tty:
            threading.Thread(target=self._tick, daemon=True).start()

    def _elapsed(self) -> str:
        s = int(time.monotonic() - self.t0)
        return f"{s // 60:d}:{s % 60:02d}"

    def _status(self) -> str:
        total = len(self.tasks) or 1
        width = 20
        filled = width * len(self.done) // total
        now = ", ".join(f"{t} {int(time.monotonic() - t0)}s" for t, t0 in self.running.items()) or "waiting"
        return f"  [{'#' * filled}{'.' * (width - filled)}] {len(self.done)}/{len(self.tasks)} tasks  {self._elapsed()}  {now}"

    def _tick(self) -> None:
        while not self.stop.wait(1.0):
            with self.lock:
                self.out.write("\r\033[K" + self._status())
                self.out.flush()

    def line(self, text: str) -> None:
        with self.lock:
            if self.tty:
                self.out.write("\r\033[K")
            self.out.write(f"{PREFIX} {self._elapsed():>5}  {text}\n")
            if self.tty:
                self.out.write(self._status())
            self.out.flush()

    def event(self, ev: dict[str, Any]) -> None:
        kind, task = ev.get("event"), ev.get("task", "")
        if kind == "start":
            self.tasks = list(ev["tasks"])
            self.line(f"DAG with {len(self.tasks)} tasks: {' -> '.join(self.tasks)}")
        elif kind == "running":
            self.running[task] = time.monotonic()
            retry = f" (try {ev['try_number']})" if (ev.get("try_number") or 1) > 1 else ""
            self.line(f"{task:<9} started{retry}")
        elif kind in ("success", "failed"):
            secs = time.monotonic() - self.running.pop(task, time.monotonic())
            if kind == "success":
                self.done.add(task)
                self.line(f"{task:<9} success  {secs:6.1f} s   [{len(self.done)}/{len(self.tasks)}]")
            else:
                self.line(f"{task:<9} FAILED   {secs:6.1f} s   {ev.get('error', '')}")
        elif kind == "error":
            self.line(f"error: {ev.get('error')}")

    def close(self) -> None:
        self.stop.set()
        if self.tty:
            with self.lock:
                self.out.write("\r\033[K")
                self.out.flush()


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_dag(env: dict[str, str], conf: str, log_path: Path, out: TextIO = sys.stdout, tty: bool | None = None) -> dict | None:
    """``dag.test()`` in a subprocess, its output to ``log_path``, task events printed live."""
    from pipeline.app.orchestration import DAG_ID

    tty = out.isatty() if tty is None else tty
    progress = Progress(out, tty)
    r, w = os.pipe()
    with log_path.open("w", encoding="utf-8") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", _DAG_TEST, str(ROOT / "dags"), DAG_ID, conf, str(w)],
            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, pass_fds=(w,),
        )  # fmt: skip
    os.close(w)
    result = None
    try:
        with os.fdopen(r, encoding="utf-8") as events:
            for raw in events:
                try:
                    ev = json.loads(raw)
                except ValueError:
                    continue
                if ev.get("event") == "result":
                    result = ev
                else:
                    progress.event(ev)
        proc.wait()
    finally:
        progress.close()
        if proc.poll() is None:
            proc.kill()
    return result


def _run(ns: argparse.Namespace) -> int:
    home = Path(ns.airflow_home).resolve()
    (home / "logs").mkdir(parents=True, exist_ok=True)
    params = Path(ns.params).resolve()
    env = airflow_env(home, params)

    print(f"{PREFIX} Airflow home {home} (SQLite metadata DB); migrating ...", flush=True)
    mig = subprocess.run(["airflow", "db", "migrate"], env=env, cwd=ROOT, capture_output=True, text=True)
    if mig.returncode != 0:
        print(mig.stdout[-3000:] + mig.stderr[-3000:], file=sys.stderr)
        print("error: airflow db migrate failed", file=sys.stderr)
        return 1

    from pipeline.app.orchestration import DAG_ID, TASKS, load_base_config, run_dir_for

    cfg = load_base_config(params)
    af = cfg.airflow
    pool = subprocess.run(
        ["airflow", "pools", "set", af.gpu_pool, str(af.gpu_pool_slots), "skin-twin GPU jobs"],
        env=env, cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    if pool.returncode != 0:
        print(pool.stdout[-3000:] + pool.stderr[-3000:], file=sys.stderr)
        print(f"error: creating the pool {af.gpu_pool!r} failed", file=sys.stderr)
        return 1

    log_path = home / "logs" / f"make-run-{time.strftime('%Y%m%d-%H%M%S')}.log"
    print(f"{PREFIX} running DAG {DAG_ID} with dag.test(); full log: {log_path}", flush=True)
    t0 = time.monotonic()
    result = run_dag(env, ns.conf, log_path)
    if result is None:
        print(_tail(log_path), file=sys.stderr)
        print(f"error: dag.test() did not finish; full log {log_path}", file=sys.stderr)
        return 1
    print(f"{PREFIX} DagRun {result['run_id']}: {result['state']} in {time.monotonic() - t0:.0f} s")
    for task in sorted(result["tis"], key=lambda t: TASKS.index(t) if t in TASKS else len(TASKS)):
        print(f"    {task:<10} {result['tis'][task]}")
    if result["state"] != "success":
        print(_tail(log_path), file=sys.stderr)
        print(f"error: the DAG run failed; full log {log_path}", file=sys.stderr)
        return 1

    run_dir = run_dir_for(result["run_id"], cfg)
    record_path = run_dir / "reports" / "mlflow.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    reg = record.get("registry", {})
    metrics_path = run_dir / "reports" / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.mlflow.tracking_uri
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
    custom = [f"--{k} {v}" for k, v in (("params", params), ("airflow-home", home)) if v != DEFAULTS[k]]
    ui = "make ui" if not custom else f".venv/bin/python -m pipeline.app.localrun ui {' '.join(custom)}"
    params_arg = f" --params {params}" if params != DEFAULTS["params"] else ""
    print(f"Open the MLflow UI:   .venv/bin/mlflow ui --backend-store-uri {uri} --port 5000")
    print(f"Open the Airflow UI:  {ui}   (Airflow standalone on this metadata DB, http://localhost:8080)")
    print(
        f"Lineage:              .venv/bin/python -m pipeline lineage{params_arg} "
        f"--model models:/{cfg.registry.model_name}@challenger"
    )
    return 0


def ui_command(home: Path, params: Path, port: int) -> tuple[list[str], dict[str, str]]:
    """``airflow standalone`` on ``make run``'s metadata DB: project DAG folder, no examples."""
    env = airflow_env(home, params)
    env["AIRFLOW__API__PORT"] = str(port)
    return [shutil.which("airflow", path=env["PATH"]) or "airflow", "standalone"], env


def _ui(ns: argparse.Namespace) -> int:
    argv, env = ui_command(Path(ns.airflow_home).resolve(), Path(ns.params).resolve(), ns.port)
    print(f"{PREFIX} Airflow UI on http://localhost:{ns.port} (DAG folder {ROOT / 'dags'}, every user admin); Ctrl-C stops it")
    sys.stdout.flush()
    os.execvpe(argv[0], argv, env)
    return 0  # pragma: no cover


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.app.localrun", description=__doc__.splitlines()[0])
    ap.add_argument("command", nargs="?", choices=["run", "ui"], default="run", help="run the DAG (default) or open the UI")
    ap.add_argument("--params", default=str(DEFAULTS["params"]))
    ap.add_argument("--conf", default="{}", help="DAG run params as JSON")
    ap.add_argument("--airflow-home", default=str(DEFAULTS["airflow-home"]))
    ap.add_argument("--port", type=int, default=8080, help="ui: api-server port")
    ns = ap.parse_args(argv)
    return _ui(ns) if ns.command == "ui" else _run(ns)


if __name__ == "__main__":
    sys.exit(main())
