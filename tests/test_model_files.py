"""The logged model's file manifest (issue 45): a lean code bundle, ``lineage --verify`` naming every
tampered file, and verify-before-load in ``predict --model``, the registry gate and the pyfunc loader.

The fast tier saves one MLflow model folder locally (:func:`pipeline.io.pyfunc.save_model`). The
slow tier tracks and registers one tiny model on a real ``mlflow server`` started for this module
(its artifact folder is where the tampering happens, as an attacker with access to the store would
do it) and restores every file after each test.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow_server import export_tiny_model, fake_score, make_cfg, make_run, start_server

from pipeline.errors import DataError

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# fast: the bundle and the embedded manifest
# --------------------------------------------------------------------------------------------


def test_bundle_is_the_import_closure_of_the_pyfunc_module() -> None:
    from pipeline.io.imports import PACKAGE_DIR, bundle_files, closure

    files = {f.relative_to(PACKAGE_DIR).as_posix() for f in bundle_files("pipeline.io.pyfunc")}
    for needed in ("__init__.py", "io/__init__.py", "core/__init__.py", "io/pyfunc.py", "io/model_files.py",
                   "io/modelstore.py", "core/inference.py", "errors.py"):  # fmt: skip
        assert needed in files, needed
    assert not [f for f in files if f.startswith(("stages/", "app/"))]
    for heavy in ("io/mlflow_service.py", "io/registry.py", "io/scoring.py", "io/audit.py", "core/training.py"):
        assert heavy not in files, heavy
    assert len(files) == len(closure("pipeline.io.pyfunc")) + 3  # + the three package __init__ files


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One MLflow model folder of a tiny export, saved with the pyfunc flavour."""
    from pipeline.io import pyfunc

    base = tmp_path_factory.mktemp("saved")
    cfg = make_cfg(base)
    pyfunc.save_model(base / "model", export_tiny_model(cfg, base / "export"), 4)
    return base / "model"


def test_lean_bundle_loads_without_the_checkout(saved_model: Path, tmp_path: Path) -> None:
    """``mlflow.pyfunc.load_model`` + predict in a fresh interpreter whose ``sys.path`` is the venv's
    site-packages only (``-I -S``: no checkout, no editable-install hook): ``pipeline`` resolves in
    the bundle, and every module of it that was imported comes from there."""
    code_files = sorted(p for p in (saved_model / "code").rglob("*") if p.is_file())
    assert (saved_model / "code" / "pipeline" / "io" / "pyfunc.py") in code_files
    assert not (saved_model / "code" / "pipeline" / "stages").exists()
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.append({sysconfig.get_paths()["purelib"]!r})
        try:
            import pipeline
        except ImportError:
            pass
        else:
            raise SystemExit("pipeline importable before the model is loaded: " + str(pipeline.__file__))
        import mlflow.pyfunc, numpy as np, pandas as pd, io
        from PIL import Image
        model = mlflow.pyfunc.load_model({str(saved_model)!r})
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(buf, "PNG")
        out = model.predict(pd.DataFrame({{"image": [buf.getvalue()]}}))
        mods = {{n: getattr(m, "__file__", None) for n, m in sys.modules.items() if n == "pipeline" or n.startswith("pipeline.")}}
        print(json.dumps({{"columns": list(out.columns), "rows": len(out), "modules": mods, "path": sys.path}}))
    """)
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["rows"] == 1 and got["columns"][0] == "label"
    bundle = str((saved_model / "code").resolve())
    assert got["modules"] and all(str(Path(f).resolve()).startswith(bundle) for f in got["modules"].values()), got["modules"]
    assert str(ROOT) not in got["path"]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_pyfunc_loader_checks_its_own_folder(saved_model: Path, tmp_path: Path) -> None:
    import mlflow.pyfunc

    from pipeline.io.model_files import EMBEDDED

    embedded = json.loads((saved_model / EMBEDDED).read_text())
    assert {"data/export/weights.pt", "data/export/config.json", "pytorch/model.pt2",
            "code/pipeline/io/pyfunc.py"} <= set(embedded)  # fmt: skip
    for i, (rel, how) in enumerate([("data/export/weights.pt", "change"), ("data/export/model.ts", "change"),
                                    ("code/pipeline/io/extra.py", "add"), ("data/export/serving.json", "remove")]):  # fmt: skip
        folder = _copy(saved_model, tmp_path / f"m{i}")
        target = folder / rel
        if how == "change":
            target.write_bytes(target.read_bytes() + b"\0")
        elif how == "add":
            target.write_text("x = 1\n")
        else:
            target.unlink()
        with pytest.raises(DataError, match=rel.replace(".", r"\.")):
            mlflow.pyfunc.load_model(str(folder))


# --------------------------------------------------------------------------------------------
# slow: against a real MLflow server
# --------------------------------------------------------------------------------------------


class Registered:
    """One tracked + registered tiny model on a module-scoped ``mlflow server``."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.server = start_server(base / "server")
        self.cfg = make_cfg(base, "run1", tracking_uri=self.server.uri, **{"registry.model_name": "files-test"})
        self.uri = "models:/files-test@champion"

    def model_dir(self, model_id: str) -> Path:
        """Where the server keeps the artifacts of a LoggedModel (the store an attacker would edit)."""
        (found,) = [p for p in (self.base / "server" / "artifacts").rglob(f"models/{model_id}/artifacts") if p.is_dir()]
        return found

    def cli(self, *argv: str) -> list[str]:
        return [*argv, "--params", str(ROOT / "params.yaml"), "--set", f"mlflow.tracking_uri={self.server.uri}",
                "--set", f"paths.work_dir={self.cfg.paths.work_dir}", "--set", "registry.model_name=files-test",
                "--set", f"registry.lock_url={(self.base / 'gate.lock').as_uri()}"]  # fmt: skip


def _track_and_register(cfg: Any, seed: int, register: bool = True) -> dict[str, Any]:
    import pipeline.io.scoring as scoring
    from pipeline.stages.register import run_register
    from pipeline.stages.track import run_track

    make_run(cfg, seed=seed, fake_ba=0.6)
    tracked = run_track(cfg)
    if register:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(scoring, "score_model", fake_score())
            tracked["registry"] = run_register(cfg)
    return tracked


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registered]:
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        reg = Registered(tmp_path_factory.mktemp("files"))
        try:
            reg.tracked = _track_and_register(reg.cfg, seed=1)  # type: ignore[attr-defined]
            yield reg
        finally:
            reg.server.stop()


@pytest.fixture
def store_model(registered: Registered, tmp_path: Path) -> Iterator[Path]:
    """The champion's folder in the server's store; restored byte for byte after the test."""
    folder = registered.model_dir(registered.tracked["model_id"])  # type: ignore[attr-defined]
    backup = shutil.copytree(folder, tmp_path / "backup")
    yield folder
    shutil.rmtree(folder)
    shutil.copytree(backup, folder)


@pytest.mark.slow
def test_manifest_recorded_as_run_artifact_and_tags(registered: Registered) -> None:
    from pipeline.io.digests import file_sha256
    from pipeline.io.mlflow_service import client_for
    from pipeline.io.model_files import DIGEST_TAG, MANIFEST_ARTIFACT, hash_tree

    client = client_for(registered.cfg)
    tracked = registered.tracked  # type: ignore[attr-defined]
    version = client.get_model_version_by_alias("files-test", "champion")
    run_tag = client.get_run(tracked["run_id"]).data.tags[DIGEST_TAG]
    assert version.tags[DIGEST_TAG] == run_tag == tracked["model_files_digest"]
    local = Path(client.download_artifacts(tracked["run_id"], MANIFEST_ARTIFACT, str(registered.base / "dl")))
    assert file_sha256(local) == run_tag
    manifest = json.loads(local.read_text())
    assert manifest == hash_tree(registered.model_dir(tracked["model_id"]))
    for rel in ("MLmodel", "requirements.txt", "conda.yaml", "python_env.yaml", "input_example.json",
                "data/export/config.json", "data/export/weights.pt", "data/export/model.ts", "pytorch/model.pt2",
                "code/pipeline/io/pyfunc.py", "skin_twin_files.json"):  # fmt: skip
        assert rel in manifest, rel


def _append(path: Path, data: bytes = b"\n# tampered\n") -> None:
    path.write_bytes(path.read_bytes() + data)


TAMPER = {
    "MLmodel": lambda d: _append(d / "MLmodel", b"\nextra: 1\n"),
    "code/pipeline/io/pyfunc.py": lambda d: _append(d / "code/pipeline/io/pyfunc.py"),
    "data/export/config.json": lambda d: (d / "data/export/config.json").write_text("{not json"),
    "data/export/weights.pt": lambda d: _append(d / "data/export/weights.pt", b"\0"),
    "data/export/model.ts": lambda d: _append(d / "data/export/model.ts", b"\0"),
    "pytorch/model.pt2": lambda d: _append(d / "pytorch/model.pt2", b"\0"),
    "requirements.txt": lambda d: _append(d / "requirements.txt", b"evil-package==1.0\n"),
    "code/pipeline/planted.py": lambda d: (d / "code/pipeline/planted.py").write_text("print('hi')\n"),
    "input_example.json": lambda d: (d / "input_example.json").unlink(),
}


@pytest.mark.slow
@pytest.mark.parametrize("rel", list(TAMPER))
def test_verify_names_each_tampered_model_file(registered: Registered, store_model: Path, rel: str, capsys) -> None:
    from pipeline.app.cli import main

    TAMPER[rel](store_model)
    capsys.readouterr()
    rc = main(registered.cli("lineage", "--model", registered.uri, "--verify"))
    out = capsys.readouterr()
    assert rc == 1, out.err[-2000:]
    fails = [line for line in out.out.splitlines() if line.strip().startswith("FAIL")]
    assert any(f"model file {rel}:" in line for line in fails), fails
    if rel == "data/export/config.json":  # malformed JSON: a FAIL line, not an internal error
        assert any("config.json is not valid JSON" in line for line in fails), fails


@pytest.mark.slow
def test_verify_fails_on_a_tampered_manifest(registered: Registered, capsys) -> None:
    from pipeline.app.cli import main
    from pipeline.io.model_files import MANIFEST_ARTIFACT

    (manifest,) = [p for p in (registered.base / "server" / "artifacts").rglob(MANIFEST_ARTIFACT)
                   if registered.tracked["run_id"] in str(p)]  # type: ignore[attr-defined]  # fmt: skip
    original = manifest.read_bytes()
    try:
        for bad in (b"{broken", original.replace(b'"MLmodel"', b'"MLmodel2"')):
            manifest.write_bytes(bad)
            capsys.readouterr()
            rc = main(registered.cli("lineage", "--model", registered.uri, "--verify"))
            out = capsys.readouterr().out
            assert rc == 1
            assert "FAIL   model file manifest: lineage/model_files.json sha256" in out
        assert "not valid JSON" not in out  # the last one parses: its entries are compared
        assert "FAIL   model file MLmodel: added" in out and "FAIL   model file MLmodel2: missing" in out
        manifest.write_bytes(b"{broken")
        capsys.readouterr()
        assert main(registered.cli("predict", "--model", registered.uri, "--images", str(registered.base),
                                   "--out", str(registered.base / "p.csv"))) == 1  # fmt: skip
        assert "lineage/model_files.json" in capsys.readouterr().err
    finally:
        manifest.write_bytes(original)


MARKER_CODE = "\nimport pathlib as _p\n_p.Path({marker!r}).write_text('imported')\n"


@pytest.mark.slow
def test_tampered_bundle_is_refused_before_import(registered: Registered, store_model: Path, tmp_path: Path,
                                                  capsys) -> None:  # fmt: skip
    from PIL import Image

    from pipeline.app.cli import main
    from pipeline.io.registry import cache_root, load_pyfunc

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.new("RGB", (20, 20), (120, 60, 30)).save(imgs / "a.png")
    out_csv = tmp_path / "pred.csv"
    assert main(registered.cli("predict", "--model", registered.uri, "--images", str(imgs), "--out", str(out_csv))) == 0
    out_csv.unlink()

    # the loader module MLflow imports, changed to leave a marker when imported
    marker = tmp_path / "marker"
    _append(store_model / "code/pipeline/io/pyfunc.py", MARKER_CODE.format(marker=str(marker)).encode())
    # control: MLflow's own loader, on a plain download of the tampered folder, would run it
    raw = tmp_path / "raw"
    shutil.copytree(store_model, raw)
    probe = f"import mlflow.pyfunc\ntry:\n    mlflow.pyfunc.load_model({str(raw)!r})\nexcept Exception:\n    pass\n"
    subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, timeout=300, check=False)
    assert marker.is_file(), "control: the tampered loader module is what mlflow.pyfunc.load_model imports"
    marker.unlink()

    # the cached copy predict made above is checked again: the store's change is found anyway
    shutil.rmtree(cache_root(registered.cfg))
    capsys.readouterr()
    rc = main(registered.cli("predict", "--model", registered.uri, "--images", str(imgs), "--out", str(out_csv)))
    assert rc == 1
    assert "code/pipeline/io/pyfunc.py: changed" in capsys.readouterr().err
    assert not out_csv.exists() and not marker.exists()
    with pytest.raises(DataError, match="code/pipeline/io/pyfunc.py: changed"):
        load_pyfunc(registered.uri, registered.cfg)
    assert not marker.exists()

    # a planted module beside it (an added file), and a tampered cached copy, are refused too
    shutil.rmtree(store_model)
    shutil.copytree(tmp_path / "backup", store_model)
    planted = store_model / "code" / "pipeline" / "sitecustomize.py"
    planted.write_text(MARKER_CODE.format(marker=str(marker)))
    with pytest.raises(DataError, match="code/pipeline/sitecustomize.py: added"):
        load_pyfunc(registered.uri, registered.cfg)
    planted.unlink()
    model = load_pyfunc(registered.uri, registered.cfg)  # the store is whole again: loads
    assert model.metadata.model_id == registered.tracked["model_id"]  # type: ignore[attr-defined]
    (cached,) = list(cache_root(registered.cfg).rglob("code/pipeline/io/pyfunc.py"))
    assert not list(cached.parent.rglob("__pycache__"))  # nothing written into the verified folder
    _append(cached, MARKER_CODE.format(marker=str(marker)).encode())
    capsys.readouterr()
    assert main(registered.cli("predict", "--model", registered.uri, "--images", str(imgs), "--out", str(out_csv))) == 1
    assert "code/pipeline/io/pyfunc.py: changed" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.slow
def test_gate_refuses_a_tampered_challenger(registered: Registered, tmp_path: Path) -> None:
    from pipeline.io.mlflow_service import client_for
    from pipeline.io.registry import get_aliases

    cfg = make_cfg(registered.base, "run2", tracking_uri=registered.server.uri, **{"registry.model_name": "files-test"})
    tracked = _track_and_register(cfg, seed=2, register=False)
    client = client_for(cfg)
    before = get_aliases(client, "files-test")
    marker = tmp_path / "marker"
    _append(registered.model_dir(tracked["model_id"]) / "code/pipeline/io/pyfunc.py",
            MARKER_CODE.format(marker=str(marker)).encode())  # fmt: skip
    import pipeline.io.scoring as scoring
    from pipeline.stages.register import run_register

    calls: list = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(scoring, "score_model", fake_score(calls))
        with pytest.raises(DataError, match="code/pipeline/io/pyfunc.py: changed"):
            run_register(cfg)
    assert calls == [] and not marker.exists()  # nothing scored, nothing imported
    assert get_aliases(client, "files-test") == before  # champion untouched
    (v,) = client.search_model_versions(f"name='files-test' and run_id='{tracked['run_id']}'")
    assert v.tags["gate.decision"] == "error"
