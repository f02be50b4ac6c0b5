"""The data-validation suite: Great Expectations (1.x) over the manifest plus per-image facts.

Pure: tables in, report out (GX runs in an ephemeral, in-memory context). The ``validate`` stage
(:mod:`pipeline.stages.validate`) does the IO. Flow:

1. the stage reads ``Layout.manifest`` and gathers per-image facts
   (:func:`pipeline.io.imagefacts.gather_facts`);
2. :func:`build_tables` derives the two tables the suite checks:

   * ``images``: one row per image, manifest + facts + derived columns ``pixels``,
     ``content_splits`` (number of splits holding the same bytes) and ``group_splits`` (number of
     splits holding the same ``group_id``), with ``*_split_set`` texts for the report;
   * ``classes``: one row per class of :data:`pipeline.labels.CLASSES` with its image count per
     split, so a class with *no* images is a row that can fail.

3. :func:`define_checks` states every rule as a GX expectation (nothing is checked outside GX, so
   every rule shows in the GX result); :func:`run_suite` runs them in an ephemeral context with a
   pandas data source, one dataframe asset per table, whole-table batches.
4. the stage always writes ``reports/validation/result.json`` and ``summary.html``
   (:meth:`Report.to_dict`, :func:`render_html`); on success the validated manifest (manifest +
   facts), on failure it removes it and :class:`~pipeline.errors.ValidationFailed` names the
   failed checks with example rows (:func:`format_failures`).

Design choices: the reports carry no timestamp, so the same input gives byte-identical reports
(the lineage records their digest). Size bounds apply to the *actual* image size (header), and the manifest's
``width``/``height``/``sha256`` must agree with the file; the pair checks skip rows whose file
could not be read (those fail ``exists``/``decodes`` already, with the reason in ``error``).
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import ValidateConfig
from pipeline.core.imaging import hash_words, near_pairs
from pipeline.core.schema import FACT_COLUMNS, MANIFEST_COLUMNS, SPLITS
from pipeline.labels import CLASSES

log = logging.getLogger(__name__)

SUITE_NAME = "skin_twin_manifest"
DERIVED_COLUMNS: tuple[str, ...] = (
    "pixels", "content_splits", "content_split_set", "group_splits", "group_split_set",
    "group_labels", "group_label_set", "near_dup_splits", "near_dup_of",
)  # fmt: skip
IMAGE_COLUMNS: tuple[str, ...] = MANIFEST_COLUMNS + FACT_COLUMNS + DERIVED_COLUMNS
CLASS_COLUMNS: tuple[str, ...] = ("label", "n_train", "n_val", "n_test", "n_total")
_STRING_COLUMNS = ("image_id", "path", "label", "group_id", "split", "sha256", "source_site")
_INT_TYPES = ["int", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "Int32", "Int64"]

_GX_LOGGERS = ("great_expectations",)


# ---------------------------------------------------------------------------------------------
# Derived tables (pure)
# ---------------------------------------------------------------------------------------------


def _split_sets(keys: pd.Series, splits: pd.Series) -> tuple[pd.Series, pd.Series]:
    """Per row: how many distinct splits share its key, and which (e.g. "train,val").

    Rows with a missing/empty key count as in one split (nothing to compare)."""
    valid = keys.notna() & (keys.astype(str) != "")
    frame = pd.DataFrame({"key": keys[valid].astype(str), "split": splits[valid].astype(str)})
    sets = frame.groupby("key")["split"].agg(lambda s: ",".join(sorted(set(s))))
    text = keys.where(valid).astype(object).map(sets)
    text = text.where(valid, splits.astype(str))
    count = text.map(lambda t: len(str(t).split(","))).astype("int64")
    return count, text.astype(str)


def _group_labels(images: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Per row: how many distinct labels the images of its group (lesion) carry, and which."""
    sets = images.groupby(images["group_id"].astype(str))["label"].agg(lambda s: ",".join(sorted(set(s.astype(str)))))
    text = images["group_id"].astype(str).map(sets).astype(str)
    return text.map(lambda t: len(t.split(","))).astype("int64"), text


def _near_duplicates(images: pd.DataFrame, max_distance: int) -> tuple[pd.Series, pd.Series]:
    """Per row: how many splits hold it or a near-duplicate (perceptual hashes at most
    ``max_distance`` bits apart), and the ids of its near-duplicates in other splits.
    ``max_distance < 0`` turns the search off (every row counts 1 split)."""
    n = len(images)
    count = pd.Series(np.ones(n, dtype=np.int64), index=images.index)
    others = pd.Series([""] * n, index=images.index, dtype=object)
    if max_distance < 0 or n < 2:
        return count, others
    hashes = images["phash"].where(images["phash"].notna(), "").astype(str).tolist()
    has = np.array([bool(h) for h in hashes])
    idx = np.flatnonzero(has)
    if idx.size < 2:
        return count, others
    splits = images["split"].astype(str).to_numpy()
    ids = images["image_id"].astype(str).to_numpy()
    seen: dict[int, set[str]] = {}
    partners: dict[int, list[str]] = {}
    for a, b in near_pairs(hash_words([hashes[i] for i in idx]), max_distance):
        i, j = int(idx[a]), int(idx[b])
        if splits[i] == splits[j]:
            continue
        for x, y in ((i, j), (j, i)):
            seen.setdefault(x, {splits[x]}).add(splits[y])
            partners.setdefault(x, []).append(f"{ids[y]} ({splits[y]})")
    for i, ss in seen.items():
        count.iloc[i] = len(ss)
        others.iloc[i] = ", ".join(partners[i][:3]) + (" ..." if len(partners[i]) > 3 else "")
    return count, others


def build_tables(facts: pd.DataFrame, near_duplicate_distance: int = -1) -> dict[str, pd.DataFrame]:
    """Facts table -> ``{"images": ..., "classes": ...}``, the two tables the suite checks.

    ``near_duplicate_distance`` (``validate.near_duplicate_distance``; -1: off) bounds the
    perceptual-hash distance at which two images count as the same picture."""
    images = facts.reset_index(drop=True).copy()
    images["pixels"] = (images["img_width"] * images["img_height"]).astype("Int64")
    content = images["file_sha256"].astype(object).where(images["file_sha256"].notna(), images["sha256"].astype(object))
    images["content_splits"], images["content_split_set"] = _split_sets(content, images["split"])
    images["group_splits"], images["group_split_set"] = _split_sets(images["group_id"].astype(object), images["split"])
    images["group_labels"], images["group_label_set"] = _group_labels(images)
    images["near_dup_splits"], images["near_dup_of"] = _near_duplicates(images, near_duplicate_distance)

    known = images[images["label"].isin(CLASSES) & images["split"].isin(SPLITS)]
    counts = (
        known.groupby(["label", "split"])
        .size()
        .unstack(fill_value=0)
        .reindex(index=list(CLASSES), columns=list(SPLITS))
    )
    counts = counts.fillna(0).astype("int64")
    classes = pd.DataFrame(
        {
            "label": list(CLASSES),
            "n_train": counts["train"].to_numpy(),
            "n_val": counts["val"].to_numpy(),
            "n_test": counts["test"].to_numpy(),
        }
    )
    classes["n_total"] = classes[["n_train", "n_val", "n_test"]].sum(axis=1).astype("int64")
    return {"images": images, "classes": classes}


# ---------------------------------------------------------------------------------------------
# The suite
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One rule: a GX expectation on one table, with a sentence saying what must hold."""

    name: str  # unique id, stored in the expectation's meta
    table: str  # "images" | "classes"
    description: str
    expectation: Any  # a great_expectations.expectations.Expectation
    show: tuple[str, ...] = ()  # columns shown as the example rows' "value"


def _import_gx() -> Any:
    """Import great_expectations quietly (no analytics, no info logging, no progress bars)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    for name in _GX_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    import great_expectations as gx

    _quiet_gx_loggers()
    return gx


def _quiet_gx_loggers() -> None:
    """GX sets some of its module loggers to INFO explicitly; lift them all to WARNING."""
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if name.startswith("great_expectations") and isinstance(logger, logging.Logger):
            if logger.level < logging.WARNING:
                logger.setLevel(logging.WARNING)


def define_checks(cfg: ValidateConfig) -> list[Check]:
    """Every rule of the suite, in report order."""
    E = _import_gx().expectations

    def c(name: str, table: str, description: str, exp: Any, show: tuple[str, ...] = ()) -> Check:
        exp.meta = {"check": name, "description": description}
        return Check(name, table, description, exp, show)

    checks = [
        c("not_empty", "images", "the manifest has at least one image", E.ExpectTableRowCountToBeBetween(min_value=1)),
        c(
            "columns",
            "images",
            f"the manifest has exactly the columns {list(MANIFEST_COLUMNS)} (plus the facts gathered here)",
            E.ExpectTableColumnsToMatchSet(column_set=list(IMAGE_COLUMNS), exact_match=True),
        ),
    ]
    for col in _STRING_COLUMNS:
        text = E.ExpectColumnValuesToBeOfType(column=col, type_="str")
        checks.append(c(f"type_{col}", "images", f"{col} is text", text, (col,)))
    for col in ("width", "height"):
        checks.append(
            c(
                f"type_{col}",
                "images",
                f"{col} is an integer",
                E.ExpectColumnValuesToBeInTypeList(column=col, type_list=_INT_TYPES),
                (col,),
            )
        )
    for col in MANIFEST_COLUMNS:
        not_null = E.ExpectColumnValuesToNotBeNull(column=col)
        checks.append(c(f"not_null_{col}", "images", f"{col} is never missing", not_null, (col,)))
    for col in ("image_id", "path", "group_id", "source_site"):
        checks.append(
            c(
                f"not_blank_{col}",
                "images",
                f"{col} is not empty text",
                E.ExpectColumnValueLengthsToBeBetween(column=col, min_value=1),
                (col,),
            )
        )
    checks += [
        c(
            "unique_image_id",
            "images",
            "image_id is unique",
            E.ExpectColumnValuesToBeUnique(column="image_id"),
            ("image_id",),
        ),
        c(
            "label_known",
            "images",
            f"label is one of {list(CLASSES)}",
            E.ExpectColumnValuesToBeInSet(column="label", value_set=list(CLASSES)),
            ("label",),
        ),
        c(
            "split_known",
            "images",
            f"split is one of {list(SPLITS)}",
            E.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
            ("split",),
        ),
        c(
            "inside_root",
            "images",
            "path is relative and stays inside the data root",
            E.ExpectColumnValuesToBeInSet(column="inside_root", value_set=[True]),
            ("inside_root",),
        ),
        c(
            "exists",
            "images",
            "the image file exists",
            E.ExpectColumnValuesToBeInSet(column="exists", value_set=[True]),
            ("exists",),
        ),
        c(
            "decodes",
            "images",
            "the image decodes fully",
            E.ExpectColumnValuesToBeInSet(column="decodes", value_set=[True]),
            ("decodes",),
        ),
        c(
            "max_pixels",
            "images",
            f"the image has at most max_pixels={cfg.max_pixels} pixels",
            E.ExpectColumnValuesToBeBetween(column="pixels", max_value=cfg.max_pixels),
            ("pixels",),
        ),
        c(
            "mode",
            "images",
            f"the image mode is one of {list(cfg.allowed_modes)}",
            E.ExpectColumnValuesToBeInSet(column="mode", value_set=list(cfg.allowed_modes)),
            ("mode",),
        ),
        c(
            "width_bounds",
            "images",
            f"the image width is within [{cfg.min_width}, {cfg.max_width}]",
            E.ExpectColumnValuesToBeBetween(column="img_width", min_value=cfg.min_width, max_value=cfg.max_width),
            ("img_width",),
        ),
        c(
            "height_bounds",
            "images",
            f"the image height is within [{cfg.min_height}, {cfg.max_height}]",
            E.ExpectColumnValuesToBeBetween(column="img_height", min_value=cfg.min_height, max_value=cfg.max_height),
            ("img_height",),
        ),
        c(
            "width_matches",
            "images",
            "the manifest width equals the image's width",
            E.ExpectColumnPairValuesToBeEqual(
                column_A="width", column_B="img_width", ignore_row_if="either_value_is_missing"
            ),
            ("width", "img_width"),
        ),
        c(
            "height_matches",
            "images",
            "the manifest height equals the image's height",
            E.ExpectColumnPairValuesToBeEqual(
                column_A="height", column_B="img_height", ignore_row_if="either_value_is_missing"
            ),
            ("height", "img_height"),
        ),
        c(
            "sha256_matches",
            "images",
            "the manifest sha256 equals the recomputed sha256 of the file",
            E.ExpectColumnPairValuesToBeEqual(
                column_A="sha256", column_B="file_sha256", ignore_row_if="either_value_is_missing"
            ),
            ("sha256", "file_sha256"),
        ),
        c(
            "content_one_split",
            "images",
            "identical image content (sha256) is never in two splits",
            E.ExpectColumnValuesToBeBetween(column="content_splits", min_value=1, max_value=1),
            ("file_sha256", "content_split_set"),
        ),
        c(
            "group_one_split",
            "images",
            "a group_id (lesion) is never in two splits",
            E.ExpectColumnValuesToBeBetween(column="group_splits", min_value=1, max_value=1),
            ("group_id", "group_split_set"),
        ),
    ]
    if cfg.near_duplicate_distance >= 0:
        checks.append(
            c(
                "near_duplicate_one_split",
                "images",
                "the same picture (perceptual hashes at most near_duplicate_distance="
                f"{cfg.near_duplicate_distance} bits apart, e.g. re-encoded or resized) is never in two splits",
                E.ExpectColumnValuesToBeBetween(column="near_dup_splits", min_value=1, max_value=1),
                ("near_dup_of",),
            )
        )
    if cfg.lesion_label_conflict == "refuse":
        checks.append(
            c(
                "group_one_label",
                "images",
                "all images of a group_id (lesion) carry the same label (lesion_label_conflict=refuse)",
                E.ExpectColumnValuesToBeBetween(column="group_labels", min_value=1, max_value=1),
                ("group_id", "group_label_set"),
            )
        )
    checks += [
        c(
            "classes_in_train",
            "classes",
            f"every class has at least min_train_per_class={cfg.min_train_per_class} train images",
            E.ExpectColumnValuesToBeBetween(column="n_train", min_value=cfg.min_train_per_class),
            ("n_train",),
        ),
    ]
    names = [ch.name for ch in checks]
    assert len(names) == len(set(names)), "check names must be unique"
    return checks


# ---------------------------------------------------------------------------------------------
# Running it and shaping the result
# ---------------------------------------------------------------------------------------------


@dataclass
class CheckResult:
    name: str
    table: str
    description: str
    expectation_type: str
    kwargs: dict[str, Any]
    success: bool
    element_count: int | None = None
    unexpected_count: int | None = None
    observed_value: Any = None
    details: Any = None
    exception: str | None = None
    examples: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Report:
    success: bool
    n_images: int
    checks: list[CheckResult]
    gx_version: str

    @property
    def failed(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.success]

    def to_dict(self) -> dict[str, Any]:
        return {
            "success": self.success,
            "suite": SUITE_NAME,
            "great_expectations_version": self.gx_version,
            "n_images": self.n_images,
            "n_expectations": len(self.checks),
            "n_failed": len(self.failed),
            "failed": [c.name for c in self.failed],
            "expectations": [_jsonable(vars(c)) for c in self.checks],
        }


def _jsonable(value: Any) -> Any:
    """numpy/pandas scalars, NA and tuples -> plain JSON values."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if hasattr(value, "item"):
        return _jsonable(value.item())
    return str(value)


def _examples(check: Check, table: pd.DataFrame, indices: list[Any], limit: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for idx in indices[:limit]:
        if not hasattr(idx, "__index__"):  # pandas row positions (the tables have a RangeIndex)
            continue
        row = table.iloc[int(idx)]
        values = {col: row[col] for col in check.show if col in row.index}
        value = next(iter(values.values())) if len(values) == 1 else values
        if check.table == "images":
            ex = {
                "image_id": row.get("image_id"),
                "path": row.get("path"),
                "value": value,
                "error": row.get("error", ""),
            }
        else:
            ex = {"label": row.get("label"), "value": value}
        out.append(_jsonable(ex))
    return out


def _shape(check: Check, res: Any, table: pd.DataFrame, limit: int) -> CheckResult:
    result = dict(res.result or {})
    info = res.exception_info or {}
    if "raised_exception" not in info and info:  # several metrics -> {metric_id: info}
        info = next((v for v in info.values() if v.get("raised_exception")), {})
    exception = info.get("exception_message") if info.get("raised_exception") else None
    return CheckResult(
        name=check.name,
        table=check.table,
        description=check.description,
        expectation_type=res.expectation_config.type,
        kwargs=_jsonable({k: v for k, v in res.expectation_config.kwargs.items() if k != "batch_id"}),
        success=bool(res.success),
        element_count=_jsonable(result.get("element_count")),
        unexpected_count=_jsonable(result.get("unexpected_count")),
        observed_value=_jsonable(result.get("observed_value")),
        details=_jsonable(result.get("details")),
        exception=exception,
        examples=[] if res.success else _examples(check, table, list(result.get("unexpected_index_list") or []), limit),
    )


def run_suite(tables: dict[str, pd.DataFrame], cfg: ValidateConfig) -> Report:
    """Run :func:`define_checks` on ``tables`` in an ephemeral GX context; shape the result."""
    gx = _import_gx()
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    _quiet_gx_loggers()
    source = context.data_sources.add_pandas("skin_twin")
    checks = define_checks(cfg)
    by_name = {c.name: c for c in checks}
    shaped: dict[str, CheckResult] = {}
    for table_name, table in tables.items():
        mine = [c for c in checks if c.table == table_name]
        if not mine:
            continue
        batch_def = source.add_dataframe_asset(table_name).add_batch_definition_whole_dataframe("all")
        suite = context.suites.add(gx.ExpectationSuite(name=f"{SUITE_NAME}.{table_name}"))
        for check in mine:
            suite.add_expectation(check.expectation)
        batch = batch_def.get_batch(batch_parameters={"dataframe": table})
        result = batch.validate(suite, result_format={"result_format": "COMPLETE"})
        for res in result.results:
            check = by_name[res.expectation_config.meta["check"]]
            shaped[check.name] = _shape(check, res, table, cfg.report_examples)
    ordered = [shaped[c.name] for c in checks if c.name in shaped]
    return Report(
        success=all(c.success for c in ordered),
        n_images=len(tables["images"]),
        checks=ordered,
        gx_version=gx.__version__,
    )


# ---------------------------------------------------------------------------------------------
# Text and HTML renderings (pure)
# ---------------------------------------------------------------------------------------------


def _example_line(ex: dict[str, Any]) -> str:
    if "image_id" in ex:
        text = f"{ex['image_id']} ({ex['path']}): value={json.dumps(ex['value'], default=str)}"
        return text + (f" error={ex['error']!r}" if ex.get("error") else "")
    return f"class {ex['label']}: value={json.dumps(ex['value'], default=str)}"


def format_failures(report: Report, examples: int) -> str:
    """Plain-text listing of the failed checks with up to ``examples`` rows each."""
    lines = [f"{len(report.failed)} of {len(report.checks)} expectations failed on {report.n_images} image(s):"]
    for c in report.failed:
        count = f"{c.unexpected_count} of {c.element_count} rows" if c.unexpected_count is not None else ""
        observed = f"observed {json.dumps(c.observed_value, default=str)}" if c.observed_value is not None else ""
        detail = count or observed
        if isinstance(c.details, dict) and "mismatched" in c.details:
            detail = f"mismatched {json.dumps(c.details['mismatched'], default=str)}"
        if c.exception:
            detail = f"GX error: {c.exception}"
        lines.append(f"  FAILED {c.name}: {c.description} [{c.expectation_type}] {detail}".rstrip())
        for ex in c.examples[:examples]:
            lines.append(f"      - {_example_line(ex)}")
        if c.unexpected_count and c.unexpected_count > min(examples, len(c.examples)):
            lines.append(f"      ... {c.unexpected_count - min(examples, len(c.examples))} more")
    return "\n".join(lines)


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
h1 span{padding:.1em .5em;border-radius:.3em;color:#fff}
.ok{background:#2e7d32}.bad{background:#c62828}
table{border-collapse:collapse;width:100%;margin-top:1em}
td,th{border:1px solid #ccc;padding:.3em .5em;vertical-align:top;text-align:left;font-size:.9em}
th{background:#f3f3f3} tr.fail td{background:#fff3f3} code{font-size:.85em}
ul{margin:.2em 0;padding-left:1.2em}
"""


def render_html(report: Report, examples: int) -> str:
    """A self-contained HTML page: overall status, one table row per expectation, examples."""
    esc = html.escape
    status = "PASSED" if report.success else "FAILED"
    rows = []
    for c in report.checks:
        detail = ""
        if c.unexpected_count is not None:
            detail = f"{c.unexpected_count} / {c.element_count}"
        elif c.observed_value is not None:
            detail = f"observed: <code>{esc(json.dumps(c.observed_value, default=str))}</code>"
        if c.exception:
            detail += f"<br>GX error: {esc(c.exception)}"
        exs = "".join(f"<li><code>{esc(_example_line(ex))}</code></li>" for ex in c.examples[:examples])
        rows.append(
            f"<tr class='{'pass' if c.success else 'fail'}'>"
            f"<td>{'&#10004; pass' if c.success else '&#10008; FAIL'}</td>"
            f"<td><b>{esc(c.name)}</b><br>{esc(c.description)}</td><td><code>{esc(c.expectation_type)}</code>"
            f"<br><small>{esc(c.table)}</small></td><td>{detail}</td>"
            f"<td>{'<ul>' + exs + '</ul>' if exs else ''}</td></tr>"
        )
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>skin-twin validation</title>"
        f"<style>{_CSS}</style></head><body>"
        f"<h1>Data validation <span class='{'ok' if report.success else 'bad'}'>{status}</span></h1>"
        f"<p>{report.n_images} image(s); {len(report.checks) - len(report.failed)} of {len(report.checks)} "
        f"expectations passed. Suite <code>{SUITE_NAME}</code>, Great Expectations {esc(report.gx_version)}.</p>"
        "<table><tr><th>status</th><th>check</th><th>expectation</th><th>unexpected / rows</th>"
        f"<th>examples (up to {examples})</th></tr>{''.join(rows)}</table></body></html>\n"
    )
