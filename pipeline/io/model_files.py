"""The file manifest of a logged MLflow model: the sha256 of every file, checked before any is used.

Two manifests, both ``{"relative/path": "sha256", ...}`` JSON:

* the **registry's**, run artifact ``lineage/model_files.json`` (:data:`MANIFEST_ARTIFACT`): every
  file of the logged model as it was uploaded -- ``MLmodel``, the code bundle ``code/pipeline/**``,
  ``data/export/*`` (weights, ``config.json``, ``model.ts``, ``serving.json``), ``pytorch/model.pt2``,
  ``requirements.txt``, ``conda.yaml``, ``python_env.yaml``, the input example, and the embedded
  manifest below. Its own sha256 is the run tag and the model-version tag
  ``skin_twin.model_files_digest`` (:data:`DIGEST_TAG`). ``predict --model models:/...``, the
  registry gate and :func:`pipeline.io.registry.load_pyfunc` check a downloaded version against it
  before anything in it is loaded; ``lineage --verify`` reports it file by file.
* the **embedded** one, ``skin_twin_files.json`` (:data:`EMBEDDED`) inside the model folder: the
  files below ``code/``, ``data/`` and ``pytorch/`` as :func:`pipeline.io.pyfunc.save_model` wrote
  them. The pyfunc loader checks its own folder against it (a serving host that loads the model
  directly, with no registry at hand).

Standard library only (plus the project's errors and digests): this module travels in the bundle.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from pipeline.errors import DataError
from pipeline.io.digests import file_sha256

MANIFEST_ARTIFACT = "lineage/model_files.json"  # run artifact: every file of the logged model -> sha256
DIGEST_TAG = "skin_twin.model_files_digest"  # run tag and model-version tag: sha256 of that artifact
EMBEDDED = "skin_twin_files.json"  # inside the model folder: what the loader checks itself against
EMBEDDED_DIRS = ("code", "data", "pytorch")  # what the embedded manifest covers
# written by the MLflow client into a folder it downloads from models:/NAME/VERSION (name and
# version, never read to load the model): not a file of the logged model
CLIENT_FILES = frozenset({"registered_model_meta"})


def hash_tree(folder: str | Path, under: Iterable[str] | None = None) -> dict[str, str]:
    """``relative/posix/path -> sha256`` of every regular file below ``folder`` (hidden ones and
    ``__pycache__`` included: a planted ``.pyc`` is a file like any other; MLflow's client-side
    ``registered_model_meta`` left out); ``under`` limits it to those top-level folders. Symbolic
    links are listed as files whose target is hashed."""
    root = Path(folder)
    tops = [root / d for d in under] if under is not None else [root]
    out: dict[str, str] = {}
    for top in tops:
        if not top.is_dir():
            continue
        for f in sorted(top.rglob("*")):
            rel = f.relative_to(root).as_posix()
            if f.is_file() and rel not in CLIENT_FILES:
                out[rel] = file_sha256(f) or ""
    return out


def to_json(manifest: Mapping[str, str]) -> str:
    """The manifest's canonical text (sorted keys), what is written and hashed."""
    return json.dumps(dict(manifest), indent=2, sort_keys=True) + "\n"


def digest_of(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


def parse(text: str | bytes, where: str) -> dict[str, str]:
    """A manifest from its JSON text; :class:`DataError` naming ``where`` when it is not one."""
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{where}: not valid JSON ({exc}); damaged or tampered with") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise DataError(f"{where}: not a file index (expected a JSON object of path -> sha256)")
    return data


def differences(expected: Mapping[str, str], actual: Mapping[str, str]) -> list[tuple[str, str]]:
    """``(path, what)`` for every file changed, missing or added (sorted by path)."""
    out = []
    for rel in sorted(set(expected) | set(actual)):
        if rel not in actual:
            out.append((rel, "missing"))
        elif rel not in expected:
            out.append((rel, "added (not in the manifest)"))
        elif actual[rel] != expected[rel]:
            out.append((rel, f"changed (sha256 {actual[rel][:16]}, manifest {expected[rel][:16]})"))
    return out


def require_match(folder: str | Path, expected: Mapping[str, str], what: str,
                  under: Iterable[str] | None = None) -> None:  # fmt: skip
    """Raise :class:`DataError` naming every file of ``folder`` that differs from ``expected``."""
    _refuse_differences(differences(expected, hash_tree(folder, under)), what, "the model file manifest")


def _refuse_differences(diff: list[tuple[str, str]], what: str, against: str) -> None:
    """:class:`DataError` listing up to ten differing files, when there are any."""
    if diff:
        listed = "; ".join(f"{rel}: {why}" for rel, why in diff[:10]) + (f"; ... {len(diff) - 10} more" if len(diff) > 10 else "")
        raise DataError(f"{what}: {len(diff)} file(s) differ from {against}, refusing to load it: {listed}")


def write_embedded(model_dir: str | Path) -> dict[str, str]:
    """Write :data:`EMBEDDED` for the files below :data:`EMBEDDED_DIRS` of ``model_dir``."""
    manifest = hash_tree(model_dir, EMBEDDED_DIRS)
    (Path(model_dir) / EMBEDDED).write_text(to_json(manifest), encoding="utf-8")
    return manifest


def verify_embedded(model_dir: str | Path) -> None:
    """Check ``model_dir`` against its own :data:`EMBEDDED` (:class:`DataError` naming each file).
    ``__pycache__`` folders Python wrote when it imported the bundle are left out here; the registry
    check (:func:`pipeline.io.registry.download_version`) counts them."""
    path = Path(model_dir) / EMBEDDED
    if not path.is_file():
        raise DataError(f"{model_dir}: no {EMBEDDED} (a skin-twin model logged without its file manifest); refusing to load it")
    expected = parse(path.read_bytes(), str(path))
    actual = {k: v for k, v in hash_tree(model_dir, EMBEDDED_DIRS).items() if "/__pycache__/" not in f"/{k}"}
    _refuse_differences(differences(expected, actual), str(model_dir), EMBEDDED)
