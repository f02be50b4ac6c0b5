"""The MLflow model registry: resolve ``models:/`` URIs, read and restore aliases, download versions.

:func:`download_model` resolves ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` to a local export
folder (cached per version under ``<work_dir>/models/registry``), used by ``predict --model`` and the
registry gate; every file of it is checked against the version's file manifest first
(:mod:`pipeline.io.model_files`). :func:`load_pyfunc` is the safe ``mlflow.pyfunc.load_model`` of a
version: the check comes before MLflow imports the code bundle. Aliases, not stages: ``challenger`` is the newest registered version, ``champion``
the one the gate promoted.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.errors import DataError, PipelineError
from pipeline.io import model_files
from pipeline.io.files import atomic_dir
from pipeline.io.mlflow_service import client_for, redact, resolve_tracking_uri
from pipeline.io.pyfunc import export_dir_of
from pipeline.layout import Layout

CHAMPION = "champion"
CHALLENGER = "challenger"
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` -> (NAME, ALIAS, None); ``models:/NAME/VERSION`` -> (NAME, None, VERSION)."""
    m = _URI.match(str(uri).strip())
    if not m:
        raise PipelineError(f"{uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    return m["name"], m["alias"], m["version"]



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


def cache_root(cfg: Config) -> Path:
    return Layout.from_config(cfg).work_dir / "models" / "registry"


def record_model_files(client: Any, run_id: str, model_uri: str) -> str:
    """Download the logged model ``model_uri`` as it was uploaded, hash every file of it, log the
    manifest as the run artifact ``lineage/model_files.json`` and its sha256 as the run tag
    ``skin_twin.model_files_digest``; returns that digest (the version tag the gate sets)."""
    import mlflow.artifacts

    with tempfile.TemporaryDirectory() as tmp:
        folder = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(Path(tmp) / "model"))
        text = model_files.to_json(model_files.hash_tree(folder))
        index = Path(tmp) / Path(model_files.MANIFEST_ARTIFACT).name
        index.write_text(text, encoding="utf-8")
        client.log_artifact(run_id, str(index), str(Path(model_files.MANIFEST_ARTIFACT).parent))
    digest = model_files.digest_of(text)
    client.set_tag(run_id, model_files.DIGEST_TAG, digest)
    return digest


def expected_files(client: Any, version: Any) -> dict[str, str]:
    """The registry's manifest of a model version (:mod:`pipeline.io.model_files`): the run artifact
    ``lineage/model_files.json``, whose sha256 must be the version tag (and the run tag; either when
    only one is set). :class:`DataError` when none is recorded, the two disagree or the manifest was
    changed or is not valid JSON."""
    from mlflow.exceptions import MlflowException

    where = f"models:/{version.name}/{version.version}"
    vtag = (version.tags or {}).get(model_files.DIGEST_TAG)
    rtag = client.get_run(version.run_id).data.tags.get(model_files.DIGEST_TAG) if version.run_id else None
    if vtag and rtag and vtag != rtag:
        raise DataError(f"{where}: model file manifest digest of the version tag ({vtag[:16]}) and of its run "
                        f"({rtag[:16]}) differ; refusing to load it")  # fmt: skip
    digest = vtag or rtag
    if not digest or not version.run_id:
        raise DataError(f"{where}: no model file manifest recorded (tag {model_files.DIGEST_TAG}); refusing to "
                        "load a model whose files cannot be checked (track and register it again)")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(client.download_artifacts(version.run_id, model_files.MANIFEST_ARTIFACT, tmp))
            data = local.read_bytes()
        except (MlflowException, OSError) as exc:
            raise DataError(f"{where}: {model_files.MANIFEST_ARTIFACT} of run {version.run_id} cannot be read "
                            f"({type(exc).__name__}); refusing to load it") from None  # fmt: skip
    actual = model_files.digest_of(data)
    if actual != digest:
        raise DataError(f"{where}: {model_files.MANIFEST_ARTIFACT} has sha256 {actual[:16]}, the tag records "
                        f"{digest[:16]}: the manifest was changed; refusing to load the model")  # fmt: skip
    return model_files.parse(data, f"{where}: {model_files.MANIFEST_ARTIFACT}")


def download_version(client: Any, version: Any, cfg: Config) -> Path:
    """Local export folder of a model version (downloaded once per version and store), checked file
    by file against the registry's manifest (:func:`expected_files`) on every call, cached or not,
    before anything in it is loaded: a changed, missing or added file raises :class:`DataError`
    naming it (and the cached copy is dropped, so the next call downloads again)."""
    root = download_root(client, version, cfg)
    return export_dir_of(root)


def download_root(client: Any, version: Any, cfg: Config) -> Path:
    """The verified MLflow model folder of a version (see :func:`download_version`)."""
    import mlflow.artifacts

    key = hashlib.sha256(
        f"{redact(resolve_tracking_uri(cfg))}\0{version.source}\0{getattr(version, 'model_id', '')}".encode()
    ).hexdigest()[:12]
    target = cache_root(cfg) / version.name / f"v{version.version}-{key}"
    expected = expected_files(client, version)
    try:
        export_dir_of(target)
    except FileNotFoundError:
        with atomic_dir(target) as tmp:
            mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{version.name}/{version.version}", dst_path=str(tmp))
            try:
                export_dir_of(tmp)
            except FileNotFoundError as exc:
                raise PipelineError(f"models:/{version.name}/{version.version}: {exc}") from None
    try:
        model_files.require_match(target, expected, f"models:/{version.name}/{version.version}")
    except DataError:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return target


def download_model(uri: str, cfg: Config) -> Path:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> local exported-model folder (verified)."""
    client = client_for(cfg, create=False)
    return download_version(client, resolve_version(client, uri), cfg)


def load_pyfunc(uri: str, cfg: Config) -> Any:
    """``mlflow.pyfunc.load_model`` of a registered version, after its folder passed the file check of
    :func:`download_version`: MLflow puts the bundle's ``code/`` first on ``sys.path`` and imports the
    loader module from it, so nothing of a changed bundle is imported. Bytecode is not written into
    the verified folder (a ``__pycache__`` there would count as an added file next time)."""
    import sys

    import mlflow.pyfunc

    client = client_for(cfg, create=False)
    root = download_root(client, resolve_version(client, uri), cfg)
    before = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    try:
        return mlflow.pyfunc.load_model(str(root))
    finally:
        sys.dont_write_bytecode = before


def find_or_register(client: Any, name: str, record: dict[str, Any]) -> Any:
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
