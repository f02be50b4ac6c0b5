"""Test helpers for the MLflow stages: a real ``mlflow server`` and a fake finished run folder.

:func:`start_server` starts ``mlflow server`` on 127.0.0.1 (free port, its own SQLite backend and
artifact folder, ``--serve-artifacts``) in a new session, waits for ``/health`` and returns a handle
whose :meth:`MlflowServer.stop` kills the whole process group.

:func:`make_run` writes what the stages before ``track`` leave in a work dir: a validated manifest
(with per-image sha256), an augmented set with a test split, an exported tiny model (built with
:func:`pipeline.core.model.build_twin` / :func:`~pipeline.core.model.inference_model`, written with
:func:`pipeline.io.modelstore.export_inference`), ``metrics.json``, ``history.csv``, plots, CAM grid,
validation result + HTML and the pair summary.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

TINY_MODEL: dict[str, Any] = {
    "model.stem_channels": 8,
    "model.extractor": [[1, 8, 1, 1]],
    "model.branch": [[2, 16, 1, 2]],
    "model.head_channels": 16,
    "model.discriminator_hidden": 8,
    "augment.image_size": 32,
}


# --------------------------------------------------------------------------------------------
# mlflow server
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class MlflowServer:
    proc: subprocess.Popen
    uri: str
    log_path: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)

    def log_tail(self, n: int = 3000) -> str:
        return _tail(self.log_path, n)


def start_server(folder: Path, timeout: float = 90.0) -> MlflowServer:
    """``mlflow server`` with a SQLite backend and served artifacts below ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [
        str(mlflow_bin) if mlflow_bin.exists() else sys.executable,
        *([] if mlflow_bin.exists() else ["-m", "mlflow"]),
        "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
        "--serve-artifacts",
        "--artifacts-destination", str(folder / "artifacts"),
        "--workers", "1",
    ]
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
    return _launch(cmd, folder / "server.log", env, port, "/health", timeout)


def serve_model(model_dir: Path, folder: Path, workers: int = 2, timeout: float = 120.0) -> MlflowServer:
    """``mlflow models serve`` of the MLflow model folder ``model_dir`` in this environment
    (``--env-manager local``), answering ``/ping``; its log below ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    bin_dir = Path(sys.executable).parent
    cmd = [str(bin_dir / "mlflow"), "models", "serve", "-m", str(model_dir), "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port), "--workers", str(workers)]  # fmt: skip
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}  # uvicorn from the venv
    return _launch(cmd, folder / "serve.log", env, port, "/ping", timeout)


def _launch(cmd: list[str], log_path: Path, env: dict[str, str], port: int, ready: str, timeout: float) -> MlflowServer:
    """Start ``cmd`` in its own process group (cwd: the log's folder) and wait until ``ready`` answers."""
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, cwd=log_path.parent, env=env, start_new_session=True
        )
    server = MlflowServer(proc, f"http://127.0.0.1:{port}", log_path)
    try:
        wait_http(f"{server.uri}{ready}", proc, log_path, timeout)
    except RuntimeError:
        server.stop()
        raise
    return server


def wait_http(url: str, proc: subprocess.Popen, log_path: Path, timeout: float = 90.0) -> None:
    """Wait until ``url`` answers 200; RuntimeError with the log's tail if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}:\n{_tail(log_path)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer in {timeout}s:\n{_tail(log_path)}")


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


# --------------------------------------------------------------------------------------------
# fake run folder
# --------------------------------------------------------------------------------------------


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _image(rng: np.random.Generator, cls: int, size: int) -> np.ndarray:
    base = np.full((size, size, 3), 40.0)
    yy, xx = np.mgrid[0:size, 0:size]
    blob = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size / 3) ** 2
    base[blob] = [(37 * (cls + 1)) % 256, (91 * (cls + 2)) % 256, (53 * (cls + 3)) % 256]
    base += rng.normal(0, 12, base.shape)
    return np.clip(base, 0, 255).astype(np.uint8)


def export_tiny_model(cfg: Any, folder: Path, seed: int = 0, extra_meta: dict[str, Any] | None = None) -> Path:
    """A tiny random inference model in the export format (weights.pt, config.json, model.ts)."""
    import torch

    from pipeline.core.model import build_twin, count_parameters, inference_model
    from pipeline.core.selection import build_meta
    from pipeline.io.files import atomic_dir
    from pipeline.io.modelstore import export_inference

    torch.manual_seed(seed)
    twin = build_twin(cfg.model, 7).eval()
    inf = inference_model(twin, 0).eval()
    best = {
        "model_config": json.loads(json.dumps(cfg.model.model_dump(mode="json"))),
        "num_classes": 7,
        "image_size": cfg.augment.image_size,
        "epoch": 2,
        "val_loss_branch1": 1.1,
        "val_loss_branch2": 1.3,
        "val_loss_discriminator": 0.6,
        "val_loss_total": 2.7,
        "params_train": count_parameters(twin),
        "config_digest": cfg.digest(),
    }
    meta = build_meta(best, 1, count_parameters(inf)) | dict(extra_meta or {})
    with atomic_dir(folder) as tmp:
        export_inference(inf, meta, tmp)
    return folder


def make_run(cfg: Any, seed: int = 0, per_split: tuple[int, int, int] = (3, 2, 2), fake_ba: float | None = None) -> Path:
    """Write a finished pipeline run (everything ``track`` reads) below ``cfg.paths.work_dir``."""
    from pipeline.io.readers import data_root
    from pipeline.labels import CLASSES
    from pipeline.layout import Layout

    layout = Layout.from_config(cfg)
    rng = np.random.default_rng(seed)
    size = cfg.augment.image_size
    rows, aug_rows = [], []
    for split, n in zip(("train", "val", "test"), per_split, strict=True):
        for c, cls in enumerate(CLASSES):
            for k in range(n):
                image_id = f"{split}_{cls}_{k}"
                png = _png_bytes(_image(rng, c, size))
                raw = data_root(cfg) / f"{image_id}.png"
                raw.parent.mkdir(parents=True, exist_ok=True)
                raw.write_bytes(png)
                rows.append({
                    "image_id": image_id, "path": f"{image_id}.png", "label": cls, "group_id": image_id,
                    "split": split, "width": size, "height": size, "sha256": hashlib.sha256(png).hexdigest(),
                })
                rel = f"{split}/{cls}/{image_id}.png"
                (layout.augmented_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                (layout.augmented_dir / rel).write_bytes(png)
                aug_rows.append({"image_id": image_id, "source_id": image_id, "path": rel, "label": cls,
                                 "group_id": image_id, "split": split, "copy": 0})
    manifest = pd.DataFrame(rows)
    layout.validated_manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.to_parquet(layout.manifest, index=False)
    manifest.to_parquet(layout.validated_manifest, index=False)
    pd.DataFrame(aug_rows).to_parquet(layout.augmented_manifest, index=False)
    pd.DataFrame({"epoch": [0], "batch": [0], "left_id": ["a"], "right_id": ["b"], "left_label": ["nv"],
                  "right_label": ["nv"], "same": [1], "kind": ["positive"]}).to_parquet(layout.pairs, index=False)

    extra = {"fake_balanced_accuracy": fake_ba} if fake_ba is not None else None
    export_tiny_model(cfg, layout.export_dir, seed=seed, extra_meta=extra)

    layout.train_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({
        "epoch": [1, 2], "train_loss": [2.5, 2.1], "train_focal1": [1.0, 0.9], "train_focal2": [1.1, 0.95],
        "train_disc": [0.7, 0.65], "val_loss_branch1": [1.3, 1.1], "val_loss_branch2": [1.4, 1.3],
        "val_loss_discriminator": [0.69, 0.6], "val_loss_total": [3.0, 2.7], "lr": [0.003, 0.0015],
        "seconds": [0.5, 0.4],
    }).to_csv(layout.train_dir / "history.csv", index=False)
    metrics = {
        "accuracy": 0.25, "balanced_accuracy": 0.2, "macro_auc": 0.55, "params_inference": 1000,
        "params_train": 2000, "selected_branch": 1, "val_loss_branch1": 1.1, "val_loss_branch2": 1.3,
        "best_epoch": 2, "test_images": 7 * per_split[2], "auc_df": None,
        **{f"recall_{c}": 0.2 for c in CLASSES},
    }
    layout.metrics.parent.mkdir(parents=True, exist_ok=True)
    layout.metrics.write_text(json.dumps(metrics))
    layout.plots_dir.mkdir(parents=True, exist_ok=True)
    for name in ("confusion_matrix.png", "roc.png"):
        (layout.plots_dir / name).write_bytes(_png_bytes(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)))
    pd.DataFrame({"actual": ["nv"], "predicted": ["mel"]}).to_csv(layout.plots_dir / "confusion.csv", index=False)
    layout.cam_dir.mkdir(parents=True, exist_ok=True)
    for name in ("grid.png", "nv_correct_test_nv_0.png"):
        (layout.cam_dir / name).write_bytes(_png_bytes(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)))
    layout.validation_dir.mkdir(parents=True, exist_ok=True)
    (layout.validation_dir / "result.json").write_text(json.dumps({"success": True, "statistics": {"evaluated": 9}}))
    (layout.validation_dir / "summary.html").write_text("<html><body>validation passed</body></html>")
    layout.pairs_summary.write_text(json.dumps({"epochs": 2, "pairs": 42, "positive_fraction": 0.5}))
    layout.ingest_summary.write_text(json.dumps({
        "rows": len(manifest), "per_split": {s: 7 * n for s, n in zip(("train", "val", "test"), per_split, strict=True)},
        "near_duplicate_joins": {"lesions": 1, "examples": {"train_nv_1": "train_nv_0"}, "all": {"train_nv_1": "train_nv_0"}},
    }))
    return layout.work_dir


def make_cfg(base: Path, name: str = "work", tracking_uri: str | None = None, **extra: Any) -> Any:
    """A tiny config writing below ``base/name``; tracking in ``base/mlflow`` (SQLite) unless a URI is given."""
    from pipeline.config import load_config

    overrides: dict[str, Any] = {
        "paths.work_dir": str(base / name),
        "train.progress": False,
        "evaluate.batch_size": 32,
        "mlflow.tracking_uri": tracking_uri or f"sqlite:///{base / 'mlflow' / 'mlflow.db'}",
        "mlflow.artifact_root": str(base / "mlflow" / "artifacts"),
        "registry.model_name": "skin-twin-test",
        **TINY_MODEL,
        **extra,
    }
    if tracking_uri and tracking_uri.startswith("http") and "registry.lock_url" not in extra:
        # an MLflow server needs a gate lock every worker reaches; here a file beside the store
        overrides["registry.lock_url"] = (base / "gate.lock").as_uri()
    return load_config(ROOT / "params.yaml", overrides)


def fake_score(calls: list | None = None):
    """A stand-in for :func:`pipeline.io.scoring.score_model` returning the export's
    ``fake_balanced_accuracy`` (set by :func:`make_run`); records the manifests it was given."""

    def score(exported: Any, manifest_df: pd.DataFrame, images_root: Any, cfg: Any):
        if calls is not None:
            calls.append((exported.meta.get("fake_balanced_accuracy"), manifest_df.copy(), str(images_root)))
        ba = exported.meta.get("fake_balanced_accuracy")
        n = len(manifest_df)
        return {"balanced_accuracy": ba, "accuracy": ba}, np.full((n, 7), 1 / 7)

    return score
