"""Content digests (sha256) of files and folders, shared by lineage tags and Airflow Asset extras.

Standard library only, so the light orchestration layer can import it without pulling in pandas or
torch. A folder's digest is the sha256 over its sorted ``relative/path \\0 file-sha256`` lines;
hidden entries (atomic-write temporaries such as ``.model.ts.XXXX.tmp``) are left out, so a digest
taken while a writer is finishing equals the one taken after.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_BLOCK = 1 << 20


def file_sha256(path: str | Path) -> str | None:
    """sha256 hex digest of a file's bytes; ``None`` when ``path`` is not a file."""
    path = Path(path)
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def path_sha256(path: str | Path) -> str | None:
    """Digest of a file (:func:`file_sha256`) or of a folder tree; ``None`` when nothing is there."""
    path = Path(path)
    if not path.is_dir():
        return file_sha256(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path)
        if any(part.startswith(".") for part in rel.parts):
            continue
        h.update(f"{rel.as_posix()}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()
