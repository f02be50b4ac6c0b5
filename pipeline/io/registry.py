"""The MLflow model registry: resolve ``models:/`` URIs, read and restore aliases, download versions.

:func:`download_model` resolves ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` to a local export
folder (cached per version under ``<work_dir>/models/registry``), used by ``predict --model`` and the
registry gate. Aliases, not stages: ``challenger`` is the newest registered version, ``champion``
the one the gate promoted.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.errors import PipelineError
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


def download_version(client: Any, version: Any, cfg: Config) -> Path:
    """Local export folder of a model version (downloaded once per version and store)."""
    import mlflow.artifacts

    key = hashlib.sha256(
        f"{redact(resolve_tracking_uri(cfg))}\0{version.source}\0{getattr(version, 'model_id', '')}".encode()
    ).hexdigest()[:12]
    target = cache_root(cfg) / version.name / f"v{version.version}-{key}"
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
    client = client_for(cfg, create=False)
    return download_version(client, resolve_version(client, uri), cfg)


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
