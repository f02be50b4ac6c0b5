"""Stage ``lineage``: print the chain of a registered model version and return it as a dict.

``python -m pipeline lineage --model models:/NAME@ALIAS`` (or ``models:/NAME/VERSION``) reads the
version, its run, the run's tags and dataset inputs from MLflow and prints
:func:`pipeline.core.lineage.format_chain` of :func:`~pipeline.core.lineage.lineage_chain`.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import Config
from pipeline.core.lineage import format_chain, lineage_chain
from pipeline.errors import PipelineError
from pipeline.io.mlflow_service import client_for
from pipeline.io.registry import resolve_version


def run_lineage(cfg: Config, model: str) -> dict[str, Any]:
    client = client_for(cfg, create=False)
    version = resolve_version(client, model)
    if not version.run_id:
        raise PipelineError(f"{model}: version {version.version} has no source run; no lineage recorded")
    run = client.get_run(version.run_id)
    datasets = list(run.inputs.dataset_inputs) if run.inputs else []
    chain = lineage_chain(version, run, datasets)
    print(format_chain(chain))
    return chain
