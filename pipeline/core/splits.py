"""Train/val/test assignment: stratified by label, grouped by lesion, seeded.

:func:`assign_splits` is a pure function of (labels, groups, fractions, seed). Design choices:

* **Grouped.** All images of one ``group_id`` (one lesion) land in the same split, so a lesion
  photographed several times never leaks between train and test.
* **Stratified per class.** Each group is stratified by its label (the most frequent label of
  its rows; ties go to the alphabetically first label, so the choice does not depend on order).
  Within a class, groups are split separately, so every class keeps about the configured
  fractions.
* **Fractions of images, not of groups.** Groups are walked in a seeded random order; each goes
  to the split whose image count lies furthest below its target share (greedy largest deficit).
  With groups of different sizes the per-class image fractions stay within one group of target.
* **Small classes.** A class with at least ``data.split.min_groups_for_holdout`` (default 3)
  groups gets at least one group in val and one in test (its first two shuffled groups seed val
  and test, the rest follow the deficit rule, which gives train the next one). A class with fewer
  groups goes entirely to train: one or two
  lesions are worth more as training signal than as an unreliable val/test estimate, and the
  validate stage's ``min_train_per_class`` check keeps working for them.
* **Deterministic and order-invariant.** Groups are sorted by id before a per-class shuffle whose
  RNG is derived from ``(seed, label)`` by a stable hash, so the same input rows in any order give
  the same assignment, and adding a class does not reshuffle the others.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np

from pipeline.config import SplitConfig
from pipeline.core.schema import SPLITS


def _rng_for(seed: int, label: str) -> np.random.Generator:
    digest = hashlib.sha256(f"skin-twin/splits/{seed}/{label}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _group_labels(labels: Sequence[str], groups: Sequence[str]) -> dict[str, str]:
    """group -> its most frequent label (ties: alphabetically first)."""
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for lab, grp in zip(labels, groups, strict=True):
        counts[grp][lab] += 1
    return {g: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for g, c in counts.items()}


def split_groups(
    group_sizes: dict[str, int], fractions: SplitConfig, rng: np.random.Generator
) -> dict[str, str]:
    """Assign the groups of ONE class to splits (see module docstring). Returns group -> split."""
    ordered = sorted(group_sizes)
    if len(ordered) < fractions.min_groups_for_holdout:
        return {g: "train" for g in ordered}
    order = [ordered[i] for i in rng.permutation(len(ordered))]
    targets = np.array([fractions.train, fractions.val, fractions.test], dtype=np.float64)
    assigned = np.zeros(3, dtype=np.float64)
    out: dict[str, str] = {}
    for i, g in enumerate(order):
        size = group_sizes[g]
        if i < 2:
            k = 1 + i  # seed val, then test
        else:
            deficit = targets * (assigned.sum() + size) - assigned
            k = int(np.argmax(deficit))  # ties -> train first
        assigned[k] += size
        out[g] = SPLITS[k]
    return out


def assign_splits(
    labels: Sequence[str] | np.ndarray,
    groups: Sequence[str] | np.ndarray,
    fractions: SplitConfig,
    seed: int,
) -> np.ndarray:
    """One split name (``train``/``val``/``test``) per row, aligned with ``labels``/``groups``.

    ``labels`` and ``groups`` are converted to ``str``. Raises ``ValueError`` if their lengths
    differ.
    """
    labs = [str(x) for x in labels]
    grps = [str(x) for x in groups]
    if len(labs) != len(grps):
        raise ValueError(f"labels ({len(labs)}) and groups ({len(grps)}) differ in length")
    group_label = _group_labels(labs, grps)
    sizes = Counter(grps)
    by_class: dict[str, dict[str, int]] = defaultdict(dict)
    for g, lab in group_label.items():
        by_class[lab][g] = sizes[g]
    group_split: dict[str, str] = {}
    for lab in sorted(by_class):
        group_split.update(split_groups(by_class[lab], fractions, _rng_for(seed, lab)))
    return np.array([group_split[g] for g in grps], dtype="<U5")
