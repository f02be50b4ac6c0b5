"""Errors the CLI reports as one clear message and a non-zero exit (no traceback)."""

from __future__ import annotations


class PipelineError(RuntimeError):
    """A stage cannot go on; the message names the file and the problem."""


class DataError(PipelineError):
    """Bad input data (unreadable image, bad manifest, unknown label, ...)."""


class ValidationFailed(PipelineError):
    """The Great Expectations suite failed; details are in the validation report."""
