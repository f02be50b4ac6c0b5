"""The project's errors: each becomes one clear message and an exit code by class (no traceback).

==========================  =====  ===================================================================
class                       exit   meaning
==========================  =====  ===================================================================
:class:`PipelineError`      1      a stage cannot go on with its input (file named, problem said);
                                   deterministic, so Airflow fails the task at once (no retry)
:class:`DataError`          1      bad input data (unreadable image, bad manifest, unknown label...)
:class:`ValidationFailed`   1      the Great Expectations suite failed (details in its report)
``ConfigError``             2      bad parameters or command line (:mod:`pipeline.config`)
:class:`EnvironmentFailure` 3      the environment failed: disk full, read-only or missing folder,
                                   a service (MLflow, database, lock) unreachable; Airflow retries
any other exception         4      a bug: "internal error", full traceback with ``-v``
==========================  =====  ===================================================================
"""

from __future__ import annotations


class PipelineError(RuntimeError):
    """A stage cannot go on; the message names the file and the problem."""


class DataError(PipelineError):
    """Bad input data (unreadable image, bad manifest, unknown label, ...)."""


class ValidationFailed(PipelineError):
    """The Great Expectations suite failed; details are in the validation report."""


class EnvironmentFailure(RuntimeError):
    """The environment failed (storage, a service); the message names the file or URI and the cause."""


class StorageError(EnvironmentFailure):
    """A file or folder could not be written or read for reasons of the machine (disk full, read-only...)."""


class ServiceUnavailable(EnvironmentFailure):
    """A service (MLflow tracking server, database, lock server) did not answer in time."""
