"""The deployment, started for real in process mode (what ``make stack-up`` runs), end to end.

``python -m pipeline.app.stack up`` bootstraps and starts MLflow (PostgreSQL backend), the Airflow
api-server, scheduler, dag-processor and triggerer (CeleryExecutor, PostgreSQL metadata DB, Redis
broker), a Celery worker for the default queue and one for the GPU queue, each in its own process
group, and waits until every one answers. Then, through the REST API exactly as README documents
(token from ``POST /auth/token``, ``POST /api/v2/dags/skin_twin/dagRuns``):

1. a tiny run succeeds; ``train`` ran on the GPU-queue worker (queue + pool + the worker's own name
   in XCom), every other task on the default worker; the MLflow server, reached at the URI the
   workers get, holds the run and the registered version (champion); the ``skin_twin.model`` Asset
   event comes from ``register`` and carries the gate decision;
2. a run whose data fails validation leaves the registry (versions, champion alias) as it was;
3. a run with a forbidden override (``registry.*``) fails in its first task at once, naming the key.

``stack down --drop-data`` stops every process group and drops the test's databases, also when the
test fails. Needs PostgreSQL and Redis on 127.0.0.1 (``SKIN_TWIN_PG_URL`` / ``SKIN_TWIN_REDIS_URL``
to change): skipped with the reason when unreachable, except with ``CI=true``, where it fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from airflow_env import ROOT, free_port, run_overrides, write_bad_imagefolder, write_params

from pipeline.app import stack

PG_URL = os.environ.get("SKIN_TWIN_PG_URL", "postgresql://postgres@127.0.0.1:5432")
# Own databases and Redis DB index per process: two test runs on one machine never share them.
REDIS_URL = os.environ.get("SKIN_TWIN_REDIS_URL", f"redis://127.0.0.1:6379/{8 + os.getpid() % 8}")
RUN_TIMEOUT_S = float(os.environ.get("SKIN_TWIN_STACK_RUN_TIMEOUT", "900"))
DAG = "skin_twin"


def _services_problem() -> str | None:
    try:
        import psycopg2

        psycopg2.connect(f"{PG_URL}/postgres", connect_timeout=3).close()
    except Exception as exc:  # noqa: BLE001
        return f"PostgreSQL at {PG_URL} unreachable: {exc}"
    try:
        import redis

        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except Exception as exc:  # noqa: BLE001
        return f"Redis at {REDIS_URL} unreachable: {exc}"
    return None


def _check_celery_provider_imports() -> None:
    """Fail early and clearly when the installed celery and Airflow Celery provider do not fit
    (celery 5.7 dropped ``celery.backends.database.retry``, which the provider 3.26.0 imports)."""
    proc = subprocess.run(
        [sys.executable, "-c", "import airflow.providers.celery.executors.celery_executor_utils"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if proc.returncode != 0:
        from importlib.metadata import version

        pytest.fail(
            f"CeleryExecutor cannot be imported with celery=={version('celery')} and "
            f"apache-airflow-providers-celery=={version('apache-airflow-providers-celery')}:\n{proc.stderr[-1500:]}"
        )


def _free_port_run(n: int) -> int:
    """The first of ``n`` consecutive free ports (the worker and triggerer log servers)."""
    for _ in range(50):
        base = free_port()
        if base + n < 65536 and all(stack.port_free("0.0.0.0", base + i) for i in range(n)):
            return base
    raise RuntimeError("no run of free ports")


class Api:
    """The Airflow REST API with a bearer token."""

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


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory):
    problem = _services_problem()
    if problem:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and the stack's services are missing: {problem}")
        pytest.skip(problem)
    _check_celery_provider_imports()
    import redis

    tmp = tmp_path_factory.mktemp("stack")
    # The deployment's params file: runs_dir relative (to this file's folder), two GPU slots (the
    # bootstrap must read airflow.gpu_pool_slots), floor 0 so that the first tiny model is champion.
    params = write_params(tmp / "project" / "params.yaml", {"runs_dir": "runs", "retry_delay_s": 2, "gpu_pool_slots": 2},
                          registry={"floor": 0.0, "model_name": "skin-twin-stack-test"})  # fmt: skip
    env_file = tmp / "stack.env"
    made = subprocess.run([sys.executable, "-m", "pipeline.app.stack", "init-env", str(env_file)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert made.returncode == 0, made.stdout + made.stderr
    pid = os.getpid()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "SKIN_TWIN_", "MLFLOW_"))},
        "SKIN_TWIN_DB_URL": PG_URL,
        "SKIN_TWIN_AIRFLOW_DB": f"skin_twin_stack_airflow_{pid}",
        "SKIN_TWIN_MLFLOW_DB": f"skin_twin_stack_mlflow_{pid}",
        "SKIN_TWIN_REDIS_URL": REDIS_URL,
        "SKIN_TWIN_API_PORT": str(free_port()),
        "SKIN_TWIN_MLFLOW_PORT": str(free_port()),
        "SKIN_TWIN_LOG_SERVER_PORT": str(_free_port_run(3)),
        "SKIN_TWIN_STACK_DIR": str(tmp / "stack"),
        "SKIN_TWIN_PARAMS": str(params),
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
    }
    settings = stack.Settings.load(env_file, environ=env)
    redis.Redis.from_url(REDIS_URL).flushdb()  # our own DB index only: stale Celery messages
    cli = [sys.executable, "-m", "pipeline.app.stack"]
    state: dict[str, Any] = {}
    try:
        t0 = time.monotonic()
        up = subprocess.run([*cli, "up", "--env-file", str(env_file)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=900)  # fmt: skip
        up_s = time.monotonic() - t0
        state = stack.read_state(settings)
        assert up.returncode == 0, f"stack up failed ({up.returncode}):\n{up.stdout[-6000:]}\n{up.stderr[-6000:]}"
        print(f"\n[stack test] stack up -> healthy in {up_s:.1f} s ({state.get('healthy_after_s')} s inside `up`)")
        yield {"settings": settings, "env_file": env_file, "env": env, "params": params, "tmp": tmp, "up": up,
               "state": state}  # fmt: skip
    finally:
        pids = [p["pid"] for p in (state.get("services") or {}).values()]
        down = subprocess.run([*cli, "down", "--env-file", str(env_file), "--drop-data"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        redis.Redis.from_url(REDIS_URL).flushdb()
        leftovers = [p for p in pids if stack.group_alive(p)]
        assert down.returncode == 0, down.stdout + down.stderr
        assert not leftovers, f"process groups still running after stack down: {leftovers}"


def _logs(deployed: dict, n: int = 2500) -> str:
    out = []
    for name, p in (deployed["state"].get("services") or {}).items():
        out.append(f"===== {name} =====\n{stack.tail(Path(p['log']), n)}")
    return "\n".join(out)


def _wait(what: str, cond, deployed: dict, timeout: float, interval: float = 3.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        alive = stack.running(deployed["settings"])
        dead = set(stack.SERVICES) - set(alive)
        assert not dead, f"service(s) died: {sorted(dead)}\n{_logs(deployed)}"
        last = cond()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})\n{_logs(deployed)}")


def _login(deployed: dict) -> Api:
    """A token exactly as README documents: POST /auth/token with the env file's user and password."""
    values = stack.read_env_file(deployed["env_file"])
    api = Api(deployed["settings"].api_url)
    status, body = api.call("POST", "/auth/token", {"username": values["AIRFLOW_ADMIN_USER"],
                                                   "password": values["AIRFLOW_ADMIN_PASSWORD"]})  # fmt: skip
    assert status == 201 and body.get("access_token"), (status, body)
    api.token = body["access_token"]
    assert api.call("GET", f"/api/v2/dags/{DAG}")[0] == 200
    bad = Api(api.base)
    assert bad.call("POST", "/auth/token", {"username": "admin", "password": "wrong"})[0] == 401
    return api


def _trigger(api: Api, conf: dict) -> str:
    status, run = api.call("POST", f"/api/v2/dags/{DAG}/dagRuns", {"logical_date": None, "conf": conf})
    assert status in (200, 201), run
    return run["dag_run_id"]


def _finished(api: Api, deployed: dict, run_id: str) -> tuple[dict, dict]:
    q = urllib.parse.quote(run_id, safe="")

    def done():
        s, r = api.call("GET", f"/api/v2/dags/{DAG}/dagRuns/{q}")
        assert s == 200, r
        return r if r["state"] in ("success", "failed") else None

    run = _wait(f"run {run_id}", done, deployed, RUN_TIMEOUT_S, interval=5)
    s, tis = api.call("GET", f"/api/v2/dags/{DAG}/dagRuns/{q}/taskInstances")
    assert s == 200, tis
    return run, {t["task_id"]: t for t in tis["task_instances"]}


def _xcom(api: Api, run_id: str, task: str) -> dict:
    q = urllib.parse.quote(run_id, safe="")
    s, x = api.call("GET", f"/api/v2/dags/{DAG}/dagRuns/{q}/taskInstances/{task}/xcomEntries/return_value")
    assert s == 200, x
    return x["value"] if isinstance(x["value"], dict) else json.loads(x["value"])


def _registry(deployed: dict) -> dict:
    """Versions and aliases, read from the MLflow server at the URI the workers are given."""
    from mlflow import MlflowClient

    settings = deployed["settings"]
    uri = stack.service_env("airflow-worker", settings, base={})["MLFLOW_TRACKING_URI"]
    assert uri == settings.mlflow_url and uri.startswith("http://")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = "skin-twin-stack-test"
    model = client.get_registered_model(name)
    versions = client.search_model_versions(f"name='{name}'")
    return {"client": client, "aliases": dict(model.aliases), "versions": {v.version: v.run_id for v in versions}}


@pytest.mark.slow
@pytest.mark.services
def test_stack_is_bootstrapped_healthy_and_reachable_as_documented(deployed: dict) -> None:
    api = _login(deployed)
    # bootstrap: the DAG was created unpaused (nobody unpaused it) ...
    s, dag = api.call("GET", f"/api/v2/dags/{DAG}")
    assert s == 200 and dag["is_paused"] is False, dag
    # ... and the pool exists with airflow.gpu_pool_slots slots, read from the params file.
    s, pool = api.call("GET", "/api/v2/pools/gpu")
    assert s == 200 and pool["slots"] == 2, pool
    status = subprocess.run([sys.executable, "-m", "pipeline.app.stack", "status", "--env-file", str(deployed["env_file"])],
                            cwd=ROOT, env=deployed["env"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.count("healthy") == len(stack.SERVICES), status.stdout
    # every log in one folder
    assert {p.name for p in deployed["settings"].log_dir.glob("*.log")} >= {f"{n}.log" for n in (stack.INIT, *stack.SERVICES)}


@pytest.mark.slow
@pytest.mark.services
def test_tiny_run_on_the_stack_then_a_bad_data_run_and_a_forbidden_override(
    deployed: dict, tiny_overrides: dict, tmp_path: Path
) -> None:
    api = _login(deployed)

    # 1. a tiny run through the REST API
    t0 = time.monotonic()
    run_id = _trigger(api, {"overrides": run_overrides(tiny_overrides)})
    run, tis = _finished(api, deployed, run_id)
    elapsed = time.monotonic() - t0
    summary = {k: (v["state"], v["queue"], v["pool"], v["try_number"]) for k, v in tis.items()}
    assert run["state"] == "success", f"{summary}\n{_logs(deployed)}"
    assert all(t["state"] == "success" for t in tis.values()), summary
    print(f"\n[stack test] tiny DAG run on the stack: {elapsed:.1f} s trigger->finished (Airflow duration {run['duration']:.1f} s)")
    assert (tis["train"]["queue"], tis["train"]["pool"]) == ("gpu", "gpu"), summary
    workers = {task: _xcom(api, run_id, task)["worker"] for task in tis}
    assert workers.pop("train") == "airflow-worker-gpu", workers
    assert set(workers.values()) == {"airflow-worker"}, workers  # no other task on the GPU worker
    # the run folder is below runs_dir, relative to the params file's folder
    assert Path(_xcom(api, run_id, "train")["run_dir"]).parent == (deployed["params"].parent / "runs").resolve()

    track, register = _xcom(api, run_id, "track"), _xcom(api, run_id, "register")
    reg = _registry(deployed)
    mlflow_run = reg["client"].get_run(track["result"]["run_id"])
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.tags.get("skin_twin.airflow.dag_run_id") == run_id
    version = register["result"]["version"]
    assert reg["versions"] == {version: mlflow_run.info.run_id}
    assert reg["aliases"] == {"challenger": version, "champion": version}, reg["aliases"]

    # the model Asset event comes from register, after the gate, with its decision
    s, assets = api.call("GET", "/api/v2/assets?name_pattern=skin_twin.model")
    assert s == 200, assets
    asset_id = next(a["id"] for a in assets["assets"] if a["name"] == "skin_twin.model")
    assert isinstance(asset_id, int)
    s, events = api.call("GET", f"/api/v2/assets/events?asset_id={asset_id}")
    assert s == 200 and len(events["asset_events"]) == 1, events
    event = events["asset_events"][0]
    assert (event["source_task_id"], event["source_run_id"]) == ("register", run_id), event
    assert event["extra"]["promoted"] is True and event["extra"]["model"]["decision"] == "promoted", event["extra"]
    assert event["extra"]["model"]["uri"] == f"models:/skin-twin-stack-test/{version}"

    # 2. bad data and 3. a forbidden override, queued behind each other (max_active_runs 1)
    bad = write_bad_imagefolder(tmp_path / "bad_data")
    bad_run = _trigger(api, {"data_source": "imagefolder", "data_root": str(bad),
                             "overrides": run_overrides(tiny_overrides)})  # fmt: skip
    evil_run = _trigger(api, {"overrides": {"train.epochs": 1, "registry.model_name": "elsewhere"}})

    run, tis = _finished(api, deployed, bad_run)
    assert run["state"] == "failed"
    assert (tis["ingest"]["state"], tis["validate"]["state"], tis["validate"]["try_number"]) == ("success", "failed", 1)
    assert {tis[t]["state"] for t in tis if t not in ("ingest", "validate")} == {"upstream_failed"}
    assert _registry(deployed)["aliases"] == reg["aliases"] and _registry(deployed)["versions"] == reg["versions"]

    run, tis = _finished(api, deployed, evil_run)
    assert run["state"] == "failed"
    assert (tis["ingest"]["state"], tis["ingest"]["try_number"]) == ("failed", 1), tis["ingest"]
    q = urllib.parse.quote(evil_run, safe="")
    s, log = api.call("GET", f"/api/v2/dags/{DAG}/dagRuns/{q}/taskInstances/ingest/logs/1")
    assert s == 200, log
    assert "params.overrides: registry.model_name may not be set per run" in json.dumps(log), json.dumps(log)[-3000:]
    assert _registry(deployed)["aliases"] == reg["aliases"] and _registry(deployed)["versions"] == reg["versions"]
