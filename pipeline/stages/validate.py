"""Stage ``validate``: per-image facts + the Great Expectations suite; fails the run on bad data.

Reads the ingested manifest, gathers facts from the image files (:mod:`pipeline.io.imagefacts`),
runs the pure suite (:mod:`pipeline.core.checks`) and always writes
``reports/validation/result.json`` and ``summary.html``. On success it writes the validated
manifest (manifest + facts); on failure it removes it and raises
:class:`~pipeline.errors.ValidationFailed` (CLI exit 1) naming the failed checks with example rows.
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline.config import Config
from pipeline.core.checks import build_tables, format_failures, render_html, run_suite
from pipeline.core.schema import FACT_COLUMNS, MANIFEST_COLUMNS
from pipeline.errors import DataError, ValidationFailed
from pipeline.io.files import remove, write_json, write_table, write_text
from pipeline.io.imagefacts import gather_facts
from pipeline.io.manifests import read_manifest
from pipeline.io.readers import data_root
from pipeline.layout import Layout

log = logging.getLogger(__name__)


def run_validate(cfg: Config) -> dict[str, Any]:
    vcfg = cfg.validate_cfg
    layout = Layout.from_config(cfg)
    # Retract first: whatever happens below, no stale validated manifest survives a failed run.
    remove(layout.validated_manifest)
    manifest = read_manifest(layout.manifest)
    root = data_root(cfg)
    if len(manifest) and not root.is_dir():
        raise DataError(f"{root}: data root not found")

    facts = gather_facts(manifest, root, vcfg)
    report = run_suite(build_tables(facts, vcfg.near_duplicate_distance), vcfg)

    write_json(layout.validation_dir / "result.json", report.to_dict())
    write_text(layout.validation_dir / "summary.html", render_html(report, vcfg.report_examples))
    summary = {
        "n_images": report.n_images,
        "n_expectations": len(report.checks),
        "n_failed": len(report.failed),
        "success": report.success,
        "report": str(layout.validation_dir / "summary.html"),
    }
    if not report.success:
        remove(layout.validated_manifest)
        msg = format_failures(report, vcfg.examples)
        if report.n_images == 0:
            msg = f"{layout.manifest}: the manifest is empty (no images)\n{msg}"
        raise ValidationFailed(f"{msg}\nreport: {layout.validation_dir / 'summary.html'}")
    write_table(layout.validated_manifest, facts.loc[:, list(MANIFEST_COLUMNS) + list(FACT_COLUMNS)])
    log.info("validate: %d images, %d expectations passed -> %s", report.n_images, len(report.checks),
             layout.validated_manifest)
    return summary
