"""The auditor's view, against a real ``mlflow server``: every link of a version's lineage resolves,
is this run's own, can be re-checked (``lineage --verify``), and the report and model card render in
MLflow's own UI (headless Chromium).

Two pipeline runs from two different data roots are tracked and registered to one server. For each
version, ``lineage --verify`` passes and shows that run's own data root and manifests; tampering
with one logged artifact in the server's artifact store makes ``--verify`` fail naming it.
Screenshots are kept below ``test-artifacts/screenshots/`` (``SKIN_TWIN_TEST_ARTIFACTS``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from mlflow_server import fake_score, make_cfg, make_run, start_server

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"
ARTIFACTS = Path(os.environ.get("SKIN_TWIN_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "screenshots"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A server holding two registered versions from two data roots (fake gate scores, real stages)."""
    import pipeline.io.scoring as scoring
    from pipeline.stages.register import run_register
    from pipeline.stages.track import run_track

    base = tmp_path_factory.mktemp("audit")
    server = start_server(base / "server")
    saved_score, saved_env = scoring.score_model, os.environ.pop("MLFLOW_TRACKING_URI", None)
    scoring.score_model = fake_score()
    runs = []
    try:
        for i, ba in enumerate((0.55, 0.65)):
            root = base / f"clinic_{'ab'[i]}"
            cfg = make_cfg(base, name=f"work{i}", tracking_uri=server.uri, **{
                "data.source": "ham10000", "data.root": str(root), "registry.floor": 0.0,
                "mlflow.experiment": "audit"})  # fmt: skip
            root.mkdir(parents=True)
            make_run(cfg, seed=20 + i, fake_ba=ba)
            tracked = run_track(cfg)
            runs.append({"cfg": cfg, "root": root, "run_id": tracked["run_id"], "reg": run_register(cfg),
                         "experiment_id": tracked["experiment_id"]})  # fmt: skip
        yield {"server": server, "runs": runs, "artifacts": base / "server" / "artifacts"}
    finally:
        scoring.score_model = saved_score
        if saved_env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env
        server.stop()


def _lineage(capsys: pytest.CaptureFixture[str], cfg: Any, model: str, *flags: str) -> tuple[int, str, str]:
    from pipeline.app.cli import main

    code = main(["lineage", "--params", str(PARAMS), "--model", model, *flags,
                 "--set", f"mlflow.tracking_uri={cfg.mlflow.tracking_uri}"])  # fmt: skip
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.slow
def test_every_version_verifies_and_shows_its_own_data(audited: Any, capsys: pytest.CaptureFixture[str]) -> None:
    for run in audited["runs"]:
        cfg, reg = run["cfg"], run["reg"]
        code, out, err = _lineage(capsys, cfg, f"models:/{reg['model_name']}/{reg['version']}", "--verify", "--json")
        assert code == 0, err
        chain = json.loads(out)  # --json: one JSON document, nothing else
        assert chain["run"]["run_id"] == run["run_id"]
        assert chain["data"]["root"] == str(run["root"]) and chain["data"]["source"] == "ham10000"
        for split in ("train", "val", "test"):
            d = chain["data"][split]
            assert f"lineage/manifests/{split}.csv" in d["source"] and run["run_id"] in d["source"]  # its own manifest
        assert all(c["ok"] for c in chain["verify"]), [c for c in chain["verify"] if not c["ok"]]
        names = {c["check"] for c in chain["verify"]}
        assert {"artifact index", "gate artifact index", "registered weights", "dataset train",
                "manifest test content", "artifact plots/roc.png", "artifact model_card.md",
                "artifact data/ingest_summary.json vs tag"} <= names  # fmt: skip
        assert chain["run"]["triggered_by"] and chain["environment"]["requirements_lock_sha256"]
        assert chain["model"]["gate"]["decision"] == reg["decision"] and chain["model"]["model_card"]
    # the two runs' data are told apart: other roots, other manifests
    a, b = (json.loads(_lineage(capsys, r["cfg"], f"models:/{r['reg']['model_name']}/{r['reg']['version']}", "--json")[1])
            for r in audited["runs"])  # fmt: skip
    assert a["data"]["root"] != b["data"]["root"] and a["data"]["train"]["source"] != b["data"]["train"]["source"]


@pytest.mark.slow
def test_text_output_is_for_humans_and_printed_once(audited: Any, capsys: pytest.CaptureFixture[str]) -> None:
    run = audited["runs"][0]
    code, out, err = _lineage(capsys, run["cfg"], f"models:/{run['reg']['model_name']}@champion")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("model ") and not any(line.lstrip().startswith("{") for line in lines)
    for link in ("  gate ", "  card ", "-> run ", "-> code ", "-> env ", "-> params ", "-> data ", "-> checks ",
                 "-> pairs ", "-> train ", "-> export ", "-> airflow"):  # fmt: skip
        assert any(line.startswith(link) for line in lines), link


@pytest.mark.slow
def test_a_tampered_artifact_fails_verify_naming_it(audited: Any, capsys: pytest.CaptureFixture[str]) -> None:
    run = audited["runs"][1]
    hits = list(audited["artifacts"].rglob(f"{run['run_id']}/artifacts/plots/roc.png"))
    assert len(hits) == 1, hits
    original = hits[0].read_bytes()
    hits[0].write_bytes(original[:-8] + b"tampered")
    try:
        code, out, err = _lineage(capsys, run["cfg"], f"models:/{run['reg']['model_name']}/{run['reg']['version']}", "--verify")
        assert code == 1
        assert "FAIL   artifact plots/roc.png" in out and "artifact plots/roc.png" in err and "Traceback" not in err
        assert "1 mismatch(es)" in err
    finally:
        hits[0].write_bytes(original)


@pytest.mark.slow
def test_report_and_model_card_render_in_the_mlflow_ui(audited: Any) -> None:
    if CHROMIUM is None:
        pytest.skip("no chromium on this machine (make test installs Debian's chromium where it can)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is installed with the test extras")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    server = audited["server"]
    run = audited["runs"][0]
    reg = run["reg"]
    args = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"]  # fmt: skip
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(f"{server.uri}/#/experiments/{run['experiment_id']}/runs/{run['run_id']}/artifacts/run_report.html")
            frame = None
            for _ in range(120):  # the artifact viewer loads the report into a blob: iframe
                frame = next((f for f in page.frames if f.url.startswith("blob:")), None)
                if frame is not None and frame.evaluate("document.readyState") == "complete":
                    break
                page.wait_for_timeout(250)
            assert frame is not None, "the artifact viewer did not show the report"
            images = frame.evaluate("Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])")
            assert {alt for alt, _, _ in images} >= {"confusion matrix", "ROC", "training curves", "CAM samples"}
            assert all(done and width > 0 for _, done, width in images), images
            text = frame.evaluate("document.body.innerText")
            assert f"version {reg['version']}" in text and f"gate decision {reg['decision']}" in text
            for split in ("train", "val", "test"):
                assert f"skin_twin.data_digest.{split}" in text
            page.screenshot(path=str(ARTIFACTS / "run_report.png"), full_page=True)
            page.locator("iframe").first.screenshot(path=str(ARTIFACTS / "run_report_frame.png"))

            # the model card as a run artifact: picked in the same artifact viewer (not inside an iframe)
            page.get_by_text("model_card.md", exact=True).first.click()
            page.get_by_text("Intended use").first.wait_for(timeout=60000)
            body = page.inner_text("body")
            assert f"Model card: {reg['model_name']} version {reg['version']}" in body and "Promotion gate" in body
            page.screenshot(path=str(ARTIFACTS / "model_card_artifact.png"), full_page=True)

            page.goto(f"{server.uri}/#/models/{reg['model_name']}/versions/{reg['version']}")
            page.get_by_text(f"Model card: {reg['model_name']} version {reg['version']}").wait_for(timeout=60000)
            body = page.inner_text("body")
            for needle in ("Intended use", "Out of scope", "Not a medical device", "Promotion gate", reg["decision"],
                           "expected calibration error", "Known limitations"):  # fmt: skip
                assert needle in body, needle
            page.screenshot(path=str(ARTIFACTS / "model_version.png"), full_page=True)
        finally:
            browser.close()
    assert all((ARTIFACTS / n).stat().st_size > 0 for n in ("run_report.png", "run_report_frame.png", "model_card_artifact.png", "model_version.png"))
