"""The champion-gate lock: exclusive across processes, for each backend the deployment can use."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.errors import ServiceUnavailable
from pipeline.io.locks import LOCK_ENV, gate_lock, lock_url

ROOT = Path(__file__).resolve().parents[1]
PG_URL = os.environ.get("SKIN_TWIN_PG_URL", "postgresql://postgres@127.0.0.1:5432")
REDIS_URL = os.environ.get("SKIN_TWIN_REDIS_URL", "redis://127.0.0.1:6379")


def _cfg(lock: str | None, timeout: float = 1.0, name: str | None = None):
    over = {"registry.lock_timeout_s": timeout, "registry.lock_url": lock}
    if name:
        over["registry.model_name"] = name
    return load_config(ROOT / "params.yaml", over)


def test_lock_url_follows_the_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LOCK_ENV, raising=False)
    cfg = _cfg(None)
    assert lock_url(cfg, f"sqlite:///{tmp_path}/m.db") == (tmp_path / "m.db.gate.lock").as_uri()
    assert lock_url(cfg, "postgresql+psycopg2://u@h/mlflow") == "postgresql://u@h/mlflow"
    with pytest.raises(ConfigError, match="registry.lock_url: required for the tracking store http"):
        lock_url(cfg, "http://mlflow:5000")
    assert lock_url(_cfg("redis://r:6379/1"), "http://mlflow:5000") == "redis://r:6379/1"
    monkeypatch.setenv(LOCK_ENV, "file:///shared/gate.lock")
    assert lock_url(_cfg("redis://r:6379/1"), "http://mlflow:5000") == "file:///shared/gate.lock"
    monkeypatch.delenv(LOCK_ENV)
    with pytest.raises(ConfigError, match="unsupported lock"):
        with gate_lock(_cfg("ftp://x/y"), "http://mlflow:5000"):
            pass


def _hold(url: str, name: str, ready, release) -> None:  # runs in another process
    from pipeline.io.locks import gate_lock as lock

    cfg = _cfg(url, timeout=30, name=name)
    with lock(cfg, "http://unused"):
        ready.set()
        release.wait(60)


def _backend_url(kind: str, tmp_path: Path) -> str:
    if kind == "file":
        return (tmp_path / "gate.lock").as_uri()
    if kind == "postgres":
        psycopg2 = pytest.importorskip("psycopg2")
        try:
            psycopg2.connect(f"{PG_URL}/postgres", connect_timeout=3).close()
        except psycopg2.Error as exc:
            if os.environ.get("CI"):
                pytest.fail(f"PostgreSQL unreachable under CI: {exc}")
            pytest.skip(f"PostgreSQL unreachable: {exc}")
        return f"{PG_URL}/postgres"
    import redis

    try:
        redis.Redis.from_url(f"{REDIS_URL}/0", socket_connect_timeout=3).ping()
    except redis.RedisError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"Redis unreachable under CI: {exc}")
        pytest.skip(f"Redis unreachable: {exc}")
    return f"{REDIS_URL}/{8 + os.getpid() % 8}"


@pytest.mark.services
@pytest.mark.parametrize("kind", ["file", "postgres", "redis"])
def test_a_held_lock_excludes_another_process_until_released(kind: str, tmp_path: Path) -> None:
    url = _backend_url(kind, tmp_path)
    name = f"gate-test-{os.getpid()}-{kind}"
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(url, name, ready, release))
    holder.start()
    try:
        assert ready.wait(60), "the holder never got the lock"
        t0 = time.monotonic()
        with pytest.raises(ServiceUnavailable, match="gate lock still held after 1 s"):
            with gate_lock(_cfg(url, timeout=1.0, name=name), "http://unused"):
                pass
        assert time.monotonic() - t0 >= 0.9  # it really waited for the lock
        release.set()
        holder.join(60)
        with gate_lock(_cfg(url, timeout=10.0, name=name), "http://unused") as held:
            assert held  # free again once the holder let go
    finally:
        release.set()
        holder.join(10)
        if holder.is_alive():
            holder.kill()


def test_a_crashed_holder_does_not_block_the_file_lock(tmp_path: Path) -> None:
    url = (tmp_path / "gate.lock").as_uri()
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(url, "crash", ready, release))
    holder.start()
    assert ready.wait(60)
    holder.kill()  # dies holding the lock: the OS releases a flock with the process
    holder.join(10)
    with gate_lock(_cfg(url, timeout=5.0, name="crash"), "http://unused"):
        pass
