"""Lineage: content digests, git/DVC/Airflow sources, and the full chain of a registered version."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from mlflow_server import fake_score, make_cfg, make_run

import pipeline
from pipeline.core.lineage import content_digest, format_chain
from pipeline.io.provenance import airflow_context, dvc_lock_hashes, git_info


def test_content_digest_is_about_images_and_labels_only() -> None:
    df = pd.DataFrame({"sha256": ["a", "b", "c"], "label": ["nv", "mel", "nv"], "path": ["1", "2", "3"]})
    d = content_digest(df)
    assert len(d) == 64
    shuffled = df.iloc[[2, 0, 1]].assign(path=["x", "y", "z"])
    assert content_digest(shuffled) == d  # order and paths do not matter
    assert content_digest(df.assign(label=["nv", "mel", "bcc"])) != d  # a relabel does
    assert content_digest(df.assign(sha256=["a", "b", "d"])) != d  # so does a changed image


def test_dvc_lock_hashes(tmp_path: Path) -> None:
    lock = tmp_path / "dvc.lock"
    lock.write_text(
        "schema: '2.0'\nstages:\n  ingest:\n    cmd: python -m pipeline ingest\n    outs:\n"
        "    - path: data/manifest.parquet\n      hash: md5\n      md5: 0123abc\n      size: 10\n"
        "  train:\n    outs:\n    - path: models/train\n      md5: 99ff.dir\n"
    )
    assert dvc_lock_hashes(lock) == {"ingest:data/manifest.parquet": "0123abc", "train:models/train": "99ff.dir"}
    assert dvc_lock_hashes(tmp_path / "absent.lock") == {}


def test_git_info_from_repo_and_env_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, project_root: Path) -> None:
    head = subprocess.run(["git", "-C", str(project_root), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        info = git_info(project_root)
        assert info["commit"] == head.stdout.strip() and info["source"] == "git" and isinstance(info["dirty"], bool)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    monkeypatch.setenv("SKIN_TWIN_GIT_COMMIT", "c0ffee")
    monkeypatch.setenv("SKIN_TWIN_GIT_DIRTY", "false")
    assert git_info(tmp_path) == {"commit": "c0ffee", "dirty": False, "source": "env"}
    monkeypatch.delenv("SKIN_TWIN_GIT_COMMIT")
    assert git_info(tmp_path)["commit"] == "unknown"


def test_airflow_context_env_and_explicit(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("AIRFLOW_CTX_DAG_ID", "AIRFLOW_CTX_DAG_RUN_ID", "AIRFLOW_CTX_TRY_NUMBER"):
        monkeypatch.delenv(k, raising=False)
    assert airflow_context() == {}
    monkeypatch.setenv("AIRFLOW_CTX_DAG_ID", "skin_twin")
    monkeypatch.setenv("AIRFLOW_CTX_TRY_NUMBER", "1")
    assert airflow_context(dag_run_id="r1") == {"dag_id": "skin_twin", "dag_run_id": "r1", "try_number": "1"}


def test_lineage_chain_of_registered_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import pipeline.io.scoring as evaluate
    from pipeline.stages.register import run_register
    from pipeline.stages.track import run_track

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("AIRFLOW_CTX_DAG_ID", "skin_twin")
    monkeypatch.setenv("AIRFLOW_CTX_DAG_RUN_ID", "scheduled__2026-01-05")
    monkeypatch.setenv("AIRFLOW_CTX_TRY_NUMBER", "1")
    # this "run" is a stage of `dvc repro` in a project whose dvc.lock holds the upstream hashes
    fake_root = tmp_path / "project"
    fake_root.mkdir()
    (fake_root / "dvc.lock").write_text("schema: '2.0'\nstages:\n  augment:\n    outs:\n    - path: data/augmented\n      md5: abc.dir\n")
    import pipeline.io.provenance as provenance

    monkeypatch.setattr(provenance, "PROJECT_ROOT", fake_root)
    monkeypatch.setenv("DVC_ROOT", str(fake_root))
    monkeypatch.setenv("DVC_STAGE", "publish")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    monkeypatch.setenv("SKIN_TWIN_GIT_COMMIT", "feedface")
    monkeypatch.setenv("SKIN_TWIN_GIT_DIRTY", "true")
    monkeypatch.setattr(evaluate, "score_model", fake_score())

    cfg = make_cfg(tmp_path, **{"registry.floor": 0.1})
    make_run(cfg, seed=3, fake_ba=0.5)
    tracked = run_track(cfg)
    reg = run_register(cfg)
    capsys.readouterr()

    uri = f"models:/{cfg.registry.model_name}@champion"
    from pipeline.io.digests import file_sha256
    from pipeline.stages.lineage import run_lineage

    chain = run_lineage(cfg, uri)
    printed = capsys.readouterr().out
    assert run_lineage(cfg, f"models:/{cfg.registry.model_name}/{reg['version']}") == chain

    work = Path(cfg.paths.work_dir)
    manifest = pd.read_parquet(work / "data" / "validated.parquet")
    assert chain["model"]["version"] == "1" and "champion" in chain["model"]["aliases"]
    assert chain["model"]["model_id"] == tracked["model_id"]
    assert chain["model"]["gate"]["decision"] == "promoted"
    assert chain["run"]["run_id"] == tracked["run_id"] and chain["run"]["work_dir"] == str(work.resolve())
    assert chain["code"] == {"commit": "feedface", "dirty": "true", "source": "env",
                             "package_version": pipeline.__version__}  # fmt: skip
    assert chain["params"]["digest"] == cfg.digest() and chain["params"]["values"]["augment.image_size"] == "32"
    for split in ("train", "val", "test"):
        full = content_digest(manifest[manifest["split"] == split])
        d = chain["data"][split]
        # the content digest is the tag; the dataset is this run's own logged manifest (its digest covers both)
        assert d["tag_digest"] == full and d["digest"] == provenance.dataset_digest(full, d["source"])
        assert d["source"].endswith(f"{tracked['run_id']}/artifacts/lineage/manifests/{split}.csv")
        assert int(d["rows"]) == 7 * {"train": 3, "val": 2, "test": 2}[split]
    assert chain["dvc"]["augment.data/augmented"] == "abc.dir"
    assert chain["validation"]["success"] == "true"
    assert chain["validation"]["digest"] == file_sha256(work / "reports" / "validation" / "result.json")
    assert chain["pairs"]["summary_digest"] == file_sha256(work / "reports" / "pairs_summary.json")
    # how the split was made: the ingest summary (near-duplicate joins) is part of the chain
    assert chain["data"]["ingest_summary_digest"] == file_sha256(work / "reports" / "ingest_summary.json")
    assert chain["data"]["near_duplicate_joins"] == "1"
    assert chain["airflow"] == {"dag_id": "skin_twin", "dag_run_id": "scheduled__2026-01-05", "try_number": "1"}
    for needle in ("-> run", "-> code    feedface (uncommitted changes)", "-> params", "-> data",
                   "split: 1 lesion group(s) joined to another's for a near-duplicate picture (data/ingest_summary.json",
                   "-> checks  validation success=true", "-> pairs", "-> airflow dag skin_twin run scheduled__2026-01-05 try 1"):
        assert needle in printed, needle
    assert format_chain(chain) in printed
    json.dumps(chain)  # JSON-able for the CLI


def test_lineage_cli_unknown_model_is_a_clean_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, params_path: Path) -> None:
    from pipeline.app.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    argv = [
        "lineage", "--params", str(params_path), "--model", "models:/nope@champion",
        "--set", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
        "--set", f"mlflow.artifact_root={tmp_path / 'a'}",
    ]
    # a store that does not exist is named, and not created as a side effect
    assert main(argv) == 1
    assert "no MLflow store there" in capsys.readouterr().err
    assert not (tmp_path / "m.db").exists()
    # an existing store without that model
    from pipeline.config import load_config
    from pipeline.io.mlflow_service import client_for

    client_for(load_config(params_path, {"mlflow.tracking_uri": f"sqlite:///{tmp_path / 'm.db'}"})).search_experiments()
    rc = main(argv)
    assert rc == 1
    assert "not found in the registry" in capsys.readouterr().err


def test_dvc_hashes_only_for_a_dvc_repro_of_that_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A dvc.lock lying in the checkout says nothing about an Airflow or CLI run: no DVC tags then."""
    import pipeline.io.provenance as provenance

    root = tmp_path / "project"
    root.mkdir()
    (root / "dvc.lock").write_text("schema: '2.0'\nstages:\n  train:\n    outs:\n    - path: models/train\n      md5: stale.dir\n")
    monkeypatch.setattr(provenance, "PROJECT_ROOT", root)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    cfg = make_cfg(tmp_path)
    make_run(cfg, seed=1)
    assert not [k for k in provenance.lineage_tags(cfg) if ".dvc." in k]
    monkeypatch.setenv("DVC_ROOT", str(root))
    monkeypatch.setenv("DVC_STAGE", "publish")
    tags = provenance.lineage_tags(cfg)
    assert tags["skin_twin.dvc.train.models/train"] == "stale.dir" and tags["skin_twin.dvc.stage"] == "publish"


def test_triggering_user_names_a_person_or_says_who_else() -> None:
    import getpass
    from types import SimpleNamespace as NS

    from pipeline.app.orchestration import triggering_user

    assert triggering_user(NS(triggering_user_name="auditor-ann", run_type="manual")) == "auditor-ann"
    assert triggering_user(NS(triggering_user_name="dag_test", run_type="manual")) == getpass.getuser()  # make run
    assert triggering_user(NS(triggering_user_name=None, run_type=NS(value="scheduled"))) == "scheduler"
    assert triggering_user(NS(triggering_user_name=None, run_type="asset_triggered")) == "asset-event"
    assert triggering_user(NS(triggering_user_name=None, run_type="manual")) == "unknown (manual)"
    assert triggering_user(None) is None
