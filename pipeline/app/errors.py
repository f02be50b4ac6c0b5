"""One top-level handler: every failure becomes a one-line message naming the stage, the file or URI
and the cause, with an exit code by class (see :mod:`pipeline.errors`); the full traceback only with
``-v``."""

from __future__ import annotations

import errno
import traceback
from dataclasses import dataclass

from pipeline.config import ConfigError
from pipeline.errors import EnvironmentFailure, PipelineError

EXIT_INPUT = 1  # the stage's input is bad (data, model files, manifests)
EXIT_PARAMS = 2  # bad parameters or command line
EXIT_ENVIRONMENT = 3  # disk, permissions, services: fix the machine, then re-run (Airflow retries)
EXIT_BUG = 4  # anything else: a bug in skin-twin
EXIT_INTERRUPTED = 130

_NETWORK_HINTS = ("connection refused", "max retries exceeded", "failed to establish", "timed out", "name or service",
                  "connectionerror", "temporarily unavailable", "no route to host", "remotedisconnected")  # fmt: skip


@dataclass(frozen=True)
class Failure:
    code: int
    message: str


def _one_line(text: object, limit: int = 600) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _os_error(exc: OSError) -> str:
    where = exc.filename if exc.filename is not None else ""
    if exc.filename2 is not None:
        where = f"{where} -> {exc.filename2}"
    cause = exc.strerror or str(exc)
    hint = {
        errno.ENOSPC: " (disk full)",
        errno.EROFS: " (read-only file system)",
        errno.EACCES: " (permission denied)",
        errno.EFBIG: " (file size limit)",
        errno.EDQUOT: " (disk quota exceeded)",
    }.get(exc.errno or 0, "")
    return f"{where}: {cause}{hint}" if where else f"{cause}{hint}"


def classify(exc: BaseException) -> Failure:
    """The exit code and the one-line message of a failure."""
    if isinstance(exc, KeyboardInterrupt):
        return Failure(EXIT_INTERRUPTED, "interrupted")
    if isinstance(exc, ConfigError):  # may list several keys, one per line
        return Failure(EXIT_PARAMS, str(exc).strip())
    if isinstance(exc, PipelineError):  # a failed validation lists its checks, one per line
        return Failure(EXIT_INPUT, str(exc).strip())
    if isinstance(exc, EnvironmentFailure):
        return Failure(EXIT_ENVIRONMENT, _one_line(exc))
    if isinstance(exc, OSError):
        return Failure(EXIT_ENVIRONMENT, _one_line(_os_error(exc)))
    if isinstance(exc, MemoryError):
        return Failure(EXIT_ENVIRONMENT, "out of memory")
    name = type(exc).__name__
    module = type(exc).__module__ or ""
    text = _one_line(exc)
    if name == "OutOfMemoryError" and module.startswith("torch"):
        return Failure(EXIT_ENVIRONMENT, f"out of GPU memory ({text[:200]}); lower train.batch_size")
    if module.startswith(("requests", "urllib3", "psycopg2", "redis")) or (
        module.startswith("mlflow") and any(h in text.lower() for h in _NETWORK_HINTS)
    ):
        return Failure(EXIT_ENVIRONMENT, f"service unreachable: {name}: {text}")
    if module.startswith("mlflow"):
        return Failure(EXIT_INPUT, f"MLflow refused the request: {text}")
    if isinstance(exc, RuntimeError) and "file write failed" in text:
        return Failure(EXIT_ENVIRONMENT, f"write failed: {text[-200:]}")
    return Failure(EXIT_BUG, f"internal error: {name}: {text} (a bug in skin-twin; run with -v for the traceback)")


def report(stage: str, exc: BaseException, verbose: bool) -> tuple[int, str]:
    """(exit code, text for stderr)."""
    failure = classify(exc)
    text = f"error: {stage}: {failure.message}"
    if verbose:
        text = "".join(traceback.format_exception(exc)).rstrip() + "\n" + text
    return failure.code, text
