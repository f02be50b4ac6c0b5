"""Reliability suite: every kind of bad input the project knows, and the faults a deployment meets.

Each corpus case runs one real CLI stage (``pipeline.app.cli.main``, the code ``python -m pipeline``
runs) on input broken in one way and checks what an operator must be able to rely on:

* a non-zero exit with the code of its class (1 bad input, 2 bad parameters, 3 environment),
* one clear message on stderr that names the stage and the file / key / URI and the problem,
* no traceback, and nothing accepted that should not be: no half-written artifact, no output
  claiming success, no code run from a file.

The fault tests run real processes: ``kill -9`` during training then resume (bit-identical), resume
after the run folder moved, two ``register`` processes at once against one store, an MLflow server
that does not answer, a full disk and a read-only folder (tmpfs mounts; ``chattr +i`` / an
``RLIMIT_FSIZE`` limit where mounting is not allowed), tampered checkpoints and exports.

The terminal summary prints one line for the suite: cases tried, clear errors, accepted wrongly,
and the time of each fault test.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from mlflow_server import export_tiny_model, make_cfg
from test_train import TINY_MODEL, make_work
from test_validation import clean_case, rgb_bytes

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"
TALLY: dict[str, Any] = {"tried": 0, "clear": 0, "accepted": [], "faults": {}}

# --------------------------------------------------------------------------------------------- harness


@dataclass(frozen=True)
class Outcome:
    code: int
    out: str
    err: str


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> Outcome:
    from pipeline.app.cli import main

    code = main(list(argv))
    captured = capsys.readouterr()
    return Outcome(code, captured.out, captured.err)


def judge(outcome: Outcome, code: int, *needles: str, name: str) -> None:
    """Count the case; fail unless it is a clear error of the expected class naming the problem."""
    TALLY["tried"] += 1
    if outcome.code == 0:
        TALLY["accepted"].append(name)
    assert outcome.code == code, f"{name}: exit {outcome.code}, expected {code}\n{outcome.err}"
    err = outcome.err
    assert "Traceback" not in err, f"{name}: raw traceback\n{err}"
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert lines, f"{name}: no 'error:' line\n{err}"
    for needle in needles:
        assert needle in err, f"{name}: {needle!r} not in\n{err}"
    TALLY["clear"] += 1


@pytest.fixture(scope="module", autouse=True)
def _summary(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    rep = request.config.pluginmanager.getplugin("terminalreporter")
    faults = ", ".join(f"{k} {v:.1f} s" for k, v in TALLY["faults"].items())
    line = (
        f"reliability: {TALLY['tried']} bad-input cases tried, {TALLY['clear']} clear errors, "
        f"{len(TALLY['accepted'])} accepted that should not be {TALLY['accepted'] or ''}; fault tests: {faults or 'none'}"
    )
    if rep is not None:
        rep.write_line("")
        rep.write_line(line)


@contextlib.contextmanager
def timed_fault(name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    TALLY["faults"][name] = time.perf_counter() - t0


def _sets(overrides: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for k, v in overrides.items():
        out += ["--set", f"{k}={json.dumps(v) if isinstance(v, (list, dict)) or v is None else v}"]
    return out


# --------------------------------------------------------------------------------------------- parameters

PARAM_CASES: dict[str, tuple[dict[str, Any], str]] = {
    "negative_seed": ({"seed": -1}, "seed"),
    "seed_too_large": ({"seed": 2**40}, "seed"),
    "infinite_lr": ({"train.lr": ".inf"}, "train.lr"),
    "nan_loss_weight": ({"loss.A": ".nan"}, "loss.A"),
    "unknown_key": ({"train.epoch": 3}, "train.epoch"),
    "wrong_type": ({"train.epochs": "many"}, "train.epochs"),
    "zero_batch": ({"train.batch_size": 0}, "train.batch_size"),
    "momentum_with_adamw": ({"train.momentum": 0.9}, "train.momentum"),
    "warmup_with_onecycle": ({"train.schedule": "onecycle", "train.warmup_epochs": 1}, "train.warmup_epochs"),
    "stride_three": ({"model.extractor": [[1, 16, 1, 3]]}, "model.extractor"),
    "alpha_length": ({"loss.alpha": [1.0, 2.0]}, "loss.alpha"),
    "split_sum": ({"data.split.train": 0.9}, "data.split"),
    "unknown_source": ({"data.source": "dicom"}, "data.source"),
    "csv_source_without_csv": ({"data.source": "isic_csv", "data.root": "/tmp"}, "data.csv"),
    "real_source_without_root": ({"data.source": "ham10000"}, "data.root"),
    "model_name_with_slash": ({"registry.model_name": "a/b"}, "registry.model_name"),
    "min_width_above_max": ({"validate.min_width": 500, "validate.max_width": 100}, "validate"),
    "negative_timeout": ({"mlflow.http_timeout_s": -1}, "mlflow.http_timeout_s"),
}


@pytest.mark.parametrize("name", sorted(PARAM_CASES))
def test_bad_parameters_exit_2_naming_the_key(name: str, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    overrides, key = PARAM_CASES[name]
    outcome = cli(capsys, "ingest", "--params", str(PARAMS), "--set", f"paths.work_dir={tmp_path}", *_sets(overrides))
    judge(outcome, 2, key, name=f"params:{name}")
    assert not (tmp_path / "data").exists(), "a stage ran on refused parameters"


def test_duplicate_yaml_key_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    text = PARAMS.read_text() + "\nseed: 7\n"  # YAML would silently keep the last one
    params = tmp_path / "params.yaml"
    params.write_text(text)
    judge(cli(capsys, "ingest", "--params", str(params)), 2, "duplicate key 'seed'", name="params:duplicate_key")


@pytest.mark.parametrize(
    ("content", "needle"),
    [(None, "params file not found"), (b"seed: [1, 2\n", "not valid YAML"), (b"\xff\xfe\x00binary", "params")],
    ids=["missing", "not_yaml", "binary"],
)
def test_unreadable_params_file(content: bytes | None, needle: str, capsys, tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    if content is not None:
        params.write_bytes(content)
    judge(cli(capsys, "ingest", "--params", str(params)), 2, needle, name=f"params:file_{needle}")


# --------------------------------------------------------------------------------------------- ingest

HEADER = "lesion_id,image_id,dx,dx_type,age,sex,localization,dataset\n"


def _ham(root: Path, rows: str, images: dict[str, bytes] | None = None) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "HAM10000_metadata.csv").write_bytes(rows.encode() if isinstance(rows, str) else rows)
    for name, data in (images or {}).items():
        (root / "images" / name).write_bytes(data)
    return root


INGEST_CASES: dict[str, tuple[Callable[[Path], dict[str, Any]], str]] = {
    "root_missing": (lambda t: {"data.source": "ham10000", "data.root": str(t / "absent")}, "data root not found"),
    "metadata_missing": (
        lambda t: {"data.source": "ham10000", "data.root": str(_mkdirs(t / "r", "images"))},
        "metadata file not found",
    ),
    "no_dx_column": (
        lambda t: {"data.source": "ham10000", "data.root": str(_ham(t / "r", "lesion_id,image_id\nL1,I1\n"))},
        "missing column(s) ['dx']",
    ),
    "header_only": (lambda t: {"data.source": "ham10000", "data.root": str(_ham(t / "r", HEADER))}, "no rows"),
    "duplicate_ids": (
        lambda t: {"data.source": "ham10000", "data.root": str(_ham(t / "r", HEADER + "L1,I1,nv,h,1,m,b,x\nL2,I1,mel,h,1,m,b,x\n"))},
        "duplicated image id",
    ),
    "binary_metadata": (
        lambda t: {"data.source": "ham10000", "data.root": str(_ham(t / "r", b"\xff\xfe\x00\x81\x82" * 50))},
        "HAM10000_metadata.csv",
    ),
    "isic_not_one_hot": (
        lambda t: {
            "data.source": "isic_csv", "data.root": str(_ham(t / "r", HEADER)),
            "data.csv": str(_write(t / "gt.csv", "image,MEL,NV,BCC,AKIEC,BKL,DF,VASC\nI1,1,1,0,0,0,0,0\n")),
        },
        "is not one-hot",
    ),
    "unknown_class_folder": (
        lambda t: {"data.source": "imagefolder", "data.root": str(_mkdirs(t / "r", "nv", "moles"))},
        "unknown class folder(s) ['moles']",
    ),
}


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _mkdirs(root: Path, *names: str) -> Path:
    for n in names:
        (root / n).mkdir(parents=True, exist_ok=True)
        (root / n / f"{n}.png").write_bytes(rgb_bytes(1))
    return root


@pytest.mark.parametrize("name", sorted(INGEST_CASES))
def test_unusable_sources_exit_1_naming_the_file(name: str, capsys, tmp_path: Path) -> None:
    make, needle = INGEST_CASES[name]
    overrides = make(tmp_path)
    work = tmp_path / "work"
    outcome = cli(capsys, "ingest", "--params", str(PARAMS), "--set", f"paths.work_dir={work}", *_sets(overrides))
    judge(outcome, 1, needle, name=f"ingest:{name}")
    assert not (work / "data" / "manifest.parquet").exists()


# --------------------------------------------------------------------------------------------- validate


def _validate_case(tmp_path: Path, breaker: Callable[[Any], None]) -> Any:
    case = clean_case(tmp_path)
    breaker(case)
    case.write_manifest()
    return case


def _corrupt(c: Any) -> None:
    c.add("corrupt.jpg", b"\xff\xd8\xff\xe0 not a jpeg at all")


def _gray(c: Any) -> None:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.zeros((36, 40), np.uint8), "L").save(buf, "PNG")
    c.add("gray.png", buf.getvalue())


def _unknown_label(c: Any) -> None:
    c.add("odd.png", rgb_bytes(77), label="melanoma")


def _missing(c: Any) -> None:
    c.rows.append({**c.rows[0], "image_id": "ghost", "path": "images/ghost.png", "group_id": "ghost"})


def _two_labels(c: Any) -> None:
    a = next(r for r in c.rows if r["split"] == "train" and r["label"] == "akiec")
    b = next(r for r in c.rows if r["split"] == "train" and r["label"] == "bcc")
    b["group_id"] = a["group_id"]


def _reencoded(c: Any) -> None:
    import io

    train = next(r for r in c.rows if r["split"] == "train")
    with Image.open(c.root / train["path"]) as img:
        buf = io.BytesIO()
        img.convert("RGB").save(buf, "BMP")
    c.add("copy.bmp", buf.getvalue(), label=train["label"], split="test")


def _escape(c: Any) -> None:
    (c.root.parent / "outside.png").write_bytes(rgb_bytes(5))
    c.rows.append({**c.rows[0], "image_id": "esc", "path": "../outside.png", "group_id": "esc"})


VALIDATE_CASES: dict[str, tuple[Callable[[Any], None], str]] = {
    "corrupt_image": (_corrupt, "corrupt.jpg"),
    "grayscale_image": (_gray, "gray.png"),
    "unknown_label": (_unknown_label, "melanoma"),
    "missing_file": (_missing, "ghost"),
    "lesion_two_labels": (_two_labels, "group_one_label"),
    "same_picture_reencoded": (_reencoded, "near_duplicate_one_split"),
    "path_escapes_root": (_escape, "escapes the data root"),
}


@pytest.mark.parametrize("name", sorted(VALIDATE_CASES))
def test_bad_data_fails_validation_clearly(name: str, capsys, tmp_path: Path) -> None:
    breaker, needle = VALIDATE_CASES[name]
    case = _validate_case(tmp_path, breaker)
    outcome = cli(capsys, "validate", "--params", str(PARAMS), *_sets(case.overrides))
    judge(outcome, 1, needle, name=f"validate:{name}")
    assert not (case.work / "data" / "validated.parquet").exists()


def test_unreadable_manifest(capsys, tmp_path: Path) -> None:
    case = _validate_case(tmp_path, lambda c: None)
    (case.work / "data" / "manifest.parquet").write_bytes(b"PAR1 but not really")
    outcome = cli(capsys, "validate", "--params", str(PARAMS), *_sets(case.overrides))
    judge(outcome, 1, "manifest.parquet", "cannot read parquet", name="validate:unreadable_manifest")


# --------------------------------------------------------------------------------------------- model files, predict


@pytest.fixture(scope="module")
def model_cfg(tmp_path_factory: pytest.TempPathFactory) -> Any:
    base = tmp_path_factory.mktemp("reliab_model")
    return make_cfg(base, **{"augment.image_size": 32})


@pytest.fixture
def export(model_cfg: Any, tmp_path: Path) -> Path:
    return export_tiny_model(model_cfg, tmp_path / "export")


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    return folder


def _rewrite_meta(folder: Path, **changes: Any) -> None:
    meta = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is _DROP:
            meta.pop(k, None)
        else:
            meta[k] = v
    (folder / "config.json").write_text(json.dumps(meta))


_DROP = object()


def _resign(folder: Path) -> None:
    """What an attacker who also edits config.json would do: record the new weights' digest."""
    from pipeline.io.digests import file_sha256

    _rewrite_meta(folder, weights_sha256=file_sha256(folder / "weights.pt"))


class Payload:
    """Pickled, this object runs ``touch <marker>`` when unpickled -- unless loading refuses it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _tamper_nan(folder: Path, marker: Path) -> None:
    state = torch.load(folder / "weights.pt", weights_only=True)
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first] = torch.full_like(state[first], float("nan"))
    torch.save(state, folder / "weights.pt")
    _resign(folder)


def _tamper_overflow(folder: Path, marker: Path) -> None:
    state = torch.load(folder / "weights.pt", weights_only=True)
    key = next(k for k in state if k.endswith("classifier.weight"))
    state[key] = torch.full_like(state[key], 3e38)
    torch.save(state, folder / "weights.pt")
    _resign(folder)


def _tamper_pickle(folder: Path, marker: Path) -> None:
    torch.save({"x": Payload(marker)}, folder / "weights.pt")
    _resign(folder)


MODEL_CASES: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "nan_weights": (_tamper_nan, "non-finite weights"),
    "overflowing_outputs": (_tamper_overflow, "non-finite outputs"),
    "pickle_payload_in_weights": (_tamper_pickle, "not a readable weights file"),
    "random_bytes_weights": (lambda f, m: ((f / "weights.pt").write_bytes(os.urandom(4096)), _resign(f)),
                             "not a readable weights file"),
    "weights_swapped": (lambda f, m: (f / "weights.pt").write_bytes((f / "weights.pt").read_bytes()[:-9] + b"123456789"),
                        "differs from the"),
    "config_missing_image_size": (lambda f, m: _rewrite_meta(f, image_size=_DROP), "image_size"),
    "config_image_size_zero": (lambda f, m: _rewrite_meta(f, image_size=0), "image_size"),
    "config_not_json": (lambda f, m: (f / "config.json").write_text("{not json"), "not readable JSON"),
    "config_wrong_classes": (lambda f, m: _rewrite_meta(f, classes=["a", "b", "c", "d", "e", "f", "g"]), "classes"),
    "config_old_format": (lambda f, m: _rewrite_meta(f, format=1), "export format 1"),
    "weights_missing": (lambda f, m: (f / "weights.pt").unlink(), "not an exported model folder"),
}


@pytest.mark.parametrize("name", sorted(MODEL_CASES))
def test_tampered_or_broken_exports_are_refused(name: str, export: Path, images: Path, capsys, tmp_path: Path) -> None:
    tamper, needle = MODEL_CASES[name]
    marker = tmp_path / "payload-ran"
    tamper(export, marker)
    out = tmp_path / "preds.csv"
    outcome = cli(capsys, "predict", "--params", str(PARAMS), "--model", str(export), "--images", str(images),
                  "--out", str(out))  # fmt: skip
    judge(outcome, 1, needle, name=f"model:{name}")
    assert not out.exists(), "predictions written from a refused model"
    assert not marker.exists(), "code from a model file ran"


@pytest.mark.parametrize(
    ("model", "imgs", "needle"),
    [("absent-model", None, "model folder not found"), (None, "absent-images", "no such file or folder"),
     (None, "unreadable", "could be read")],
    ids=["model_folder_missing", "images_missing", "all_images_unreadable"],
)
def test_predict_bad_arguments(model: str | None, imgs: str | None, needle: str, export: Path, images: Path,
                               capsys, tmp_path: Path) -> None:  # fmt: skip
    if imgs == "unreadable":
        for f in images.iterdir():
            f.write_bytes(b"garbage")
    model_arg = str(tmp_path / model) if model else str(export)
    img_arg = str(tmp_path / imgs) if imgs and imgs != "unreadable" else str(images)
    outcome = cli(capsys, "predict", "--params", str(PARAMS), "--model", model_arg, "--images", img_arg,
                  "--out", str(tmp_path / "p.csv"))  # fmt: skip
    judge(outcome, 1, needle, name=f"predict:{needle}")
    assert not (tmp_path / "p.csv").exists()


def test_registry_uri_of_a_store_that_does_not_exist(images: Path, capsys, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    db = tmp_path / "nowhere" / "mlflow.db"
    outcome = cli(capsys, "predict", "--params", str(PARAMS), "--model", "models:/skin-twin@champion",
                  "--images", str(images), "--out", str(tmp_path / "p.csv"),
                  "--set", f"mlflow.tracking_uri=sqlite:///{db}")  # fmt: skip
    judge(outcome, 1, "no MLflow store there", name="predict:store_missing")
    assert not db.exists() and not db.parent.exists(), "a read created a store"


# --------------------------------------------------------------------------------------------- checkpoints


def _train_args(work: Path, **extra: Any) -> list[str]:
    overrides = {"paths.work_dir": str(work), "train.epochs": 2, "train.batch_size": 16, "train.progress": False,
                 "train.cpu_threads": 1, "evaluate.batch_size": 32, **TINY_MODEL, **extra}  # fmt: skip
    return ["train", "--params", str(PARAMS), *_sets(overrides)]


@pytest.mark.parametrize(
    ("name", "write"),
    [
        ("pickle_payload", lambda p, m: torch.save({"format": 2, "x": Payload(m)}, p)),
        ("random_bytes", lambda p, m: p.write_bytes(os.urandom(2048))),
        ("foreign_checkpoint", lambda p, m: torch.save({"state_dict": {"w": torch.zeros(2)}}, p)),
        ("old_format", lambda p, m: torch.save({"format": 1, "digest": "x"}, p)),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_a_tampered_checkpoint_is_refused_and_kept_aside(name: str, write: Callable, capsys, tmp_path: Path) -> None:
    layout = make_work(tmp_path / "w")
    marker = tmp_path / "payload-ran"
    layout.train_dir.mkdir(parents=True)
    write(layout.train_dir / "last.pt", marker)
    outcome = cli(capsys, *_train_args(tmp_path / "w"))
    judge(outcome, 1, "last.pt: refused", "moved aside", name=f"checkpoint:{name}")
    assert not marker.exists(), "code from a checkpoint ran"
    assert not (layout.train_dir / "last.pt").exists()
    assert len(list(layout.train_dir.glob("last.pt.rejected-*"))) == 1, "the bad file is kept for inspection"
    # the next run starts fresh (and says so in its summary)
    rerun = cli(capsys, *_train_args(tmp_path / "w"))
    assert rerun.code == 0, rerun.err
    assert json.loads(rerun.out.strip().splitlines()[-1])["resumed_after_epoch"] == 0


# --------------------------------------------------------------------------------------------- faults


def _proc(args: list[str], **kw: Any) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.update(kw.pop("env", {}))
    return subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)  # fmt: skip


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _same_states(a: Path, b: Path) -> bool:
    sa, sb = _state(a), _state(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
def test_kill_9_during_training_then_resume_is_bit_identical(tmp_path: Path) -> None:
    extra = {"train.epochs": 16}
    make_work(tmp_path / "full")
    full = _proc(_train_args(tmp_path / "full", **extra))
    assert full.wait(timeout=600) == 0, full.stderr.read()

    with timed_fault("kill -9 + resume"):
        layout = make_work(tmp_path / "killed")
        victim = _proc(_train_args(tmp_path / "killed", **extra))
        last = layout.train_dir / "last.pt"
        deadline = time.monotonic() + 600
        while not last.exists() and victim.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert victim.poll() is None, "training ended before it could be killed"
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=60)
        assert victim.returncode == -signal.SIGKILL
        done = int(torch.load(last, map_location="cpu", weights_only=True)["epoch"])
        assert 1 <= done < 16
        resumed = _proc(_train_args(tmp_path / "killed", **extra))
        out, err = resumed.communicate(timeout=600)
        assert resumed.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1])["resumed_after_epoch"] == done
    assert _same_states(tmp_path / "full" / "models" / "train" / "last.pt", last)
    assert not list(layout.train_dir.glob(".*.tmp")), "a temporary file survived the kill"


@pytest.mark.slow
def test_resume_after_the_run_folder_moved(tmp_path: Path, capsys) -> None:
    from pipeline.stages.train import STOP_ENV

    extra = {"train.epochs": 3}
    make_work(tmp_path / "full")
    assert cli(capsys, *_train_args(tmp_path / "full", **extra)).code == 0
    with timed_fault("resume after move"):
        make_work(tmp_path / "first")
        os.environ[STOP_ENV] = "1"
        try:
            stopped = cli(capsys, *_train_args(tmp_path / "first", **extra))
        finally:
            del os.environ[STOP_ENV]
        assert stopped.code == 1 and "stopped after epoch 1" in stopped.err
        shutil.move(tmp_path / "first", tmp_path / "elsewhere" / "moved")
        again = cli(capsys, *_train_args(tmp_path / "elsewhere" / "moved", **extra))
    assert again.code == 0, again.err
    assert json.loads(again.out.strip().splitlines()[-1])["resumed_after_epoch"] == 1
    assert _same_states(tmp_path / "full" / "models" / "train" / "last.pt",
                        tmp_path / "elsewhere" / "moved" / "models" / "train" / "last.pt")  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_mlflow_down_fails_fast_and_clearly(tmp_path: Path) -> None:
    from mlflow_server import make_run

    cfg = make_cfg(tmp_path, **{"augment.image_size": 32})
    make_run(cfg, seed=3)
    port = _free_port()  # nothing listens there
    args = ["track", "--params", str(PARAMS), "--set", f"paths.work_dir={cfg.paths.work_dir}",
            "--set", "mlflow.http_timeout_s=2", "--set", "mlflow.http_retries=1", *_sets(TINY_MODEL),
            "--set", "augment.image_size=32"]  # fmt: skip
    with timed_fault("MLflow down"):
        proc = _proc(args, env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"})
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    assert f"MLflow tracking server http://127.0.0.1:{port} unreachable" in err and "Traceback" not in err
    assert "mlflow.http_timeout_s=2.0, mlflow.http_retries=1" in err  # the bounded budget was the one applied


@pytest.mark.slow
def test_two_registers_at_once_end_with_one_consistent_champion(tmp_path: Path) -> None:
    from mlflow_server import make_run

    from pipeline.io.mlflow_service import client_for
    from pipeline.io.registry import get_aliases

    works = []
    for i, ba in enumerate((0.6, 0.7)):
        cfg = make_cfg(tmp_path, name=f"work{i}", **{"augment.image_size": 32})
        make_run(cfg, seed=10 + i, fake_ba=ba)
        works.append(cfg)
    base = ["--params", str(PARAMS), *_sets({**TINY_MODEL, "augment.image_size": 32, "registry.floor": 0.0,
            "mlflow.tracking_uri": works[0].mlflow.tracking_uri, "mlflow.artifact_root": works[0].mlflow.artifact_root,
            "registry.model_name": works[0].registry.model_name})]  # fmt: skip
    for cfg in works:  # track one after the other (they create the experiment)
        p = _proc(["track", *base, "--set", f"paths.work_dir={cfg.paths.work_dir}"])
        assert p.wait(timeout=300) == 0, p.stderr.read()
    with timed_fault("two concurrent registers"):
        procs = [_proc(["register", *base, "--set", f"paths.work_dir={cfg.paths.work_dir}"]) for cfg in works]
        results = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err
    client = client_for(works[0])
    name = works[0].registry.model_name
    aliases = get_aliases(client, name)
    versions = {v.version: v for v in client.search_model_versions(f"name='{name}'")}
    assert len(versions) == 2 and "champion" in aliases
    decisions = {str(v): dict(mv.tags)["gate.decision"] for v, mv in versions.items()}
    promoted_now = [v for v, d in decisions.items() if d == "promoted" and "gate.superseded_by" not in versions[int(v)].tags]
    assert promoted_now == [aliases["champion"]], (decisions, aliases)
    records = [json.loads((Path(c.paths.work_dir) / "reports" / "mlflow.json").read_text())["registry"] for c in works]
    for rec in records:  # each run record agrees with the tags written for its version
        assert decisions[rec["version"]] == rec["decision"]
    # one decided first (no champion yet: promoted); the other decided after it, against its champion
    first, second = sorted(records, key=lambda r: r["previous_champion_version"] is not None)
    assert first["previous_champion_version"] is None and first["decision"] == "promoted"
    assert second["previous_champion_version"] == first["version"]
    assert aliases["champion"] == (second["version"] if second["promoted"] else first["version"])
    assert all(rec["lock"].endswith(".gate.lock") for rec in records)


@contextlib.contextmanager
def small_disk(path: Path, size_kb: int, read_only: bool = False) -> Iterator[str]:
    """A tmpfs of ``size_kb`` at ``path`` (read-only when asked); falls back to an RLIMIT_FSIZE limit /
    ``chattr +i`` when mounting is not allowed here. Yields the mechanism used."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size_kb}k" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode == 0
    if mounted:
        try:
            yield "tmpfs"
        finally:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)
        return
    if read_only:
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
            pytest.skip("neither tmpfs mounts nor chattr +i are allowed here")
        try:
            yield "chattr"
        finally:
            subprocess.run(["chattr", "-i", str(path)], capture_output=True)
        return
    yield "rlimit"


def _limited(mechanism: str, limit_bytes: int) -> dict[str, Any]:
    if mechanism != "rlimit":
        return {}

    def preexec() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return {"preexec_fn": preexec}


@pytest.mark.slow
def test_disk_full_while_checkpointing_is_a_clear_error_without_partial_files(tmp_path: Path) -> None:
    layout = make_work(tmp_path / "w")
    target = layout.train_dir
    with timed_fault("disk full"), small_disk(target, 64) as how:
        proc = _proc(_train_args(tmp_path / "w"), **_limited(how, 64 * 1024))
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 3, err
        assert "Traceback" not in err and ("last.pt" in err or "best.pt" in err), err
        for ckpt in target.glob("*.pt"):  # whatever is there is complete (written atomically) ...
            torch.load(ckpt, map_location="cpu", weights_only=True)
        assert not list(target.glob(".*.tmp")), "a temporary file was left"  # ... and nothing half-written
    # with room again, the same command trains to the end
    again = _proc(_train_args(tmp_path / "w"))
    assert again.wait(timeout=600) == 0, again.stderr.read()


@pytest.mark.slow
def test_read_only_reports_folder_is_a_clear_error(tmp_path: Path, capsys) -> None:
    from mlflow_server import make_run

    cfg = make_cfg(tmp_path, **{"augment.image_size": 32})
    make_run(cfg, seed=4)
    reports = Path(cfg.paths.work_dir) / "reports"
    before = (reports / "metrics.json").read_bytes()
    with timed_fault("read-only folder"), small_disk(reports, 64, read_only=True):
        outcome = cli(capsys, "evaluate", "--params", str(PARAMS), "--set", f"paths.work_dir={cfg.paths.work_dir}",
                      *_sets({**TINY_MODEL, "augment.image_size": 32, "evaluate.cam_per_class": 1}))  # fmt: skip
        judge(outcome, 3, str(reports), name="environment:read_only_folder")
        assert "Read-only file system" in outcome.err or "Operation not permitted" in outcome.err, outcome.err
    assert (reports / "metrics.json").read_bytes() == before, "the previous metrics were replaced"
