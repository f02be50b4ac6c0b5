"""End to end: ``dvc repro`` of the whole pipeline on tiny synthetic data in a temporary copy of the repo.

Checks that a fresh clone reproduces, that a second ``dvc repro`` is a no-op, and that changing one
stage's parameter re-runs only what depends on it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "synthetic": {"images_per_class": 8, "image_size": 48},
    "augment": {"image_size": 32, "copies": 1, "max_copies": 2, "workers": 1},
    "validate": {"workers": 1},
    "pairs": {"epochs": 2, "batch_size": 16},
    "model": {
        "stem_channels": 8,
        "extractor": [[1, 8, 1, 1], [2, 16, 1, 2]],
        "branch": [[2, 24, 1, 2]],
        "head_channels": 32,
        "discriminator_hidden": 16,
    },
    "train": {"epochs": 2, "batch_size": 16, "progress": False},
    "evaluate": {"cam_per_class": 1},
}


def _deep_update(base: dict, upd: dict) -> dict:
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v
    return base


def _tracked_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [line for line in out.splitlines() if line and (ROOT / line).is_file()]


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    dst = tmp_path / "repo"
    for rel in _tracked_files():
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)
    params = yaml.safe_load((dst / "params.yaml").read_text())
    (dst / "params.yaml").write_text(yaml.safe_dump(_deep_update(params, TINY), sort_keys=False))
    env = _env()
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dst, check=True, env=env)
    return dst


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("GIT_AUTHOR_NAME", "test")
    env.setdefault("GIT_AUTHOR_EMAIL", "test@example.invalid")
    env.setdefault("GIT_COMMITTER_NAME", "test")
    env.setdefault("GIT_COMMITTER_EMAIL", "test@example.invalid")
    env["DVC_NO_ANALYTICS"] = "1"
    return env


def _dvc(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), *args],
        cwd=repo,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


@pytest.mark.slow
def test_dvc_repro_end_to_end(repo_copy: Path) -> None:
    stages = set(yaml.safe_load((repo_copy / "dvc.yaml").read_text())["stages"])

    first = _dvc(repo_copy, "repro")
    assert _ran(first.stdout) == stages

    metrics = json.loads((repo_copy / "reports" / "metrics.json").read_text())
    for key in (
        "accuracy",
        "balanced_accuracy",
        "macro_auc",
        "params_inference",
        "params_train",
        "selected_branch",
        "val_loss_branch1",
        "val_loss_branch2",
    ):
        assert key in metrics, key
    assert metrics["selected_branch"] in (1, 2)
    assert 0.0 <= metrics["balanced_accuracy"] <= 1.0
    assert (repo_copy / "models" / "export" / "weights.pt").is_file()
    assert (repo_copy / "dvc.lock").is_file()

    # A second repro changes nothing.
    second = _dvc(repo_copy, "repro")
    assert _ran(second.stdout) == set()
    status = _dvc(repo_copy, "status", "--json")
    assert json.loads(status.stdout or "{}") == {}

    assert json.loads((repo_copy / "reports" / "mlflow.json").read_text())["registry"]["version"]

    # Changing one evaluate-only parameter re-runs evaluate (and at most publish), nothing upstream.
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["evaluate"]["cam_per_class"] = 2
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = _dvc(repo_copy, "repro")
    ran = _ran(third.stdout)
    assert "evaluate" in ran
    # publish re-runs only if evaluate's outputs it depends on changed; nothing upstream re-runs.
    assert ran <= {"evaluate", "publish"}, ran


def _ham_folder(root: Path, per_class: int = 4) -> Path:
    """A small data set in the HAM10000 layout, outside the repository (like ../shared/data)."""
    from PIL import Image

    from pipeline.labels import CLASSES

    rng = np.random.default_rng(0)
    rows = ["lesion_id,image_id,dx,dx_type,age,sex,localization,dataset"]
    (root / "images").mkdir(parents=True)
    for c, cls in enumerate(CLASSES):
        for i in range(per_class):
            image_id = f"ISIC_{c}{i:03d}"
            arr = np.clip(rng.normal(60 + 25 * c, 30, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / "images" / f"{image_id}.jpg", quality=90)
            rows.append(f"HAM_{c}{i:03d},{image_id},{cls},histo,50.0,male,back,vidir_modern")
    (root / "HAM10000_metadata.csv").write_text("\n".join(rows) + "\n")
    return root


def _python(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=repo, env=_env(), capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.mark.slow
def test_real_source_runs_no_synthesis_and_a_changed_image_reruns_ingest(repo_copy: Path, tmp_path: Path) -> None:
    data = _ham_folder(tmp_path / "clinic")
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["data"].update({"source": "ham10000", "root": str(data)})
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    # The committed dvc.yaml (synthetic source) no longer fits: a stage refuses to run from it.
    stale = subprocess.run([str(Path(sys.executable).parent / "dvc"), "repro", "ingest"], cwd=repo_copy, env=_env(),
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert stale.returncode != 0 and "regenerate it with `python -m pipeline dvc-yaml`" in stale.stdout + stale.stderr

    _python(repo_copy, "dvc-yaml")
    stages = yaml.safe_load((repo_copy / "dvc.yaml").read_text())["stages"]
    assert "synthesize" not in stages and str(data) in stages["ingest"]["deps"]

    first = _dvc(repo_copy, "repro", "validate")
    assert _ran(first.stdout) == {"ingest", "validate"}
    assert not (repo_copy / "data" / "synthetic").exists()
    assert _ran(_dvc(repo_copy, "repro", "validate").stdout) == set()

    # one image changes (same id, other pixels): ingest re-runs, and so does validate (new manifest)
    from PIL import Image

    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(data / "images" / "ISIC_0000.jpg", quality=90)
    again = _dvc(repo_copy, "repro", "validate")
    assert _ran(again.stdout) == {"ingest", "validate"}
