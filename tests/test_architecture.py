"""The plan of the house, checked from the code itself: layers, one stage table, extension points.

* imports go one way (base -> core -> io -> stages -> app) with no circle, read from the source;
* the domain (``pipeline.core``) does no file, process or network IO;
* the CLI, the Airflow DAG and ``dvc.yaml`` are all derived from the stage table, and the committed
  ``dvc.yaml`` is exactly what the table generates for the committed ``params.yaml``;
* adding a data source, a stage or a metric touches one place (ARCHITECTURE.md).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.app import dvcgen, table
from pipeline.app.imports import PACKAGE_DIR, closure, cycles, import_graph, module_files

ROOT = Path(__file__).resolve().parents[1]
BASE = {"pipeline", "pipeline.errors", "pipeline.labels", "pipeline.config", "pipeline.layout"}
LAYERS = ("base", "core", "io", "stages", "app")


def layer(module: str) -> int:
    if module in BASE:
        return 0
    if module == "pipeline.__main__":
        return len(LAYERS)
    part = module.split(".")[1]
    return LAYERS.index(part)


# --------------------------------------------------------------------------- layers


def test_every_module_belongs_to_a_layer() -> None:
    for module in module_files():
        assert 0 <= layer(module) <= len(LAYERS), module


def test_import_graph_has_no_circle() -> None:
    assert cycles() == []


def test_imports_only_go_downward() -> None:
    upward = [
        f"{a} ({LAYERS[layer(a)] if layer(a) < len(LAYERS) else 'main'}) -> {b} ({LAYERS[layer(b)]})"
        for a, targets in import_graph().items()
        for b in targets
        if layer(b) > layer(a)
    ]
    assert upward == []


def test_stages_do_not_import_each_other() -> None:
    crossing = [
        (a, b)
        for a, targets in import_graph().items()
        for b in targets
        if a.startswith("pipeline.stages.") and b.startswith("pipeline.stages.")
    ]
    assert crossing == []


def test_the_graph_reader_sees_function_level_imports(tmp_path: Path) -> None:
    """Control: a lazy upward import would be caught (the evaluate stage imports io.scoring)."""
    assert "pipeline.io.scoring" in import_graph()["pipeline.stages.evaluate"]
    assert "pipeline.io.registry" in import_graph()["pipeline.stages.predict"]  # imported inside a function


_IO_NAMES = {
    "open", "read_text", "write_text", "read_bytes", "write_bytes", "read_parquet", "to_parquet", "read_csv",
    "to_csv", "mkdir", "unlink", "rmtree", "makedirs", "listdir", "remove", "rename", "iterdir", "rglob", "glob",
}  # fmt: skip
_IO_MODULES = {"subprocess", "shutil", "tempfile", "socket", "pathlib", "requests", "urllib", "http", "mlflow",
               "airflow", "dvc", "psycopg2", "redis", "sqlite3"}  # fmt: skip


def test_core_does_no_file_or_network_io() -> None:
    problems = []
    for module, path in module_files().items():
        if not module.startswith("pipeline.core."):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                bad = [a.name for a in node.names if a.name.split(".")[0] in _IO_MODULES]
            elif isinstance(node, ast.ImportFrom) and node.module:
                bad = [node.module] if node.module.split(".")[0] in _IO_MODULES else []
            elif isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
                is_pil_open = isinstance(f, ast.Attribute) and f.attr == "open" and getattr(f.value, "id", "") == "Image"
                bad = [name] if (name in _IO_NAMES and (name != "open" or is_pil_open or isinstance(f, ast.Name))) else []
            else:
                bad = []
            problems += [f"{module}:{node.lineno} {b}" for b in bad]
    assert problems == []


def test_every_imported_package_is_declared() -> None:
    """Third-party imports of the package and the DAG are declared in pyproject.toml (and so locked)."""
    import tomllib

    declared = {
        d.split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower()
        for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    }
    dist_of = {"PIL": "pillow", "yaml": "pyyaml", "sklearn": "scikit-learn", "great_expectations": "great-expectations",
               "airflow": "apache-airflow", "psycopg2": "psycopg2-binary"}  # fmt: skip
    imported: set[str] = set()
    for f in [*PACKAGE_DIR.rglob("*.py"), *(ROOT / "dags").rglob("*.py")]:
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third = {m for m in imported if m not in sys.stdlib_module_names and m != "pipeline"}
    missing = sorted(m for m in third if dist_of.get(m, m).lower() not in declared)
    assert missing == []
    norm = lambda name: name.lower().replace("_", "-")  # noqa: E731 - PEP 503 names
    lock = {norm(line.split("==")[0]) for line in (ROOT / "requirements.lock").read_text().splitlines() if "==" in line}
    assert {norm(dist_of.get(m, m)) for m in third} <= lock


# --------------------------------------------------------------------------- one stage table


def _params():
    from pipeline.app.params import load_params

    return load_params(ROOT / "params.yaml")


def test_committed_dvc_yaml_is_generated_from_the_table() -> None:
    committed = (ROOT / "dvc.yaml").read_text(encoding="utf-8")
    assert committed == dvcgen.render(_params(), ROOT / "params.yaml"), "run `python -m pipeline dvc-yaml`"


def test_cli_dag_and_dvc_agree_with_the_table() -> None:
    from pipeline.app import cli, orchestration

    cfg = _params()
    subcommands = set(cli.build_parser()._subparsers._group_actions[0].choices)  # noqa: SLF001
    assert subcommands == {s.name for s in table.STAGES}
    assert list(orchestration.TASKS) == table.tasks()
    assert set(orchestration.TASK_OUTLETS) == {t for t in table.tasks() if table.task_stage(t).outlet}
    doc = dvcgen.generate(cfg, ROOT / "params.yaml")
    in_dvc = {cmd.split()[3] for body in doc["stages"].values() for cmd in body["cmd"].split(" && ")}
    assert in_dvc == {s.name for s in table.pipeline_stages() if s.applies(cfg)}
    for task in table.tasks():
        assert [s.name for s in table.stages_for(task, cfg)] == orchestration.stages_for(task, cfg)


def test_code_deps_are_the_import_closure() -> None:
    doc = dvcgen.generate(_params(), ROOT / "params.yaml")
    evaluate = doc["stages"]["evaluate"]["deps"]
    # what evaluate runs on: the stage, the scoring path, the export loader, preprocessing, CAM
    for f in ("pipeline/stages/evaluate.py", "pipeline/io/scoring.py", "pipeline/io/modelstore.py",
              "pipeline/core/imaging.py", "pipeline/core/cam.py", "pipeline/core/metrics.py"):  # fmt: skip
        assert f in evaluate, f
    files = module_files()
    assert sorted(files[m].relative_to(ROOT).as_posix() for m in closure("pipeline.stages.pairs")) == [
        d for d in doc["stages"]["pairs"]["deps"] if d.startswith("pipeline/")
    ]


def test_synthesis_only_for_the_synthetic_source(tmp_path: Path) -> None:
    cfg = _params()
    assert "synthesize" in dvcgen.generate(cfg, ROOT / "params.yaml")["stages"]
    real = cfg.with_overrides({"data.source": "ham10000", "data.root": str(tmp_path / "ham")})
    doc = dvcgen.generate(real, ROOT / "params.yaml")
    assert "synthesize" not in doc["stages"]
    assert str(tmp_path / "ham") in doc["stages"]["ingest"]["deps"]
    assert "data/synthetic" not in doc["stages"]["ingest"]["deps"]
    from pipeline.app.orchestration import stages_for

    assert stages_for("ingest", real) == ["ingest"] and stages_for("ingest", cfg) == ["synthesize", "ingest"]


def test_check_under_dvc_refuses_a_stale_dvc_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.config import ConfigError

    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    cfg = _params()
    (tmp_path / "dvc.yaml").write_text(dvcgen.render(cfg, params))
    monkeypatch.setenv("DVC_STAGE", "ingest")
    dvcgen.check_under_dvc(cfg, params)  # up to date: fine
    real = cfg.with_overrides({"data.source": "ham10000", "data.root": str(tmp_path)})
    with pytest.raises(ConfigError, match="regenerate it with `python -m pipeline dvc-yaml`"):
        dvcgen.check_under_dvc(real, params)
    monkeypatch.delenv("DVC_STAGE")
    dvcgen.check_under_dvc(real, params)  # outside dvc repro nothing is checked


# --------------------------------------------------------------------------- extension points


def test_adding_a_data_source_is_one_decorated_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One function in pipeline/io/readers.py: params, the DAG's choices and dvc.yaml follow."""
    import pandas as pd

    from pipeline.app.orchestration import source_names
    from pipeline.app.params import load_params
    from pipeline.config import ConfigError
    from pipeline.io import readers

    monkeypatch.setattr(readers, "SOURCES", dict(readers.SOURCES))
    with pytest.raises(ConfigError, match="data.source: unknown source 'clinic_x'"):
        load_params(ROOT / "params.yaml", {"data.source": "clinic_x", "data.root": str(tmp_path)})

    @readers.source("clinic_x", needs_csv=True, description="a clinic's export")
    def read_clinic_x(csv_path: Path, root: Path) -> pd.DataFrame:
        return pd.DataFrame({"image_id": ["a"], "path": ["a.jpg"], "label": ["nv"], "group_id": ["a"]})

    with pytest.raises(ConfigError, match="data.csv: must be set for data.source='clinic_x'"):
        load_params(ROOT / "params.yaml", {"data.source": "clinic_x", "data.root": str(tmp_path)})
    cfg = load_params(ROOT / "params.yaml", {"data.source": "clinic_x", "data.root": str(tmp_path), "data.csv": "gt.csv"})
    assert "clinic_x" in source_names()
    deps = dvcgen.generate(cfg, ROOT / "params.yaml")["stages"]["ingest"]["deps"]
    assert str(tmp_path) in deps and "gt.csv" in deps
    root, df = __import__("pipeline.stages.ingest", fromlist=["read_source"]).read_source(cfg)
    assert root == tmp_path and df["label"].tolist() == ["nv"]


def test_adding_a_stage_is_one_table_row(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.app import cli

    extra = table.Stage(
        "explain", "pipeline.stages.evaluate:run_evaluate", "A further report after evaluate.",
        deps=("export_dir",), outs=(table.Out("reports_dir", cache=False),), params=("cam",), task="explain",
    )  # fmt: skip
    stages = (*table.STAGES[:8], extra, *table.STAGES[8:])
    monkeypatch.setattr(table, "STAGES", stages)
    monkeypatch.setattr(table, "BY_NAME", {s.name: s for s in stages})
    assert "explain" in cli.build_parser()._subparsers._group_actions[0].choices  # noqa: SLF001
    assert table.tasks().index("explain") == table.tasks().index("evaluate") + 1
    doc = dvcgen.generate(_params(), ROOT / "params.yaml")
    assert doc["stages"]["explain"]["cmd"] == "python -m pipeline explain"
    assert "models/export" in doc["stages"]["explain"]["deps"] and doc["stages"]["explain"]["params"] == ["cam"]


def test_adding_a_metric_is_one_function(monkeypatch: pytest.MonkeyPatch) -> None:
    """A key added in pipeline/core/metrics.py reaches metrics.json, MLflow's test_* metrics and the report."""
    import numpy as np

    from pipeline.core import evaluation, metrics, run_record

    original = metrics.classification_metrics
    monkeypatch.setattr(metrics, "classification_metrics", lambda y, p, *a: {**original(y, p, *a), "brier": 0.1})
    y = np.array([0, 1, 2, 3, 4, 5, 6])
    probs = np.eye(7)
    flat = evaluation.flat_metrics(metrics.classification_metrics(y, probs), {}, 7)
    assert flat["brier"] == 0.1
    assert run_record.final_metrics(flat)["test_brier"] == 0.1
    page = run_record.build_report(title="t", run_id="r", metrics=flat, images={}, validation={}, pairs_summary=None, tags={})
    assert "brier" in page


def test_architecture_md_names_every_extension_point() -> None:
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    for needle in ("pipeline/io/readers.py", "pipeline/app/table.py", "pipeline/core/metrics.py", "dvc-yaml",
                   "core", "io", "stages", "app"):  # fmt: skip
        assert needle in text, needle
    assert yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
