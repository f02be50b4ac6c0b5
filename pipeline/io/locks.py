"""A lock that holds across processes and hosts, for the registry's champion gate.

The gate reads the current champion, scores both models and moves the ``champion`` alias; two
``register`` runs doing that at once could both see "no champion" and both promote. The whole
decision therefore runs under :func:`gate_lock`, chosen from the store:

* ``file://`` (and by default for a ``sqlite:///`` store: ``<db>.gate.lock`` beside the database) --
  ``fcntl.flock`` on a lock file: processes on one host, or hosts sharing the volume;
* ``postgresql://`` (by default for a PostgreSQL store: the store itself) -- a session-level
  ``pg_advisory_lock`` keyed by the registered model's name;
* ``redis://`` -- a Redis lock (SET NX with a lease), for an MLflow *server* whose database the
  workers cannot reach (the deployment's Celery broker is a natural choice).

``registry.lock_url`` (or ``SKIN_TWIN_REGISTRY_LOCK_URL``, which wins) names the lock; left null it
is derived from the tracking store, and a tracking server without a lock URL is a configuration
error (an unlocked gate is not atomic). Waiting longer than ``registry.lock_timeout_s`` raises
:class:`~pipeline.errors.ServiceUnavailable` (Airflow retries the task).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pipeline.config import Config, ConfigError
from pipeline.errors import ServiceUnavailable, StorageError

log = logging.getLogger(__name__)

LOCK_ENV = "SKIN_TWIN_REGISTRY_LOCK_URL"
_POLL_S = 0.2


def lock_url(cfg: Config, tracking_uri: str) -> str:
    """The lock to use for ``tracking_uri`` (see the module docstring)."""
    url = os.environ.get(LOCK_ENV) or cfg.registry.lock_url
    if url:
        return url
    scheme = urlsplit(tracking_uri).scheme
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri[len("sqlite:///") :] + ".gate.lock").as_uri()
    if scheme.startswith("postgresql"):
        return tracking_uri.replace("postgresql+psycopg2://", "postgresql://", 1)
    raise ConfigError(
        f"registry.lock_url: required for the tracking store {scheme}://... (the champion gate must hold a lock "
        f"every worker reaches: redis://host:port/db, postgresql://... or file:///shared/path; or set {LOCK_ENV})"
    )


def _key(name: str) -> int:
    """A signed 64-bit advisory-lock key for ``name``."""
    return int.from_bytes(hashlib.sha256(f"skin-twin/gate/{name}".encode()).digest()[:8], "big", signed=True)


@contextlib.contextmanager
def _file_lock(path: Path, timeout: float) -> Iterator[None]:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StorageError(f"{path}: cannot open the gate lock file: {exc.strerror or exc}") from exc
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ServiceUnavailable(f"{path}: gate lock still held after {timeout:.0f} s") from None
                time.sleep(_POLL_S)
        yield
    finally:
        os.close(fd)  # closing releases the flock


@contextlib.contextmanager
def _postgres_lock(url: str, key: int, timeout: float) -> Iterator[None]:
    import psycopg2

    try:
        conn = psycopg2.connect(url, connect_timeout=max(1, int(min(timeout, 30))))
    except psycopg2.Error as exc:
        raise ServiceUnavailable(f"{_redacted(url)}: cannot connect for the gate lock: {' '.join(str(exc).split())}") from exc
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SET statement_timeout = %s", (int(timeout * 1000),))
            try:
                cur.execute("SELECT pg_advisory_lock(%s)", (key,))
            except psycopg2.errors.QueryCanceled:
                raise ServiceUnavailable(f"{_redacted(url)}: gate lock still held after {timeout:.0f} s") from None
            cur.execute("SET statement_timeout = 0")
        yield
    finally:
        conn.close()  # ends the session: the advisory lock is released even if unlock is never reached


@contextlib.contextmanager
def _redis_lock(url: str, name: str, timeout: float) -> Iterator[None]:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=10, socket_timeout=30)
    # The lease outlives a slow gate (two models scored) but frees the lock if the holder dies.
    lock = client.lock(f"skin-twin:gate:{name}", timeout=max(3600.0, timeout), blocking_timeout=timeout)
    try:
        acquired = lock.acquire(blocking=True)
    except redis.RedisError as exc:
        raise ServiceUnavailable(f"{_redacted(url)}: gate lock unavailable: {exc}") from exc
    if not acquired:
        raise ServiceUnavailable(f"{_redacted(url)}: gate lock still held after {timeout:.0f} s")
    try:
        yield
    finally:
        with contextlib.suppress(redis.RedisError):
            lock.release()


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@", 1)
    return url


@contextlib.contextmanager
def gate_lock(cfg: Config, tracking_uri: str) -> Iterator[str]:
    """Hold the champion-gate lock of ``registry.model_name``; yields the lock URL (redacted)."""
    url = lock_url(cfg, tracking_uri)
    name = cfg.registry.model_name
    timeout = cfg.registry.lock_timeout_s
    scheme = urlsplit(url).scheme
    t0 = time.monotonic()
    if scheme == "file":
        cm = _file_lock(Path(unquote(urlsplit(url).path)), timeout)
    elif scheme.startswith("postgresql"):
        cm = _postgres_lock(url.replace("postgresql+psycopg2://", "postgresql://", 1), _key(name), timeout)
    elif scheme in ("redis", "rediss"):
        cm = _redis_lock(url, name, timeout)
    else:
        raise ConfigError(f"registry.lock_url: unsupported lock {scheme or url!r} (file://, postgresql://, redis://)")
    with cm:
        log.info("gate lock %s held (waited %.2f s)", _redacted(url), time.monotonic() - t0)
        yield _redacted(url)
