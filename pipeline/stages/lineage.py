"""Stage ``lineage``: the chain of a registered model version, for humans and machines.

``python -m pipeline lineage --model models:/NAME@ALIAS`` (or ``models:/NAME/VERSION``) reads the
version, its run, the run's tags and dataset inputs from MLflow and prints the readable chain
(:func:`pipeline.core.lineage.format_chain`); ``--json`` prints the same chain as JSON instead;
``--verify`` also re-computes what can be re-computed from the tracking store
(:mod:`pipeline.io.audit`) and exits 1 naming every mismatch.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from pipeline.config import Config
from pipeline.core.lineage import format_chain, format_checks, lineage_chain
from pipeline.errors import PipelineError
from pipeline.io.audit import verify as verify_chain
from pipeline.io.mlflow_service import client_for
from pipeline.io.registry import resolve_version


def run_lineage(cfg: Config, model: str, json_output: bool = False, verify: bool = False) -> dict:
    client = client_for(cfg, create=False)
    version = resolve_version(client, model)
    if not version.run_id:
        raise PipelineError(f"{model}: version {version.version} has no source run; no lineage recorded")
    run = client.get_run(version.run_id)
    datasets = list(run.inputs.dataset_inputs) if run.inputs else []
    chain = lineage_chain(version, run, datasets)
    if verify:
        with tempfile.TemporaryDirectory() as tmp:
            chain["verify"] = verify_chain(client, version, run, chain, Path(tmp))
    print(json.dumps(chain, indent=2, sort_keys=True, default=str) if json_output else format_chain(chain))
    if verify and not json_output:
        print(format_checks(chain["verify"]))
    failed = [c["check"] for c in chain.get("verify", []) if not c["ok"]]
    if failed:
        raise PipelineError(f"{model}: lineage --verify found {len(failed)} mismatch(es): {', '.join(failed)}")
    return chain
