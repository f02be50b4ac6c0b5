"""The ``register`` stage: model registry with a champion/challenger gate (aliases, no stages).

:func:`run_register` (after ``track``):

1. Registers the run's LoggedModel (``reports/mlflow.json``) as a new version of
   ``registry.model_name`` (a re-run finds the version it registered before) and points the
   alias ``challenger`` at it.
2. **Gate.** Scores the challenger and the current ``champion`` on the *same* test manifest, this
   run's test split (``data/augmented/manifest.parquet``), with
   :func:`pipeline.evaluate.score_model`; both models are downloaded from the registry, so what
   is scored is exactly what the aliases point at. :func:`gate_decision` promotes the challenger
   (``champion`` moves to it) only when its balanced accuracy beats the champion's by at least
   ``registry.margin`` and reaches ``registry.floor``; with no champion yet, the floor alone decides.
3. Records the decision, reason and both scores as version tags (``gate.*``) and in the version
   description, and under ``registry`` in the tracking record.

A failure anywhere (download, scoring, the registry itself) restores the aliases captured before
the stage began, then re-raises; a newly registered version may remain, tagged
``gate.decision=error``, but no alias points at it.

:func:`download_model` resolves ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` to a local export
folder (cached per version under ``<work_dir>/models/registry``), used by ``predict --model``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.config import Config
from pipeline.errors import DataError, PipelineError
from pipeline.fileio import atomic_dir, write_json
from pipeline.layout import Layout

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")


# --------------------------------------------------------------------------------------------
# pure
# --------------------------------------------------------------------------------------------


def gate_decision(challenger_ba: float | None, champion_ba: float | None, margin: float, floor: float) -> tuple[bool, str]:
    """Promote the challenger? ``(promote, reason)``.

    Promote only when the challenger's balanced accuracy is at least ``floor`` and, when there is
    a champion, at least ``champion_ba + margin``.
    """
    if challenger_ba is None or not math.isfinite(float(challenger_ba)):
        return False, "challenger has no balanced accuracy"
    c = float(challenger_ba)
    if c < floor:
        return False, f"challenger balanced accuracy {c:.4f} is below the floor {floor:.4f}"
    if champion_ba is None or not math.isfinite(float(champion_ba)):
        return True, f"no champion yet; challenger balanced accuracy {c:.4f} clears the floor {floor:.4f}"
    gain = c - float(champion_ba)
    if gain >= margin - 1e-12:
        return True, f"challenger {c:.4f} beats champion {float(champion_ba):.4f} by {gain:+.4f} (margin {margin:.4f})"
    return False, f"challenger {c:.4f} does not beat champion {float(champion_ba):.4f} by the margin {margin:.4f} ({gain:+.4f})"


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` -> (NAME, ALIAS, None); ``models:/NAME/VERSION`` -> (NAME, None, VERSION)."""
    m = _URI.match(str(uri).strip())
    if not m:
        raise PipelineError(f"{uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    return m["name"], m["alias"], m["version"]


def manifest_digest(df: pd.DataFrame) -> str:
    """sha256 over the sorted (image_id, label, path) rows of a scoring manifest."""
    rows = sorted(zip(df["image_id"].astype(str), df["label"].astype(str), df["path"].astype(str), strict=True))
    h = hashlib.sha256()
    for row in rows:
        h.update(("\t".join(row) + "\n").encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# registry access
# --------------------------------------------------------------------------------------------


def resolve_version(client: Any, uri: str) -> Any:
    """The ``ModelVersion`` a ``models:/`` URI names. Raises :class:`PipelineError`."""
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_model_uri(uri)
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except MlflowException as exc:
        raise PipelineError(f"{uri}: not found in the registry ({exc.message})") from None


def get_aliases(client: Any, name: str) -> dict[str, str]:
    """alias -> version of a registered model ({} when it does not exist)."""
    from mlflow.exceptions import MlflowException

    try:
        rm = client.get_registered_model(name)
    except MlflowException:
        return {}
    aliases = rm.aliases or {}
    if isinstance(aliases, dict):
        return {str(k): str(v) for k, v in aliases.items()}
    return {str(a.alias): str(a.version) for a in aliases}


def restore_aliases(client: Any, name: str, before: dict[str, str]) -> None:
    """Make the aliases of ``name`` exactly ``before`` again."""
    now = get_aliases(client, name)
    for alias in now:
        if alias not in before:
            client.delete_registered_model_alias(name, alias)
    for alias, version in before.items():
        if now.get(alias) != version:
            client.set_registered_model_alias(name, alias, version)


def _cache_root(cfg: Config) -> Path:
    return Layout.from_config(cfg).work_dir / "models" / "registry"


def download_version(client: Any, version: Any, cfg: Config) -> Path:
    """Local export folder of a model version (downloaded once per version and store)."""
    import mlflow.artifacts

    from pipeline.pyfunc import export_dir_of
    from pipeline.tracking import redact, resolve_tracking_uri

    key = hashlib.sha256(
        f"{redact(resolve_tracking_uri(cfg))}\0{version.source}\0{getattr(version, 'model_id', '')}".encode()
    ).hexdigest()[:12]
    target = _cache_root(cfg) / version.name / f"v{version.version}-{key}"
    try:
        return export_dir_of(target)
    except FileNotFoundError:
        pass
    with atomic_dir(target) as tmp:
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{version.name}/{version.version}", dst_path=str(tmp))
        try:
            export_dir_of(tmp)
        except FileNotFoundError as exc:
            raise PipelineError(f"models:/{version.name}/{version.version}: {exc}") from None
    return export_dir_of(target)


def download_model(uri: str, cfg: Config) -> Path:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> local exported-model folder."""
    from pipeline.tracking import client_for

    client = client_for(cfg)
    return download_version(client, resolve_version(client, uri), cfg)


def _test_manifest(layout: Layout) -> pd.DataFrame:
    if not layout.augmented_manifest.is_file():
        raise DataError(f"{layout.augmented_manifest}: not found (run the augment stage first)")
    aug = pd.read_parquet(layout.augmented_manifest)
    test = aug[aug["split"].astype(str) == "test"].reset_index(drop=True)
    if test.empty:
        raise DataError(f"{layout.augmented_manifest}: no test images to gate on")
    return test


def score_export(folder: Path, test: pd.DataFrame, layout: Layout, cfg: Config) -> float | None:
    """Balanced accuracy of an export folder on ``test`` (via :func:`pipeline.evaluate.score_model`)."""
    from pipeline import evaluate
    from pipeline.export import load_exported

    metrics, _ = evaluate.score_model(load_exported(folder), test, layout.augmented_dir, cfg)
    ba = metrics.get("balanced_accuracy")
    return None if ba is None or not math.isfinite(float(ba)) else float(ba)


def _find_or_register(client: Any, name: str, record: dict[str, Any]) -> Any:
    """The version of this run's LoggedModel: the one registered before, else a new one."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description="skin-twin dermoscopy classifier (twin CNN, one branch)")
        except MlflowException:  # created concurrently
            client.get_registered_model(name)
    model_id = record.get("model_id")
    for v in client.search_model_versions(f"name='{name}' and run_id='{record['run_id']}'"):
        if getattr(v, "model_id", None) == model_id or v.source == record.get("model_uri"):
            return v
    mv = client.create_model_version(
        name, source=record["model_uri"], run_id=record["run_id"], model_id=model_id,
        tags={"skin_twin.run_id": record["run_id"]},
    )
    return client.get_model_version(name, mv.version)


def run_register(cfg: Config) -> dict[str, Any]:
    """The ``register`` stage. Returns the decision summary."""
    from pipeline.tracking import client_for, read_record

    layout = Layout.from_config(cfg)
    record = read_record(layout)
    if not record.get("run_id") or not record.get("model_uri"):
        raise PipelineError(f"{layout.tracking_record}: no tracked run/model (run the track stage first)")
    from pipeline.tracking import redact, resolve_tracking_uri

    if record.get("tracking_uri") and record["tracking_uri"] != redact(resolve_tracking_uri(cfg)):
        raise PipelineError(
            f"{layout.tracking_record}: the run was tracked in {record['tracking_uri']}, "
            f"not in {redact(resolve_tracking_uri(cfg))} (run track against this store first)"
        )
    rc = cfg.registry
    name = rc.model_name
    client = client_for(cfg)
    before = get_aliases(client, name)
    version = None
    try:
        version = _find_or_register(client, name, record)
        v = str(version.version)
        client.set_registered_model_alias(name, CHALLENGER, v)

        test = _test_manifest(layout)
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
        fmt = lambda x: "none" if x is None else f"{x:.6f}"  # noqa: E731
        tags = {
            "gate.decision": decision,
            "gate.promoted": str(promote).lower(),
            "gate.reason": reason,
            "gate.challenger_balanced_accuracy": fmt(challenger_ba),
            "gate.champion_balanced_accuracy": fmt(champion_ba),
            "gate.champion_version": champ_v or "none",
            "gate.margin": str(rc.margin),
            "gate.floor": str(rc.floor),
            "gate.test_images": str(len(test)),
            "gate.test_digest": manifest_digest(test),
            "skin_twin.run_id": record["run_id"],
        }
        for k, val in tags.items():
            client.set_model_version_tag(name, v, k, val)
        client.update_model_version(
            name,
            v,
            description=(
                f"Gate: {decision}. {reason}. Challenger v{v} balanced accuracy {fmt(challenger_ba)}; "
                f"champion {'v' + champ_v if champ_v else '(none)'} {fmt(champion_ba)}; "
                f"same test split of {len(test)} images (digest {tags['gate.test_digest'][:12]}); "
                f"margin {rc.margin}, floor {rc.floor}. Run {record['run_id']}."
            ),
        )
        if promote:
            client.set_registered_model_alias(name, CHAMPION, v)
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
    summary = {
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
    }
    write_json(layout.tracking_record, {**record, "registry": summary})
    log.info("registered %s v%s: %s (%s)", name, v, decision, reason)
    return summary
