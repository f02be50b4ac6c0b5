"""``lineage --verify``: re-compute what can be re-computed from what MLflow holds, and compare.

Every check downloads what it needs from the tracking store (the run's artifacts, the registered
model version) -- nothing is taken from the local run folder, which an auditor may not have:

* **artifact index** -- ``lineage/artifacts.json`` (written by ``track``) has the sha256 recorded
  in the tag ``skin_twin.artifacts_digest``, and every file it lists still has its recorded sha256;
  the same for ``lineage/gate_artifacts.json`` (model card, final run report; written by
  ``register``; tag ``skin_twin.gate_artifacts_digest``);
* **manifests** -- per split, the logged manifest's bytes have the tag's sha256, its rows give the
  tag's content digest (:func:`pipeline.core.lineage.content_digest`), and the MLflow dataset of
  the run is that manifest (its digest covers content and source);
* **ingest / validation / pairs** -- the logged ingest summary (near-duplicate joins of the split;
  runs tracked before it existed have neither the file nor its tag), validation result and pair
  summary have the digests of their tags;
* **model files** -- every file of the registered model (``MLmodel``, code bundle, export,
  ``pytorch/model.pt2``, requirements and environment files, input example) against
  ``lineage/model_files.json``, whose sha256 is the run tag and the version tag
  ``skin_twin.model_files_digest`` (:mod:`pipeline.io.model_files`): a FAIL line for each file
  changed, missing or added;
* **model** -- the registered version's weights have the sha256 its ``config.json`` records, which is
  the sha256 the run tagged at tracking time (the registry serves what was trained).

A file that should be JSON and is not (a tampered index, manifest or ``config.json``) is a FAIL
line, never a crash.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.core.lineage import ARTIFACT_INDEX, GATE_INDEX, MANIFESTS, SPLIT_CONTEXT, TAG, content_digest
from pipeline.errors import DataError, PipelineError
from pipeline.io import model_files
from pipeline.io.digests import file_sha256
from pipeline.io.provenance import dataset_digest


def _check(name: str, ok: bool, detail: str) -> dict[str, Any]:
    return {"check": name, "ok": bool(ok), "detail": detail}


def _short(h: str | None) -> str:
    return (h or "none")[:16]


def _index(root: Path, index_path: str, expected: str | None, label: str) -> list[dict[str, Any]]:
    path = root / index_path
    if expected is None and not path.is_file():
        return []
    if not path.is_file():
        return [_check(label, False, f"{index_path} is missing from the run's artifacts")]
    actual = file_sha256(path)
    out = [_check(label, actual == expected, f"{index_path} sha256 {_short(actual)} vs tag {_short(expected)}")]
    try:
        index = model_files.parse(path.read_bytes(), index_path)  # same shape: path -> sha256
    except DataError as exc:
        return [*out, _check(f"{label} content", False, str(exc))]
    for rel, recorded in sorted(index.items()):
        now = file_sha256(root / rel)
        detail = "missing" if now is None else f"sha256 {_short(now)} vs recorded {_short(recorded)}"
        out.append(_check(f"artifact {rel}", now == recorded, detail))
    return out


def _model_files(root: Path, model_dir: Path, version: Any, tags: dict[str, str]) -> list[dict[str, Any]]:
    """Every file of the registered model against ``lineage/model_files.json``, whose sha256 is the
    run tag and the version tag ``skin_twin.model_files_digest``: one FAIL line per file changed,
    missing or added; one line for all that match."""
    rel = model_files.MANIFEST_ARTIFACT
    vtag = (version.tags or {}).get(model_files.DIGEST_TAG)
    rtag = tags.get(model_files.DIGEST_TAG)
    path = root / rel
    if not path.is_file():
        return [_check("model file manifest", False, f"{rel} is missing from the run's artifacts "
                       f"(version tag {_short(vtag)}, run tag {_short(rtag)})")]  # fmt: skip
    actual = file_sha256(path)
    out = [_check("model file manifest", actual is not None and actual == vtag == rtag,
                  f"{rel} sha256 {_short(actual)} vs version tag {_short(vtag)}, run tag {_short(rtag)}")]  # fmt: skip
    try:
        expected = model_files.parse(path.read_bytes(), rel)
    except DataError as exc:
        return [*out, _check("model file manifest content", False, str(exc))]
    diff = model_files.differences(expected, model_files.hash_tree(model_dir))
    out += [_check(f"model file {name}", False, why) for name, why in diff]
    if not diff:
        out.append(_check("model files", True, f"all {len(expected)} files of the registered model match {rel}"))
    return out


def verify(client: Any, version: Any, run: Any, chain: dict[str, Any], workdir: Path) -> list[dict[str, Any]]:
    """Every check (see the module docstring) as ``{"check", "ok", "detail"}``."""
    import mlflow.artifacts

    tags = dict(run.data.tags)
    root = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(workdir / "run")))
    checks = _index(root, ARTIFACT_INDEX, tags.get(f"{TAG}artifacts_digest"), "artifact index")
    checks += _index(root, GATE_INDEX, tags.get(f"{TAG}gate_artifacts_digest"), "gate artifact index")

    for split in SPLIT_CONTEXT:
        entry = chain["data"].get(split) or {}
        csv = root / MANIFESTS / f"{split}.csv"
        if not csv.is_file():
            checks.append(_check(f"manifest {split}", False, f"{MANIFESTS}/{split}.csv is missing"))
            continue
        sha = file_sha256(csv)
        try:
            content = content_digest(pd.read_csv(csv, dtype=str, keep_default_na=False))
        except (ValueError, UnicodeDecodeError, PipelineError) as exc:  # a tampered file: a FAIL line, not a crash
            content = f"unreadable ({' '.join(str(exc).split())[:120]})"
        expected = entry.get("tag_digest")
        checks.append(_check(f"manifest {split} file", sha == entry.get("manifest_sha256"),
                             f"sha256 {_short(sha)} vs tag {_short(entry.get('manifest_sha256'))}"))  # fmt: skip
        checks.append(_check(f"manifest {split} content", content == expected,
                             f"content digest {content if content.startswith('unreadable') else _short(content)} vs tag {_short(expected)}"))  # fmt: skip
        source = entry.get("source")
        own = bool(source) and f"{MANIFESTS}/{split}.csv" in str(source) and run.info.run_id in str(source)
        want = dataset_digest(expected or "", source or "")
        checks.append(_check(f"dataset {split}", own and entry.get("digest") == want,
                             f"source {source} (this run's manifest: {own}), digest {entry.get('digest')}"))  # fmt: skip

    recorded_files = [("validation/result.json", "validation.digest"), ("pairs/pairs_summary.json", "pairs.summary_digest")]
    if f"{TAG}ingest.summary_digest" in tags or (root / "data" / "ingest_summary.json").is_file():
        recorded_files.append(("data/ingest_summary.json", "ingest.summary_digest"))  # runs tracked before it had none
    for rel, key in recorded_files:
        now, tag = file_sha256(root / rel), tags.get(f"{TAG}{key}")
        checks.append(_check(f"artifact {rel} vs tag", now == tag, f"sha256 {_short(now)} vs tag {_short(tag)}"))

    model_dir = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{version.name}/{version.version}", dst_path=str(workdir / "model")))  # fmt: skip
    checks += _model_files(root, model_dir, version, tags)
    config = model_dir / "data" / "export" / "config.json"
    weights = model_dir / "data" / "export" / "weights.pt"
    try:
        meta = json.loads(config.read_bytes()) if config.is_file() else {}
    except (ValueError, UnicodeDecodeError) as exc:
        checks.append(_check("registered config.json", False, f"data/export/config.json is not valid JSON ({exc})"))
        meta = {}
    recorded = meta.get("weights_sha256") if isinstance(meta, dict) else None
    served = file_sha256(weights)
    tracked = tags.get(f"{TAG}export.weights_sha256")
    checks.append(_check("registered weights", served is not None and served == recorded == tracked,
                         f"served {_short(served)}, config.json {_short(recorded)}, run tag {_short(tracked)}"))  # fmt: skip
    return checks
