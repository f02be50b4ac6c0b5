"""One CLI for every stage: ``python -m pipeline <stage> --params params.yaml [--set k=v ...]``.

The subcommands are the stage table (:mod:`pipeline.app.table`); ``dvc.yaml`` and the Airflow DAG
call the same stage functions. Each stage function takes the typed
:class:`~pipeline.config.Config` (plus stage-specific arguments) and returns a small JSON-able
summary, printed as the last line of output. Heavy modules are imported only when their stage runs,
so ``--help`` is fast.

Exit codes (:mod:`pipeline.app.errors`): 0 success, 1 the stage's input is bad (the message names
the file and the problem), 2 bad command line or parameters, 3 the environment failed (disk full,
read-only folder, a service unreachable), 4 a bug; one line on stderr, the traceback only with ``-v``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pipeline.app import table
from pipeline.app.errors import report
from pipeline.app.params import load_params

# name -> stage declaration (the subcommands, in table order).
STAGES: dict[str, table.Stage] = table.BY_NAME


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        # the console script `skin-twin` or `python -m pipeline`: the same subcommands
        prog="skin-twin" if sys.argv[0].endswith("skin-twin") else "python -m pipeline",
        description="skin-twin: lightweight twin CNN for dermoscopy images, stage by stage.",
    )
    sub = parser.add_subparsers(dest="stage", metavar="<stage>", required=True)
    for stage in table.STAGES:
        p = sub.add_parser(stage.name, help=stage.help, description=stage.help)
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


def _dest(flags: tuple[str, ...], kwargs: dict) -> str:
    return kwargs.get("dest") or flags[0].lstrip("-").replace("-", "_")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if ns.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    stage = table.BY_NAME[ns.stage]
    extra = {_dest(flags, kw): getattr(ns, _dest(flags, kw)) for flags, kw in stage.args}
    if stage.wants_params_path:
        extra["params_path"] = ns.params
    try:
        cfg = load_params(ns.params, ns.overrides)
        if stage.pipeline:
            from pipeline.app.dvcgen import check_under_dvc

            check_under_dvc(cfg, ns.params)
        result = stage.load()(cfg, **extra)
    except BaseException as exc:  # noqa: BLE001 - the one top-level handler
        if isinstance(exc, SystemExit):
            raise
        code, text = report(ns.stage, exc, ns.verbose)
        print(text, file=sys.stderr)
        return code
    if result is not None and not stage.prints:
        print(json.dumps(result, default=str, sort_keys=True))
    return 0



