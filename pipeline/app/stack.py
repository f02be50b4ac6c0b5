"""The deployment: one definition of the services, two ways to start them.

``python -m pipeline.app.stack <command>``; the services (named as in ``docker/compose.yaml``):

==========================  =====================================================================
``airflow-init``            bootstrap, runs once: creates the Airflow and MLflow databases when
                            missing, ``airflow db migrate``, the pool ``airflow.gpu_pool`` with
                            ``airflow.gpu_pool_slots`` slots (both from the params file)
``mlflow``                  MLflow tracking server on PostgreSQL, artifacts served by it,
                            ``--allowed-hosts`` = the host the workers use (+ localhost)
``airflow-apiserver``       UI, REST API (``/api/v2``), execution API for the workers
``airflow-scheduler``       CeleryExecutor, broker Redis
``airflow-dag-processor``   parses ``dags/`` (the DAG is created unpaused:
                            ``AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION=False``)
``airflow-triggerer``       deferred tasks
``airflow-worker``          Celery worker of the ``default`` queue (every task but ``train``)
``airflow-worker-gpu``      Celery worker of the ``airflow.gpu_queue`` queue (``train``)
==========================  =====================================================================

Two ways to start the same services with the same commands and settings:

* **containers** -- ``docker/compose.yaml`` runs ``python -m pipeline.app.stack run <service>``
  in each container and ``python -m pipeline.app.stack health <service>`` as its health check;
* **processes** (a VM, a laptop, CI) -- ``make stack-up`` = ``python -m pipeline.app.stack up``
  runs ``airflow-init``, then every service as a local process in its own process group
  (``run <service>``, the same code path), logs in one folder, waits until every service answers
  its health check and the DAG is parsed; ``make stack-down`` = ``down`` stops them by process group.

Settings are environment variables (:data:`SETTINGS`), read from an env file
(``docker/.env``, made by ``init-env`` from ``docker/.env.example``, which is generated from
:data:`SETTINGS` and checked by a test) with the process environment winning. Defaults fit process
mode on one host (PostgreSQL and Redis on 127.0.0.1); ``compose.yaml`` sets the container addresses.
Everything Airflow and MLflow are given is derived from these settings in one place
(:func:`service_env`, :func:`service_argv`).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

PROJECT_ROOT = Path(__file__).resolve().parents[2]
ENV_EXAMPLE = PROJECT_ROOT / "docker" / ".env.example"
DEFAULT_ENV_FILE = PROJECT_ROOT / "docker" / ".env"
DAG_ID = "skin_twin"
DEFAULT_QUEUE = "default"
INIT = "airflow-init"
# Start order; health checks in this order too.
SERVICES: tuple[str, ...] = (
    "mlflow",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
    "airflow-worker-gpu",
)
WORKERS: dict[str, int] = {"airflow-worker": 0, "airflow-worker-gpu": 1}  # -> log server port offset
STATE_FILE = "state.json"
PASSWORDS_FILE = "simple_auth_manager_passwords.json"


class StackError(RuntimeError):
    """A deployment problem; the message names the setting, service or file."""


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Setting:
    name: str
    default: str | None  # None: required (a secret init-env generates)
    help: str
    group: str
    secret: bool = False


SETTINGS: tuple[Setting, ...] = (
    Setting("AIRFLOW_JWT_SECRET", None, "signs API and execution-API tokens; one value for api-server, scheduler and workers", "secrets", True),
    Setting("AIRFLOW_API_SECRET_KEY", None, "Airflow API/UI session secret", "secrets", True),
    Setting("AIRFLOW_FERNET_KEY", "", "encrypts connections and variables in the metadata DB (urlsafe base64 of 32 bytes)", "secrets", True),
    Setting("AIRFLOW_ADMIN_USER", "admin", "the Airflow user (simple auth manager, role admin)", "secrets"),
    Setting("AIRFLOW_ADMIN_PASSWORD", None, "its password: POST /auth/token {\"username\": ..., \"password\": ...}", "secrets", True),
    Setting("POSTGRES_PASSWORD", None, "compose only: password of the postgres container's user `airflow`", "secrets", True),
    Setting("SKIN_TWIN_DB_URL", "postgresql://postgres@127.0.0.1:5432", "PostgreSQL server (no database name): Airflow metadata DB and MLflow backend", "addresses"),
    Setting("SKIN_TWIN_AIRFLOW_DB", "skin_twin_airflow", "Airflow metadata database (created by airflow-init when missing)", "addresses"),
    Setting("SKIN_TWIN_MLFLOW_DB", "skin_twin_mlflow", "MLflow backend database (created by airflow-init when missing)", "addresses"),
    Setting("SKIN_TWIN_REDIS_URL", "redis://127.0.0.1:6379/0", "Celery broker", "addresses"),
    Setting("SKIN_TWIN_REGISTRY_LOCK_URL", "", "lock around the champion gate that every worker reaches (empty: an advisory lock in the MLflow backend database)", "addresses"),
    Setting("SKIN_TWIN_BIND_HOST", "127.0.0.1", "address the api-server and MLflow listen on", "addresses"),
    Setting("SKIN_TWIN_API_PORT", "8080", "api-server port", "addresses"),
    Setting("SKIN_TWIN_API_URL", "", "how the scheduler and workers reach the api-server (empty: http://127.0.0.1:<SKIN_TWIN_API_PORT>)", "addresses"),
    Setting("SKIN_TWIN_MLFLOW_PORT", "5000", "MLflow server port", "addresses"),
    Setting("SKIN_TWIN_MLFLOW_URL", "", "how the workers reach MLflow (empty: http://127.0.0.1:<SKIN_TWIN_MLFLOW_PORT>); their MLFLOW_TRACKING_URI", "addresses"),
    Setting("SKIN_TWIN_MLFLOW_ALLOWED_HOSTS", "", "extra Host headers MLflow accepts, comma-separated (the host:port of SKIN_TWIN_MLFLOW_URL and localhost are always allowed)", "addresses"),
    Setting("SKIN_TWIN_LOG_SERVER_PORT", "8793", "task-log servers: default worker this port, GPU worker +1, triggerer +2", "addresses"),
    Setting("SKIN_TWIN_PARAMS", "params.yaml", "the pipeline's params file (relative: to the project root)", "folders"),
    Setting("SKIN_TWIN_STACK_DIR", "stack", "process mode: state file and the default folders below (relative: to the project root)", "folders"),
    Setting("SKIN_TWIN_AIRFLOW_HOME", "", "AIRFLOW_HOME (empty: <SKIN_TWIN_STACK_DIR>/airflow)", "folders"),
    Setting("SKIN_TWIN_LOG_DIR", "", "one folder for all logs: <service>.log (process mode) and tasks/ (empty: <SKIN_TWIN_STACK_DIR>/logs)", "folders"),
    Setting("SKIN_TWIN_MLFLOW_ARTIFACTS", "", "MLflow artifact store (empty: <SKIN_TWIN_STACK_DIR>/mlflow-artifacts)", "folders"),
    Setting("SKIN_TWIN_API_WORKERS", "1", "api-server worker processes", "sizing"),
    Setting("SKIN_TWIN_MLFLOW_WORKERS", "1", "MLflow server worker processes", "sizing"),
    Setting("SKIN_TWIN_WORKER_CONCURRENCY", "2", "tasks at once on the default-queue worker", "sizing"),
    Setting("SKIN_TWIN_GPU_WORKER_CONCURRENCY", "1", "tasks at once on the GPU worker (one per GPU; the pool bounds the whole deployment)", "sizing"),
    Setting("SKIN_TWIN_HEALTH_TIMEOUT", "600", "process mode: seconds `up` waits for every service to answer", "sizing"),
)  # fmt: skip
BY_SETTING = {s.name: s for s in SETTINGS}
GROUP_TITLES = {
    "secrets": "Secrets and sign-in (required; `python -m pipeline.app.stack init-env` generates them)",
    "addresses": "Where the services are. Defaults: process mode on one host; docker/compose.yaml sets the container addresses itself",
    "folders": "Folders",
    "sizing": "Sizing",
}


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines (``#`` comments, blank lines and optional quotes allowed)."""
    if not path.is_file():
        raise StackError(f"{path}: env file not found (create it: python -m pipeline.app.stack init-env {path})")
    out: dict[str, str] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.strip().removeprefix("export ").strip()
        if not sep or not key.replace("_", "").isalnum():
            raise StackError(f"{path}:{n}: expected KEY=VALUE, got {line!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key] = value
    return out


@dataclass(frozen=True)
class Settings:
    """The deployment settings: :data:`SETTINGS` from the env file and the environment."""

    values: Mapping[str, str]
    extra: Mapping[str, str]  # other variables of the env file (e.g. AIRFLOW__* tuning), passed on

    @classmethod
    def load(cls, env_file: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
        environ = os.environ if environ is None else environ
        from_file = read_env_file(env_file) if env_file else {}
        values: dict[str, str] = {}
        for s in SETTINGS:
            value = environ.get(s.name, from_file.get(s.name, s.default))
            values[s.name] = "" if value is None else value
        extra = {k: v for k, v in from_file.items() if k not in BY_SETTING and k not in environ}
        return cls(values, extra)

    def get(self, name: str) -> str:
        return self.values[BY_SETTING[name].name]

    def require(self, *names: str) -> None:
        missing = [n for n in names if not self.values.get(n)]
        if missing:
            raise StackError(
                f"missing setting(s) {', '.join(missing)}: set them in the env file "
                "(python -m pipeline.app.stack init-env docker/.env writes one with generated secrets)"
            )

    def port(self, name: str) -> int:
        text = self.get(name)
        if not text.isdigit() or not 0 < int(text) < 65536:
            raise StackError(f"{name}: expected a TCP port, got {text!r}")
        return int(text)

    def number(self, name: str) -> int:
        text = self.get(name)
        if not text.isdigit() or int(text) < 1:
            raise StackError(f"{name}: expected a positive integer, got {text!r}")
        return int(text)

    def path(self, name: str, default_below_stack: str | None = None) -> Path:
        text = self.get(name)
        if not text and default_below_stack is not None:
            return self.stack_dir / default_below_stack
        p = Path(text).expanduser()
        return p if p.is_absolute() else (PROJECT_ROOT / p).resolve()

    # --- derived ---
    @property
    def stack_dir(self) -> Path:
        return self.path("SKIN_TWIN_STACK_DIR")

    @property
    def params(self) -> Path:
        return self.path("SKIN_TWIN_PARAMS")

    @property
    def airflow_home(self) -> Path:
        return self.path("SKIN_TWIN_AIRFLOW_HOME", "airflow")

    @property
    def log_dir(self) -> Path:
        return self.path("SKIN_TWIN_LOG_DIR", "logs")

    @property
    def mlflow_artifacts(self) -> Path:
        return self.path("SKIN_TWIN_MLFLOW_ARTIFACTS", "mlflow-artifacts")

    @property
    def api_url(self) -> str:
        return (self.get("SKIN_TWIN_API_URL") or f"http://127.0.0.1:{self.port('SKIN_TWIN_API_PORT')}").rstrip("/")

    @property
    def mlflow_url(self) -> str:
        return (self.get("SKIN_TWIN_MLFLOW_URL") or f"http://127.0.0.1:{self.port('SKIN_TWIN_MLFLOW_PORT')}").rstrip("/")

    def db_url(self, database: str, driver: str = "psycopg2") -> str:
        server = self.get("SKIN_TWIN_DB_URL").rstrip("/")
        scheme, sep, rest = server.partition("://")
        if not sep or not scheme.startswith("postgres"):
            raise StackError(f"SKIN_TWIN_DB_URL: expected postgresql://user[:password]@host:port, got {server!r}")
        return f"postgresql+{driver}://{rest}/{database}"

    def allowed_hosts(self) -> list[str]:
        """Host headers MLflow accepts: how the workers address it, localhost, and the extras."""
        netloc = urlsplit(self.mlflow_url).netloc
        port = self.port("SKIN_TWIN_MLFLOW_PORT")
        hosts = [netloc, f"localhost:{port}", f"127.0.0.1:{port}", "localhost", "127.0.0.1"]
        hosts += [h.strip() for h in self.get("SKIN_TWIN_MLFLOW_ALLOWED_HOSTS").split(",") if h.strip()]
        return list(dict.fromkeys(hosts))

    def log_port(self, service: str) -> int:
        base = self.port("SKIN_TWIN_LOG_SERVER_PORT")
        return base + (WORKERS[service] if service in WORKERS else 2)


def render_env_example() -> str:
    """``docker/.env.example``: every setting with its default and what it is for."""
    lines = [
        "# skin-twin deployment settings: ONE file for both ways to start the stack.",
        "#   process mode:  make stack-up          (reads docker/.env)",
        "#   containers:    docker compose --env-file docker/.env -f docker/compose.yaml up -d --build",
        "# Make docker/.env from this file with fresh secrets:  python -m pipeline.app.stack init-env docker/.env",
        "# GENERATED from pipeline/app/stack.py (SETTINGS) by `python -m pipeline.app.stack env-example`.",
    ]
    for group, title in GROUP_TITLES.items():
        lines += ["", f"# --- {title}"]
        for s in (s for s in SETTINGS if s.group == group):
            lines.append(f"# {s.help}")
            lines.append(f"{s.name}={'' if s.default is None else s.default}")
    return "\n".join(lines) + "\n"


def _secret_value(name: str) -> str:
    if name == "AIRFLOW_FERNET_KEY":
        return base64.urlsafe_b64encode(os.urandom(32)).decode()
    return secrets.token_hex(16 if name in ("AIRFLOW_API_SECRET_KEY", "AIRFLOW_ADMIN_PASSWORD", "POSTGRES_PASSWORD") else 32)


def init_env(target: Path, force: bool = False) -> Path:
    """Write ``target`` from the example with fresh secrets (mode 0600); refuses to overwrite."""
    if target.exists() and not force:
        raise StackError(f"{target}: exists; keep it (or remove it first: its secrets are in use)")
    out = []
    for line in render_env_example().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#") and BY_SETTING[key].secret and not value:
            line = f"{key}={_secret_value(key)}"
        out.append(line)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write("\n".join(out) + "\n")
    return target


# --------------------------------------------------------------------------- services


def _pipeline_config(s: Settings):
    from pipeline.app.params import load_params  # YAML + pydantic only

    return load_params(s.params)


def service_env(name: str, s: Settings, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of service ``name``: ``base`` (the process environment) + the derived
    Airflow / MLflow settings. The same for compose and process mode."""
    s.require("AIRFLOW_JWT_SECRET", "AIRFLOW_API_SECRET_KEY", "AIRFLOW_ADMIN_PASSWORD")
    env = dict(os.environ if base is None else base)
    env.update(s.extra)
    bin_dir = str(Path(sys.executable).parent)
    home, logs = s.airflow_home, s.log_dir
    sql = s.db_url(s.get("SKIN_TWIN_AIRFLOW_DB"))
    env.update(
        {
            "PATH": bin_dir + os.pathsep + env.get("PATH", ""),
            "PYTHONPATH": os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p),
            "PYTHONUNBUFFERED": "1",
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_ROOT / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            # Bootstrapping: a DAG is created unpaused (an operator's later pause is kept).
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{s.get('AIRFLOW_ADMIN_USER')}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / PASSWORDS_FILE),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{s.api_url}/execution/",
            "AIRFLOW__CORE__FERNET_KEY": s.get("AIRFLOW_FERNET_KEY"),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": sql,
            # Airflow 3 also opens an async engine on the metadata DB (asyncpg is in the lock).
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": s.db_url(s.get("SKIN_TWIN_AIRFLOW_DB"), "asyncpg"),
            "AIRFLOW__CELERY__BROKER_URL": s.get("SKIN_TWIN_REDIS_URL"),
            "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + sql,
            "AIRFLOW__OPERATORS__DEFAULT_QUEUE": DEFAULT_QUEUE,
            "AIRFLOW__API_AUTH__JWT_SECRET": s.get("AIRFLOW_JWT_SECRET"),
            "AIRFLOW__API__SECRET_KEY": s.get("AIRFLOW_API_SECRET_KEY"),
            "AIRFLOW__API__BASE_URL": s.api_url,
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(logs / "tasks"),
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(s.log_port(name if name in WORKERS else "airflow-worker")),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(s.log_port("airflow-triggerer")),
            "SKIN_TWIN_PARAMS": str(s.params),
            # The workers reach MLflow over HTTP, at the address its --allowed-hosts accepts.
            "MLFLOW_TRACKING_URI": s.mlflow_url,
            # ... so the champion gate needs a lock they all reach (pipeline.io.locks).
            "SKIN_TWIN_REGISTRY_LOCK_URL": s.get("SKIN_TWIN_REGISTRY_LOCK_URL") or s.db_url(s.get("SKIN_TWIN_MLFLOW_DB")),
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
            "GX_ANALYTICS_ENABLED": "false",
            "DVC_NO_ANALYTICS": "1",
        }
    )
    if name in WORKERS:
        env["SKIN_TWIN_WORKER"] = name  # recorded in each task's XCom summary
    else:
        env.pop("SKIN_TWIN_WORKER", None)
    if name == "mlflow":  # the server's --backend-store-uri, kept out of `ps` and of the other services
        env["MLFLOW_BACKEND_STORE_URI"] = s.db_url(s.get("SKIN_TWIN_MLFLOW_DB"))
    return env


def service_argv(name: str, s: Settings, cfg: Any = None) -> list[str]:
    """The command of service ``name`` (the same in a container and as a local process)."""
    if name == "mlflow":
        return [
            "mlflow", "server",
            "--host", s.get("SKIN_TWIN_BIND_HOST"), "--port", str(s.port("SKIN_TWIN_MLFLOW_PORT")),
            # --backend-store-uri comes from MLFLOW_BACKEND_STORE_URI (keeps the password out of `ps`)
            "--serve-artifacts", "--artifacts-destination", str(s.mlflow_artifacts),
            "--allowed-hosts", ",".join(s.allowed_hosts()),
            "--workers", str(s.number("SKIN_TWIN_MLFLOW_WORKERS")),
        ]  # fmt: skip
    if name == "airflow-apiserver":
        return [
            "airflow", "api-server", "--host", s.get("SKIN_TWIN_BIND_HOST"),
            "--port", str(s.port("SKIN_TWIN_API_PORT")), "--workers", str(s.number("SKIN_TWIN_API_WORKERS")),
        ]  # fmt: skip
    if name == "airflow-scheduler":
        return ["airflow", "scheduler"]
    if name == "airflow-dag-processor":
        return ["airflow", "dag-processor"]
    if name == "airflow-triggerer":
        return ["airflow", "triggerer"]
    if name in WORKERS:
        cfg = cfg or _pipeline_config(s)
        gpu = name == "airflow-worker-gpu"
        queue = cfg.airflow.gpu_queue if gpu else DEFAULT_QUEUE
        conc = s.number("SKIN_TWIN_GPU_WORKER_CONCURRENCY" if gpu else "SKIN_TWIN_WORKER_CONCURRENCY")
        return ["airflow", "celery", "worker", "--queues", queue, "--concurrency", str(conc), "--celery-hostname", f"{name}@%h"]
    raise StackError(f"unknown service {name!r}; expected {INIT} or one of {', '.join(SERVICES)}")


def worker_queue(name: str, cfg: Any) -> str:
    return cfg.airflow.gpu_queue if name == "airflow-worker-gpu" else DEFAULT_QUEUE


def _prepare(name: str, s: Settings) -> None:
    for d in (s.airflow_home, s.log_dir / "tasks"):
        d.mkdir(parents=True, exist_ok=True)
    if name == "mlflow":
        s.mlflow_artifacts.mkdir(parents=True, exist_ok=True)
    if name == "airflow-apiserver":
        # The simple auth manager's password file, from AIRFLOW_ADMIN_PASSWORD (never generated).
        path = s.airflow_home / PASSWORDS_FILE
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({s.get("AIRFLOW_ADMIN_USER"): s.get("AIRFLOW_ADMIN_PASSWORD")}, fh)


def _run_checked(argv: list[str], env: Mapping[str, str], what: str, timeout: float = 900) -> None:
    print(f"[airflow-init] {what}: {' '.join(argv)}", flush=True)
    proc = subprocess.run(argv, env=dict(env), cwd=PROJECT_ROOT, timeout=timeout, capture_output=True, text=True)
    if proc.returncode != 0:
        raise StackError(f"{what} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")


def _pg_connect(s: Settings, database: str = "postgres", timeout: float = 5):
    import psycopg2

    return psycopg2.connect(s.db_url(database).replace("postgresql+psycopg2://", "postgresql://"), connect_timeout=int(timeout))


def ensure_databases(s: Settings, wait_s: float = 60) -> list[str]:
    """Create the Airflow and MLflow databases when missing (waits for the server first)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            conn = _pg_connect(s)
            break
        except Exception as exc:  # noqa: BLE001 - report the server's own message
            if time.monotonic() > deadline:
                raise StackError(f"SKIN_TWIN_DB_URL: PostgreSQL unreachable: {str(exc).strip()}") from None
            time.sleep(2)
    created = []
    conn.autocommit = True
    with conn.cursor() as cur:
        for setting in ("SKIN_TWIN_AIRFLOW_DB", "SKIN_TWIN_MLFLOW_DB"):
            db = s.get(setting)
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
            if cur.fetchone() is None:
                cur.execute(f'CREATE DATABASE "{db}"')
                created.append(db)
    conn.close()
    return created


def drop_databases(s: Settings) -> None:
    conn = _pg_connect(s)
    conn.autocommit = True
    with conn.cursor() as cur:
        for setting in ("SKIN_TWIN_AIRFLOW_DB", "SKIN_TWIN_MLFLOW_DB"):
            cur.execute(f'DROP DATABASE IF EXISTS "{s.get(setting)}" WITH (FORCE)')
    conn.close()


def bootstrap(s: Settings) -> None:
    """``airflow-init``: databases, migration, the GPU pool from the params file."""
    cfg = _pipeline_config(s)
    env = service_env(INIT, s)
    _prepare(INIT, s)
    for db in ensure_databases(s):
        print(f"[airflow-init] created database {db}", flush=True)
    _run_checked(["airflow", "db", "migrate"], env, "migrating the Airflow metadata DB")
    af = cfg.airflow
    _run_checked(
        ["airflow", "pools", "set", af.gpu_pool, str(af.gpu_pool_slots), "skin-twin GPU jobs (airflow.gpu_pool_slots)"],
        env, f"pool {af.gpu_pool!r} with {af.gpu_pool_slots} slot(s)",
    )  # fmt: skip
    print("[airflow-init] done", flush=True)


def run_service(name: str, s: Settings) -> int:
    """Prepare and exec service ``name`` (``airflow-init`` runs the bootstrap and returns)."""
    if name == INIT:
        bootstrap(s)
        return 0
    cfg = _pipeline_config(s) if name in WORKERS else None
    argv = service_argv(name, s, cfg)
    env = service_env(name, s)
    _prepare(name, s)
    exe = shutil.which(argv[0], path=env["PATH"])
    if not exe:
        raise StackError(f"{name}: {argv[0]} not found on PATH")
    sys.stdout.flush()
    os.execvpe(exe, argv, env)
    return 0  # pragma: no cover


# --------------------------------------------------------------------------- health


def _http(url: str, timeout: float = 5, headers: Mapping[str, str] | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")[:300]


def _api_component(s: Settings, component: str) -> str | None:
    status, body = _http(f"{s.api_url}/api/v2/monitor/health")
    if status != 200 or not isinstance(body, dict):
        return f"api-server health: HTTP {status} {body}"
    if component == "api":
        return None if body.get("metadatabase", {}).get("status") == "healthy" else f"metadatabase: {body.get('metadatabase')}"
    state = (body.get(component) or {}).get("status")
    return None if state == "healthy" else f"{component}: {state or 'no heartbeat yet'}"


def _celery_worker(s: Settings, name: str, queue: str) -> str | None:
    from celery import Celery

    app = Celery(broker=s.get("SKIN_TWIN_REDIS_URL"))
    try:
        queues = app.control.inspect(timeout=3).active_queues() or {}
    finally:
        app.close()
    mine = {node: qs for node, qs in queues.items() if node.startswith(f"{name}@")}
    if not mine:
        return f"no Celery worker {name}@... answered on {s.get('SKIN_TWIN_REDIS_URL')}"
    consumed = {q.get("name") for qs in mine.values() for q in qs or []}
    return None if queue in consumed else f"{name} consumes {sorted(consumed)}, not {queue!r}"


def check(name: str, s: Settings, cfg: Any = None) -> str | None:
    """None when service ``name`` answers its health check, else what is wrong."""
    try:
        if name == "mlflow":
            # An API call, not /health (which MLflow exempts from the Host check), at the address
            # the workers use: a Host header MLflow refuses shows up here as HTTP 403.
            status, body = _http(f"{s.mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1")
            return None if status == 200 else f"MLflow at {s.mlflow_url}: HTTP {status} {body}"
        if name == "airflow-apiserver":
            return _api_component(s, "api")
        if name in ("airflow-scheduler", "airflow-triggerer", "airflow-dag-processor"):
            return _api_component(s, name.removeprefix("airflow-").replace("-", "_"))
        if name in WORKERS:
            return _celery_worker(s, name, worker_queue(name, cfg or _pipeline_config(s)))
    except Exception as exc:  # noqa: BLE001 - connection refused, broker down, ...: not healthy (yet)
        return f"not answering: {type(exc).__name__}: {exc}"
    raise StackError(f"unknown service {name!r}; expected one of {', '.join(SERVICES)}")


# --------------------------------------------------------------------------- API helpers


def api_token(s: Settings) -> str:
    """A token from ``POST /auth/token`` with the admin user and password (as README shows)."""
    body = json.dumps({"username": s.get("AIRFLOW_ADMIN_USER"), "password": s.get("AIRFLOW_ADMIN_PASSWORD")}).encode()
    req = urllib.request.Request(f"{s.api_url}/auth/token", data=body, method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())["access_token"]


def dag_state(s: Settings, token: str) -> tuple[str | None, Any]:
    """(problem or None, DAG JSON) once ``skin_twin`` is parsed without import errors."""
    auth = {"Authorization": f"Bearer {token}"}
    status, errors = _http(f"{s.api_url}/api/v2/importErrors", headers=auth)
    if status == 200 and isinstance(errors, dict) and errors.get("import_errors"):
        return "DAG import errors: " + json.dumps(errors["import_errors"])[:2000], None
    status, dag = _http(f"{s.api_url}/api/v2/dags/{DAG_ID}", headers=auth)
    if status != 200:
        return f"DAG {DAG_ID} not parsed yet (HTTP {status})", None
    return None, dag


# --------------------------------------------------------------------------- process mode


def _proc_start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _state_path(s: Settings) -> Path:
    return s.stack_dir / STATE_FILE


def read_state(s: Settings) -> dict[str, Any]:
    path = _state_path(s)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _write_state(s: Settings, state: dict[str, Any]) -> None:
    path = _state_path(s)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2), encoding="utf-8")
    os.replace(tmp, path)


def running(s: Settings) -> dict[str, int]:
    """Services of this stack dir whose process (same pid and start time) still runs."""
    out = {}
    for name, p in (read_state(s).get("services") or {}).items():
        if _proc_start_time(p["pid"]) == p.get("start") and p.get("start") is not None:
            out[name] = p["pid"]
    return out


def port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
            return True
        except OSError:
            return False


def _child_env(s: Settings, env_file: Path | None) -> dict[str, str]:
    """What a `run <service>` child gets: the process environment + every setting made explicit."""
    env = dict(os.environ)
    env.update(s.extra)
    env.update({k: v for k, v in s.values.items()})
    if env_file:
        env["SKIN_TWIN_ENV_FILE"] = str(env_file)
    return env


def _log(msg: str) -> None:
    print(f"[stack] {msg}", flush=True)


def up(s: Settings, env_file: Path | None, timeout: float | None = None) -> dict[str, Any]:
    """Bootstrap, start every service as a local process group, wait until all answer."""
    t0 = time.monotonic()
    s.require("AIRFLOW_JWT_SECRET", "AIRFLOW_API_SECRET_KEY", "AIRFLOW_ADMIN_PASSWORD")
    cfg = _pipeline_config(s)
    alive = running(s)
    if alive:
        raise StackError(f"a stack is already running from {s.stack_dir} ({', '.join(alive)}); make stack-down first")
    host = s.get("SKIN_TWIN_BIND_HOST")
    ports = {
        "SKIN_TWIN_API_PORT": s.port("SKIN_TWIN_API_PORT"),
        "SKIN_TWIN_MLFLOW_PORT": s.port("SKIN_TWIN_MLFLOW_PORT"),
        **{f"SKIN_TWIN_LOG_SERVER_PORT (+{i})": s.port("SKIN_TWIN_LOG_SERVER_PORT") + i for i in range(3)},
    }
    busy = [f"{k}={p}" for k, p in ports.items() if not port_free(host if "LOG" not in k else "0.0.0.0", p)]
    if busy:
        raise StackError(f"port(s) in use on {host}: {', '.join(busy)}; choose others in the env file")
    try:
        import redis

        redis.Redis.from_url(s.get("SKIN_TWIN_REDIS_URL"), socket_connect_timeout=3).ping()
    except Exception as exc:  # noqa: BLE001
        raise StackError(f"SKIN_TWIN_REDIS_URL: Redis unreachable: {exc}") from None

    log_dir = s.log_dir
    log_dir.mkdir(parents=True, exist_ok=True)
    env = _child_env(s, env_file)
    python = [sys.executable, "-m", "pipeline.app.stack"]

    _log(f"bootstrap ({INIT}) -> {log_dir / (INIT + '.log')}")
    with (log_dir / f"{INIT}.log").open("w", encoding="utf-8") as fh:
        init = subprocess.run([*python, "run", INIT], env=env, cwd=PROJECT_ROOT, stdout=fh, stderr=subprocess.STDOUT)
    if init.returncode != 0:
        raise StackError(f"{INIT} failed (exit {init.returncode}):\n{tail(log_dir / (INIT + '.log'))}")

    state: dict[str, Any] = {"started": time.time(), "api_url": s.api_url, "mlflow_url": s.mlflow_url,
                             "log_dir": str(log_dir), "services": {}}  # fmt: skip
    try:
        for name in SERVICES:
            log = log_dir / f"{name}.log"
            with log.open("w", encoding="utf-8") as fh:
                popen = subprocess.Popen(
                    [*python, "run", name], env=env, cwd=PROJECT_ROOT, stdout=fh, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True,
                )  # fmt: skip
            state["services"][name] = {"pid": popen.pid, "start": _proc_start_time(popen.pid), "log": str(log)}
            _write_state(s, state)  # at once: `down` can stop what was started even if `up` dies
            _log(f"started {name:<22} pid {popen.pid:<7} log {log}")
        timeout = timeout if timeout is not None else s.number("SKIN_TWIN_HEALTH_TIMEOUT")
        wait_healthy(s, cfg, state, t0 + timeout)
    except BaseException:
        _log("start failed: stopping what was started")
        down(s, quiet=True)
        raise
    state["healthy_after_s"] = round(time.monotonic() - t0, 1)
    _write_state(s, state)
    return state


def tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-n:]
    except OSError:
        return ""


def wait_healthy(s: Settings, cfg: Any, state: dict[str, Any], deadline: float) -> None:
    pending = list(SERVICES)
    last: dict[str, str | None] = {}
    token: str | None = None
    while True:
        for name, p in state["services"].items():
            if _proc_start_time(p["pid"]) != p["start"]:
                raise StackError(f"{name} exited during start-up; its log {p['log']}:\n{tail(Path(p['log']))}")
        for name in list(pending):
            last[name] = check(name, s, cfg)
            if last[name] is None:
                pending.remove(name)
                _log(f"healthy {name}")
        if not pending:
            try:
                token = token or api_token(s)
                problem, dag = dag_state(s, token)
            except urllib.error.HTTPError as exc:
                if exc.code == 401:
                    raise StackError("AIRFLOW_ADMIN_USER / AIRFLOW_ADMIN_PASSWORD refused by POST /auth/token") from None
                problem, dag = f"token: {exc}", None
            except (OSError, KeyError, ValueError) as exc:
                problem, dag = f"token: {exc}", None
            if problem is None:
                paused = dag.get("is_paused")
                _log(f"DAG {DAG_ID} parsed, {'PAUSED (unpause it: see README)' if paused else 'unpaused'}")
                return
            last["dag"] = problem
            if problem.startswith("DAG import errors"):
                raise StackError(problem)
        if time.monotonic() > deadline:
            waiting = {k: v for k, v in last.items() if v}
            raise StackError(f"not healthy in time: {json.dumps(waiting, indent=1)}")
        time.sleep(2)


def down(s: Settings, quiet: bool = False, timeout: float = 30) -> list[str]:
    """Stop every service of the state file by process group (SIGTERM, then SIGKILL); returns
    the groups that had to be killed."""
    state = read_state(s)
    services = state.get("services") or {}
    ours = {n: p for n, p in services.items() if p.get("start") and _proc_start_time(p["pid"]) == p["start"]}
    for name in reversed(list(ours)):
        try:
            os.killpg(ours[name]["pid"], signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(group_alive(p["pid"]) for p in ours.values()):
        time.sleep(0.5)
    killed = []
    for name, p in ours.items():
        if group_alive(p["pid"]):
            killed.append(name)
            try:
                os.killpg(p["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in ours.values():
        for _ in range(20):
            if not group_alive(p["pid"]):
                break
            time.sleep(0.25)
    left = [n for n, p in ours.items() if group_alive(p["pid"])]
    if left:
        raise StackError(f"still running after SIGKILL: {', '.join(left)}")
    if _state_path(s).exists():
        _state_path(s).unlink()
    if not quiet:
        _log(f"stopped {len(ours)} service(s)" + (f"; killed after {timeout:.0f}s: {', '.join(killed)}" if killed else ""))
    return killed


# --------------------------------------------------------------------------- CLI


def _settings(ns: argparse.Namespace) -> tuple[Settings, Path | None]:
    env_file = Path(ns.env_file).resolve() if ns.env_file else None
    if env_file is None and os.environ.get("SKIN_TWIN_ENV_FILE"):
        env_file = Path(os.environ["SKIN_TWIN_ENV_FILE"])
    return Settings.load(env_file), env_file


def _cmd_up(ns: argparse.Namespace) -> int:
    s, env_file = _settings(ns)
    state = up(s, env_file)
    user = s.get("AIRFLOW_ADMIN_USER")
    print(
        f"""
skin-twin stack healthy after {state['healthy_after_s']} s (process mode, state {_state_path(s)})
  Airflow UI / API  {s.api_url}   (user {user}, password AIRFLOW_ADMIN_PASSWORD in {env_file or 'the environment'})
  MLflow            {s.mlflow_url}
  logs              {s.log_dir}/<service>.log, task logs in {s.log_dir / 'tasks'}
  token             curl -s -X POST {s.api_url}/auth/token -H 'Content-Type: application/json' -d '{{"username": "{user}", "password": "<AIRFLOW_ADMIN_PASSWORD>"}}'
  stop              make stack-down""",
        flush=True,
    )
    return 0


def _cmd_down(ns: argparse.Namespace) -> int:
    s, _ = _settings(ns)
    down(s)
    if ns.drop_data:
        drop_databases(s)
        shutil.rmtree(s.stack_dir, ignore_errors=True)
        _log(f"dropped databases {s.get('SKIN_TWIN_AIRFLOW_DB')}, {s.get('SKIN_TWIN_MLFLOW_DB')} and {s.stack_dir}")
    return 0


def _cmd_status(ns: argparse.Namespace) -> int:
    s, _ = _settings(ns)
    cfg = _pipeline_config(s)
    procs = running(s)
    bad = 0
    for name in SERVICES:
        problem = check(name, s, cfg)
        bad += problem is not None
        where = f"pid {procs[name]}" if name in procs else "(not started by this stack dir)"
        print(f"{name:<24} {'healthy' if problem is None else 'UNHEALTHY: ' + problem}  {where}")
    return 1 if bad else 0


def _cmd_health(ns: argparse.Namespace) -> int:
    s, _ = _settings(ns)
    problem = check(ns.service, s)
    print("healthy" if problem is None else problem)
    return 0 if problem is None else 1


def _cmd_run(ns: argparse.Namespace) -> int:
    s, _ = _settings(ns)
    return run_service(ns.service, s)


def _cmd_init_env(ns: argparse.Namespace) -> int:
    target = init_env(Path(ns.path), force=ns.force)
    print(f"wrote {target} (mode 0600) with fresh secrets; process mode reads it as is, compose with --env-file")
    return 0


def _cmd_env_example(ns: argparse.Namespace) -> int:
    text = render_env_example()
    if ns.check:
        ok = ENV_EXAMPLE.is_file() and ENV_EXAMPLE.read_text(encoding="utf-8") == text
        print("up to date" if ok else f"{ENV_EXAMPLE} differs: run python -m pipeline.app.stack env-example")
        return 0 if ok else 1
    ENV_EXAMPLE.write_text(text, encoding="utf-8")
    print(f"wrote {ENV_EXAMPLE}")
    return 0


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "up": (_cmd_up, "process mode: bootstrap, start every service, wait until all answer (make stack-up)"),
    "down": (_cmd_down, "process mode: stop every service by process group (make stack-down)"),
    "status": (_cmd_status, "health of every service; exit 1 when one does not answer"),
    "health": (_cmd_health, "health of one service (compose health checks); exit 1 when it does not answer"),
    "run": (_cmd_run, "run one service in the foreground (compose commands; `up` starts each this way)"),
    "init-env": (_cmd_init_env, "write an env file from docker/.env.example with fresh secrets"),
    "env-example": (_cmd_env_example, "regenerate docker/.env.example from SETTINGS (--check: compare only)"),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.app.stack", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True, metavar="<command>")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name not in ("init-env", "env-example"):
            p.add_argument("--env-file", default=None, help="settings file (default: none; $SKIN_TWIN_ENV_FILE)")
        if name in ("health", "run"):
            p.add_argument("service", choices=[INIT, *SERVICES] if name == "run" else SERVICES)
        if name == "down":
            p.add_argument("--drop-data", action="store_true", help="also drop both databases and the stack dir")
        if name == "init-env":
            p.add_argument("path", nargs="?", default=str(DEFAULT_ENV_FILE))
            p.add_argument("--force", action="store_true", help="overwrite an existing file")
        if name == "env-example":
            p.add_argument("--check", action="store_true")
    ns = ap.parse_args(argv)
    try:
        return COMMANDS[ns.command][0](ns)
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
