"""Shared helpers for the Airflow tests: a temp AIRFLOW_HOME, its environment, the ``airflow`` CLI,
long-running Airflow processes started in their own process group and stopped by group.

Every Airflow call runs in a subprocess with its own environment, so the pytest process never
imports (and configures) Airflow itself.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DAGS = ROOT / "dags"
VENV_BIN = Path(sys.executable).parent
DAG_ID = "skin_twin"
HEAVY_MODULES = ("torch", "torchvision", "pandas", "mlflow", "great_expectations")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_params(target: Path, airflow: dict[str, Any] | None = None, **sections: dict[str, Any]) -> Path:
    """A copy of the project's params.yaml with ``airflow`` section values (and those of other
    ``sections``, e.g. ``mlflow={...}``) replaced."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    for name, values in {"airflow": airflow or {}, **sections}.items():
        raw.setdefault(name, {}).update(values)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return target


def run_overrides(tiny: dict[str, Any]) -> dict[str, Any]:
    """tiny_overrides as run-time ``overrides``: only the keys a run may set (data, training
    hyper-parameters). The DAG sets paths.work_dir per run; the MLflow store is the deployment's
    (params file), see :func:`tiny_mlflow`."""
    from pipeline.app.orchestration import overridable

    return {k: v for k, v in tiny.items() if overridable(k)}


def tiny_mlflow(tiny: dict[str, Any]) -> dict[str, Any]:
    """The ``mlflow`` section of tiny_overrides, for :func:`write_params`."""
    return {k.split(".", 1)[1]: v for k, v in tiny.items() if k.startswith("mlflow.")}


def write_bad_imagefolder(root: Path) -> Path:
    """An imagefolder data set, 6 valid RGB images per class plus one corrupt 'image'."""
    import random

    from PIL import Image

    from pipeline.labels import CLASSES

    rnd = random.Random(0)
    for cls in CLASSES:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(6):
            colour = tuple(rnd.randrange(256) for _ in range(3))
            Image.new("RGB", (48, 48), colour).save(root / cls / f"{cls}_{i}.png")
    (root / "nv" / "nv_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    return root


def airflow_env(home: Path, params: Path | None = None, **settings: str) -> dict[str, str]:
    """Environment for Airflow subprocesses with AIRFLOW_HOME=home and this project's dags folder.

    ``settings`` are extra variables (e.g. ``AIRFLOW__CORE__EXECUTOR="CeleryExecutor"``).
    Inherited ``AIRFLOW__*`` and ``MLFLOW_TRACKING_URI`` variables are dropped.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW") and k != "MLFLOW_TRACKING_URI"}
    home.mkdir(parents=True, exist_ok=True)
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p),
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
            "AIRFLOW__API__SECRET_KEY": secrets.token_hex(16),
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            "GX_ANALYTICS_ENABLED": "false",
            "DVC_NO_ANALYTICS": "1",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if params is not None:
        env["SKIN_TWIN_PARAMS"] = str(params)
    env.update(settings)
    return env


def airflow_cli(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(VENV_BIN / "airflow"), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise RuntimeError(f"airflow {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def python_json(env: dict[str, str], script: str, *args: str, timeout: float = 900) -> dict[str, Any]:
    """Run ``script`` with the venv python; it prints one line ``RESULT_JSON:{...}``; return that."""
    proc = subprocess.run(
        [sys.executable, "-c", script, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT_JSON:"):
            out = json.loads(line[len("RESULT_JSON:") :])
            out["_log_tail"] = (proc.stdout + proc.stderr)[-6000:]
            return out
    raise RuntimeError(f"no result from subprocess (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")


DESCRIBE_DAG = r"""
import json, sys, time
import airflow.sdk
from airflow.dag_processing.dagbag import DagBag
heavy = sys.argv[2:]
preloaded = [m for m in heavy if m in sys.modules]
before = set(sys.modules)
t0 = time.perf_counter()
bag = DagBag(dag_folder=sys.argv[1])
parse_s = time.perf_counter() - t0
new = set(sys.modules) - before
def _asset_names(cond):
    if cond is None:
        return []
    if hasattr(cond, "objects"):
        return [n for o in cond.objects for n in _asset_names(o)]
    return [cond.name] if hasattr(cond, "name") else []
out = {"import_errors": {str(k): str(v) for k, v in bag.import_errors.items()}, "parse_s": parse_s,
       "preloaded_heavy": preloaded, "heavy_after_parse": [m for m in heavy if m in sys.modules],
       "heavy_imported_by_dag": sorted({m.split(".")[0] for m in new} & set(heavy)), "dags": {}}
for dag_id, dag in bag.dags.items():
    out["dags"][dag_id] = {
        "max_active_runs": dag.max_active_runs, "catchup": dag.catchup,
        "timetable": type(dag.timetable).__name__, "timetable_summary": getattr(dag.timetable, "summary", None),
        "asset_names": sorted(_asset_names(getattr(dag.timetable, "asset_condition", None))),
        "params": {k: dag.params.get_param(k).value for k in dag.params},
        "tasks": {t.task_id: {"upstream": sorted(t.upstream_task_ids), "retries": t.retries,
                              "retry_delay_s": t.retry_delay.total_seconds(),
                              "backoff": t.retry_exponential_backoff, "queue": t.queue, "pool": t.pool,
                              "pool_slots": t.pool_slots, "outlets": [a.name for a in t.outlets]}
                  for t in dag.tasks},
    }
print("RESULT_JSON:" + json.dumps(out, default=str))
"""


def describe_dag(env: dict[str, str]) -> dict[str, Any]:
    """Parse the dags folder in a fresh interpreter; structure, import errors, heavy imports."""
    return python_json(env, DESCRIBE_DAG, str(DAGS), *HEAVY_MODULES, timeout=180)


DAG_TEST = r"""
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
assert not bag.import_errors, bag.import_errors
dag = bag.dags[sys.argv[2]]
dr = dag.test(run_conf=json.loads(sys.argv[3]))
tis = {ti.task_id: {"state": str(ti.state.value if hasattr(ti.state, "value") else ti.state),
                    "try_number": ti.try_number}
       for ti in dr.get_task_instances()}
print("RESULT_JSON:" + json.dumps({"run_id": dr.run_id, "state": str(dr.state.value if hasattr(dr.state, "value") else dr.state), "tis": tis}))
"""


def dag_test(env: dict[str, str], conf: dict[str, Any], timeout: float = 1200) -> dict[str, Any]:
    """``dag.test(run_conf=conf)`` in a subprocess; run id, run state and task states."""
    return python_json(env, DAG_TEST, str(DAGS), DAG_ID, json.dumps(conf), timeout=timeout)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(encoding="utf-8", errors="replace")[-n:]
        except OSError:
            return ""


@dataclass
class ProcessGroup:
    """Long-running processes, each in its own session/process group; stop() kills them by group."""

    log_dir: Path
    procs: list[Proc] = field(default_factory=list)

    def start(self, name: str, args: list[str], env: dict[str, str]) -> Proc:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        fh = log.open("w", encoding="utf-8")
        popen = subprocess.Popen(
            args, env=env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        fh.close()
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def check_alive(self) -> None:
        for p in self.procs:
            if p.popen.poll() is not None:
                raise RuntimeError(f"{p.name} exited with {p.popen.returncode}:\n{p.tail()}")

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM every group, wait, then SIGKILL what is left (Celery/uvicorn children included)."""
        for p in reversed(self.procs):
            _signal_group(p.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in reversed(self.procs):
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in self.procs:
            _signal_group(p.popen.pid, signal.SIGKILL)  # leftovers in the group (task children)
            try:
                p.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def logs(self, n: int = 3000) -> str:
        return "\n".join(f"===== {p.name} (rc={p.popen.poll()}) =====\n{p.tail(n)}" for p in self.procs)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
