"""Stage ``register``: model registry with a champion/challenger gate (aliases, no stages).

After ``track``:

1. Registers the run's LoggedModel (``reports/mlflow.json``) as a new version of
   ``registry.model_name`` (a re-run finds the version it registered before) and points the
   alias ``challenger`` at it.
2. **Gate.** Scores the challenger and the current ``champion`` on the *same* test manifest, this
   run's test split (``data/augmented/manifest.parquet``), with
   :func:`pipeline.io.scoring.score_model`; both models are downloaded from the registry, so what
   is scored is exactly what the aliases point at, and each is checked file by file against its
   version's file manifest (tag ``skin_twin.model_files_digest``, set here from the run's) before
   anything of it is loaded: a changed, missing or added file fails the stage naming it. :func:`pipeline.core.gate.gate_decision` promotes the challenger
   (``champion`` moves to it) only when its balanced accuracy is at least the champion's plus
   ``registry.margin`` (with margin 0, a tie promotes the newer model) and reaches ``registry.floor``;
   with no champion yet, the floor alone decides.
3. Records the decision, reason and both scores as version tags (``gate.*``) and in the version
   description, and under ``registry`` in the tracking record.

A failure anywhere (download, scoring, the registry itself) restores the aliases captured before
the stage began, then re-raises; a newly registered version may remain, tagged
``gate.decision=error``, but no alias points at it.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.config import Config
from pipeline.core.gate import gate_decision, manifest_digest
from pipeline.core.lineage import GATE_INDEX, TAG
from pipeline.core.model_card import description, model_card
from pipeline.core.schema import AUGMENTED_COLUMNS
from pipeline.errors import PipelineError
from pipeline.io import scoring
from pipeline.io.digests import file_sha256
from pipeline.io.files import read_json_object, write_json, write_text
from pipeline.io.locks import gate_lock
from pipeline.io.manifests import read_parquet, split_rows
from pipeline.io.model_files import DIGEST_TAG
from pipeline.io.mlflow_service import client_for, redact, resolve_tracking_uri
from pipeline.io.modelstore import load_exported
from pipeline.io.provenance import split_manifest
from pipeline.io.readers import SOURCES, data_root
from pipeline.io.registry import (
    CHALLENGER,
    CHAMPION,
    download_version,
    find_or_register,
    get_aliases,
    record_model_files,
    restore_aliases,
)
from pipeline.io.reports import render_run_report
from pipeline.layout import Layout

log = logging.getLogger(__name__)


def _test_manifest(layout: Layout) -> pd.DataFrame:
    aug = read_parquet(layout.augmented_manifest, "augment", AUGMENTED_COLUMNS)
    return split_rows(aug, "test", str(layout.augmented_manifest), "the gate scores on the test split")


def score_export(folder: Path, test: pd.DataFrame, layout: Layout, cfg: Config) -> float | None:
    """Balanced accuracy of an export folder on ``test`` (via :func:`pipeline.io.scoring.score_model`)."""
    metrics, _ = scoring.score_model(load_exported(folder), test, layout.augmented_dir, cfg)
    ba = metrics.get("balanced_accuracy")
    return None if ba is None or not math.isfinite(float(ba)) else float(ba)


def run_register(cfg: Config) -> dict[str, Any]:
    """Returns the decision summary (also written under ``registry`` in the tracking record)."""
    layout = Layout.from_config(cfg)
    record = read_json_object(layout.tracking_record)
    if not record.get("run_id") or not record.get("model_uri"):
        raise PipelineError(f"{layout.tracking_record}: no tracked run/model (run the track stage first)")
    uri = resolve_tracking_uri(cfg)
    if record.get("tracking_uri") and record["tracking_uri"] != redact(uri):
        raise PipelineError(
            f"{layout.tracking_record}: the run was tracked in {record['tracking_uri']}, "
            f"not in {redact(uri)} (run track against this store first)"
        )
    client = client_for(cfg)
    test = _test_manifest(layout)
    # The whole decision -- read the champion, score, tag, move the alias -- under one lock that
    # holds across processes and hosts, so concurrent registers end with one consistent champion.
    with gate_lock(cfg, uri) as lock:
        summary = _gate(client, cfg, record, layout, test, lock)
    summary["model_card"] = publish_card(client, cfg, record, layout, summary)
    write_json(layout.tracking_record, {**record, "registry": summary})
    log.info("registered %s v%s: %s (%s)", summary["model_name"], summary["version"], summary["decision"],
             summary["reason"])
    return summary


def _fmt(x: float | None) -> str:
    return "none" if x is None else f"{x:.6f}"


def _gate(client: Any, cfg: Config, record: dict[str, Any], layout: Layout, test: pd.DataFrame, lock: str) -> dict[str, Any]:
    rc = cfg.registry
    name = rc.model_name
    before = get_aliases(client, name)
    version = None
    try:
        version = find_or_register(client, name, record)
        v = str(version.version)
        # the file manifest's digest on the version: download_version checks every file against it
        # before anything of the model is loaded (the challenger here, the champion below)
        if not (version.tags or {}).get(DIGEST_TAG):
            digest = client.get_run(record["run_id"]).data.tags.get(DIGEST_TAG)
            if not digest:  # tracked before model manifests existed: hash what the store holds now
                digest = record_model_files(client, record["run_id"], record["model_uri"])
            client.set_model_version_tag(name, v, DIGEST_TAG, digest)
            version = client.get_model_version(name, v)
        client.set_registered_model_alias(name, CHALLENGER, v)

        challenger_ba = score_export(download_version(client, version, cfg), test, layout, cfg)
        champ_v = before.get(CHAMPION)
        champion_ba: float | None = None
        if champ_v is not None:
            if champ_v == v:
                champion_ba = challenger_ba
            else:
                champ = client.get_model_version(name, champ_v)
                champion_ba = score_export(download_version(client, champ, cfg), test, layout, cfg)

        if champ_v == v:
            promote, reason = False, f"version {v} is already the champion (balanced accuracy {challenger_ba})"
        else:
            promote, reason = gate_decision(challenger_ba, champion_ba, rc.margin, rc.floor)
        decision = "promoted" if promote else ("already-champion" if champ_v == v else "kept-champion" if champ_v else "rejected")
        tags = {
            "gate.decision": decision,
            "gate.promoted": str(promote).lower(),
            "gate.reason": reason,
            "gate.challenger_balanced_accuracy": _fmt(challenger_ba),
            "gate.champion_balanced_accuracy": _fmt(champion_ba),
            "gate.champion_version": champ_v or "none",
            "gate.margin": str(rc.margin),
            "gate.floor": str(rc.floor),
            "gate.test_images": str(len(test)),
            "gate.test_digest": manifest_digest(test),
            "gate.lock": lock,
            "skin_twin.run_id": record["run_id"],
        }
        for k, val in tags.items():
            client.set_model_version_tag(name, v, k, val)
        client.update_model_version(
            name,
            v,
            description=(
                f"Gate: {decision}. {reason}. Challenger v{v} balanced accuracy {_fmt(challenger_ba)}; "
                f"champion {'v' + champ_v if champ_v else '(none)'} {_fmt(champion_ba)}; "
                f"same test split of {len(test)} images (digest {tags['gate.test_digest'][:12]}); "
                f"margin {rc.margin}, floor {rc.floor}. Run {record['run_id']}."
            ),
        )
        if promote:
            client.set_registered_model_alias(name, CHAMPION, v)
            if champ_v is not None:  # the previous champion's record says who replaced it
                client.set_model_version_tag(name, champ_v, "gate.superseded_by", v)
    except BaseException:
        if version is not None:
            try:
                client.set_model_version_tag(name, str(version.version), "gate.decision", "error")
            except Exception:  # noqa: BLE001 - best effort
                pass
        try:
            restore_aliases(client, name, before)
        except Exception as exc:  # noqa: BLE001 - report, keep the original error
            log.error("could not restore the aliases of %s to %s: %s", name, before, exc)
        raise

    after = get_aliases(client, name)
    return {
        "model_name": name,
        "version": v,
        "promoted": promote,
        "decision": decision,
        "reason": reason,
        "challenger_balanced_accuracy": challenger_ba,
        "champion_balanced_accuracy": champion_ba,
        "previous_champion_version": champ_v,
        "champion_version": after.get(CHAMPION),
        "aliases": after,
        "lock": lock,
    }


def _data_summary(cfg: Config, layout: Layout) -> dict[str, Any]:
    df, _ = split_manifest(layout)
    counts = {
        split: {c: int(n) for c, n in part["label"].astype(str).value_counts().sort_index().items()}
        for split, part in df.groupby(df["split"].astype(str))
    }
    spec = SOURCES.get(cfg.data.source)
    return {"source": cfg.data.source, "root": str(data_root(cfg)), "synthetic": bool(spec and spec.generated),
            "counts": counts}  # fmt: skip


def publish_card(client: Any, cfg: Config, record: dict[str, Any], layout: Layout, summary: dict[str, Any]) -> str:
    """The model card of the new version: run artifact ``model_card.md``, the version's description
    (what the registry page shows), and -- with the gate decision -- the rewritten run report. Both
    files' digests go to ``lineage/gate_artifacts.json`` (``lineage --verify`` checks them)."""
    run_id, name, version = record["run_id"], summary["model_name"], summary["version"]
    tags = dict(client.get_run(run_id).data.tags)
    card = model_card(
        name=name,
        version=version,
        run_id=run_id,
        metrics=read_json_object(layout.metrics),
        export=read_json_object(layout.export_dir / "config.json"),
        data=_data_summary(cfg, layout),
        gate={**summary, "margin": cfg.registry.margin, "floor": cfg.registry.floor,
              "champion_version": summary.get("previous_champion_version") or "none"},  # fmt: skip
        lineage={
            "commit": tags.get(f"{TAG}git_commit"),
            "params_digest": tags.get(f"{TAG}params_digest"),
            "data_digests": {s: tags[f"{TAG}data_digest.{s}"] for s in ("train", "val", "test")
                             if f"{TAG}data_digest.{s}" in tags},  # fmt: skip
        },
    )
    card_path = layout.reports_dir / "model_card.md"
    write_text(card_path, card)
    report_path = layout.reports_dir / "run_report.html"
    write_text(report_path, render_run_report(layout, run_id, tags, gate=summary, card=card))
    client.log_artifact(run_id, str(card_path))
    client.log_artifact(run_id, str(report_path))
    index = {card_path.name: file_sha256(card_path), report_path.name: file_sha256(report_path)}
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / Path(GATE_INDEX).name
        target.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        client.log_artifact(run_id, str(target), str(Path(GATE_INDEX).parent))
        client.set_tag(run_id, f"{TAG}gate_artifacts_digest", file_sha256(target))
    link = f"runs:/{run_id}/{card_path.name}"
    client.update_model_version(name, version, description=description(card, link))
    client.set_model_version_tag(name, version, f"{TAG}model_card", link)
    return link
