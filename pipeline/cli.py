"""One CLI for every stage: ``python -m pipeline <stage> --params params.yaml [--set k=v ...]``.

``dvc.yaml`` and the Airflow DAG both call the same stage functions. Each stage function takes
the typed :class:`~pipeline.config.Config` (plus stage-specific arguments) and returns a small
JSON-able summary, printed as the last line of output. Heavy modules are imported only when
their stage runs, so ``--help`` is fast.

Exit codes: 0 success, 1 the stage failed on its input (message names file and problem),
2 bad command line or parameters.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import ConfigError, load_config
from pipeline.errors import PipelineError


@dataclass(frozen=True)
class Stage:
    target: str  # "module:function"
    help: str
    # (flags, kwargs) for argparse add_argument; dest names become keyword arguments.
    args: tuple[tuple[tuple[str, ...], dict[str, Any]], ...] = field(default_factory=tuple)

    def load(self) -> Callable[..., Any]:
        module, _, func = self.target.partition(":")
        return getattr(importlib.import_module(module), func)


STAGES: dict[str, Stage] = {
    "synthesize": Stage(
        "pipeline.synthetic:run_synthesize",
        "Generate the project's own SYNTHETIC dermoscopy-like data set (default data source).",
    ),
    "ingest": Stage(
        "pipeline.sources:run_ingest",
        "Read the configured data source into one manifest with lesion-grouped stratified splits.",
    ),
    "validate": Stage(
        "pipeline.validation:run_validate",
        "Gather per-image facts and run the Great Expectations suite; exit 1 on failure.",
    ),
    "augment": Stage(
        "pipeline.augment:run_augment",
        "Offline augmentation of the train split (val/test only resized).",
    ),
    "pairs": Stage(
        "pipeline.pairs:run_pairs",
        "Build per-epoch pair manifests with the patent's pair generator.",
    ),
    "train": Stage(
        "pipeline.train:run_train",
        "Train the twin network; keep the lowest-validation-loss state (patent S2).",
    ),
    "select": Stage(
        "pipeline.export:run_select",
        "Pick the branch with the lower validation loss and export the inference model (S3).",
    ),
    "evaluate": Stage(
        "pipeline.evaluate:run_evaluate",
        "Score the inference model on the test split; metrics, plots and CAM samples (S4).",
    ),
    "predict": Stage(
        "pipeline.predict:run_predict",
        "Classify images with an exported model or a models:/NAME@ALIAS URI.",
        (
            (("--model",), {"required": True, "help": "models:/NAME@ALIAS or path to an exported model folder"}),
            (("--images",), {"required": True, "help": "an image file or a folder of images"}),
            (("--out",), {"required": True, "help": "output CSV path"}),
            (("--cam-dir",), {"default": None, "help": "also write a CAM overlay PNG per image here"}),
        ),
    ),
    "track": Stage(
        "pipeline.tracking:run_track",
        "Log params, metrics, artifacts, datasets and the model of this run to MLflow.",
    ),
    "register": Stage(
        "pipeline.registry:run_register",
        "Register the model as challenger and apply the champion gate.",
    ),
    "lineage": Stage(
        "pipeline.lineage:run_lineage",
        "Print the lineage chain of a registered model version.",
        ((("--model",), {"required": True, "help": "models:/NAME@ALIAS or models:/NAME/VERSION"}),),
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="skin-twin: lightweight twin CNN for dermoscopy images, stage by stage.",
    )
    sub = parser.add_subparsers(dest="stage", metavar="<stage>", required=True)
    for name, stage in STAGES.items():
        p = sub.add_parser(name, help=stage.help, description=stage.help)
        p.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="dotted.key=value",
            help="override one parameter (repeatable), e.g. --set train.epochs=2",
        )
        p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
        for flags, kwargs in stage.args:
            p.add_argument(*flags, **kwargs)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if ns.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    stage = STAGES[ns.stage]
    extra = {
        flags[0].lstrip("-").replace("-", "_"): getattr(ns, flags[0].lstrip("-").replace("-", "_"))
        for flags, _ in stage.args
    }
    try:
        cfg = load_config(ns.params, ns.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        result = stage.load()(cfg, **extra)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except PipelineError as exc:
        print(f"error: {ns.stage}: {exc}", file=sys.stderr)
        return 1
    if result is not None:
        print(json.dumps(result, default=str, sort_keys=True))
    return 0
