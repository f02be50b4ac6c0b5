"""Loading the parameters the way every entry point does: schema (:func:`pipeline.config.load_config`)
plus the rules that depend on the registered data sources (:func:`pipeline.io.readers.check_source_config`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import Config, load_config
from pipeline.io.readers import check_source_config


def check(cfg: Config) -> Config:
    """Cross-registry rules of a loaded config; :class:`~pipeline.config.ConfigError` names the key."""
    check_source_config(cfg)
    return cfg


def load_params(path: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    return check(load_config(path, overrides))
