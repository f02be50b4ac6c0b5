"""The champion/challenger promotion rule (pure) and the digest of the manifest both are scored on."""

from __future__ import annotations

import hashlib
import math

import pandas as pd


def gate_decision(challenger_ba: float | None, champion_ba: float | None, margin: float, floor: float) -> tuple[bool, str]:
    """Promote the challenger? ``(promote, reason)``.

    Promote only when the challenger's balanced accuracy is at least ``floor`` and, when there is
    a champion, at least ``champion_ba + margin``: with margin 0 a challenger that equals the
    champion is promoted (the newer model, trained on the newer data, serves) and the reason says so.
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
        how = f"beats champion {float(champion_ba):.4f} by {gain:+.4f}" if gain > 1e-12 else f"equals champion {c:.4f}"
        return True, f"challenger {c:.4f} {how} (margin {margin:.4f})"
    return False, f"challenger {c:.4f} does not beat champion {float(champion_ba):.4f} by the margin {margin:.4f} ({gain:+.4f})"


def manifest_digest(df: pd.DataFrame) -> str:
    """sha256 over the sorted (image_id, label, path) rows of a scoring manifest."""
    rows = sorted(zip(df["image_id"].astype(str), df["label"].astype(str), df["path"].astype(str), strict=True))
    h = hashlib.sha256()
    for row in rows:
        h.update(("\t".join(row) + "\n").encode())
    return h.hexdigest()
