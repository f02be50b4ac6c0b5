"""Shared fixtures. Area-specific helpers live in the test modules themselves."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SKIN_TWIN_SHARED_DATA", ROOT.parent / "shared" / "data"))

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@pytest.fixture
def project_root() -> Path:
    return ROOT


@pytest.fixture
def params_path() -> Path:
    return ROOT / "params.yaml"


@pytest.fixture
def tiny_overrides(tmp_path: Path) -> dict[str, object]:
    """Overrides that make every stage tiny and write below tmp_path."""
    return {
        "paths.work_dir": str(tmp_path / "work"),
        "synthetic.images_per_class": 8,
        "synthetic.image_size": 48,
        "augment.image_size": 32,
        "augment.copies": 1,
        "augment.max_copies": 2,
        "pairs.epochs": 2,
        "pairs.batch_size": 16,
        "train.epochs": 2,
        "train.batch_size": 16,
        "train.progress": False,
        "validate.workers": 1,
        "augment.workers": 1,
        "mlflow.tracking_uri": f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}",
        "mlflow.artifact_root": str(tmp_path / "mlflow" / "artifacts"),
    }


@pytest.fixture
def tiny_config(params_path: Path, tiny_overrides: dict[str, object]):
    from pipeline.config import load_config

    return load_config(params_path, tiny_overrides)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URI of a real ``mlflow server`` on 127.0.0.1 (own SQLite + artifact folder), one per module."""
    from mlflow_server import start_server

    srv = start_server(tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield srv.uri
    finally:
        srv.stop()
