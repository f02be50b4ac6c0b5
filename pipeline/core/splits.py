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
* **Source-held-out mode** (``data.split.holdout_sources``, e.g. ``[vidir_modern]``): every image
  of the listed acquisition sites (manifest column ``source_site``) goes to **test** -- whole
  sources held out, so the test score says how the model does on a clinic/device it never saw.
  A lesion with images from a held-out site *and* another site goes to test entirely (grouping
  wins; no lesion straddles train and test). The remaining images are split lesion-grouped and
  stratified into train/val exactly as above, with the fractions **renormalised** to
  ``train / (train + val)`` and ``val / (train + val)`` (``test`` is ignored): the held-out
  sources are the test set, and the in-source images keep the configured train:val ratio rather
  than losing a further random test share. A class with at least ``min_groups_for_holdout``
  groups left gets at least one group in val (its first shuffled group); fewer go to train. An
  unknown site name is a :class:`~pipeline.errors.DataError` naming it and the sites the data
  has; holding out every site is one too. With an empty list (the default) the assignment is
  exactly the random split above, bit for bit.
* **Near-duplicate pictures split together** (``data.split.group_near_duplicates``):
  :func:`near_duplicate_groups` merges the lesion groups of pictures whose perceptual hashes are
  at most ``validate.near_duplicate_distance`` bits apart -- the same photo stored under two ids,
  re-encoded or re-coloured (the ISIC archive holds such pairs with different lesion ids) -- and
  the split then groups by the merged key. The manifest keeps each image's own ``group_id``; the
  validate stage's near-duplicate check uses the same hash and distance, so it holds by
  construction. Data without such pictures (HAM10000: distinct lesions are at least 19 bits apart)
  gets exactly the split it got before, bit for bit.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np

from pipeline.config import SplitConfig
from pipeline.core.imaging import hash_words, near_pairs
from pipeline.core.schema import SPLITS
from pipeline.errors import DataError


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
    group_sizes: dict[str, int], fractions: SplitConfig, rng: np.random.Generator, with_test: bool = True
) -> dict[str, str]:
    """Assign the groups of ONE class to splits (see module docstring). Returns group -> split.

    ``with_test=False`` (source-held-out mode): train/val only, fractions renormalised."""
    ordered = sorted(group_sizes)
    if len(ordered) < fractions.min_groups_for_holdout:
        return {g: "train" for g in ordered}
    order = [ordered[i] for i in rng.permutation(len(ordered))]
    if with_test:
        targets = np.array([fractions.train, fractions.val, fractions.test], dtype=np.float64)
    else:
        kept = fractions.train + fractions.val
        targets = np.array([fractions.train / kept, fractions.val / kept, 0.0], dtype=np.float64)
    seeded = 2 if with_test else 1
    assigned = np.zeros(3, dtype=np.float64)
    out: dict[str, str] = {}
    for i, g in enumerate(order):
        size = group_sizes[g]
        if i < seeded:
            k = 1 + i  # seed val, then test
        else:
            deficit = targets * (assigned.sum() + size) - assigned
            k = int(np.argmax(deficit))  # ties -> train first
        assigned[k] += size
        out[g] = SPLITS[k]
    return out


def held_out_groups(groups: Sequence[str], sites: Sequence[str], holdout: Sequence[str]) -> set[str]:
    """The groups with at least one image from a held-out site; :class:`DataError` for a site name
    the data does not have, or when every group would be held out."""
    known = set(sites)
    unknown = [s for s in holdout if s not in known]
    if unknown:
        raise DataError(
            f"data.split.holdout_sources: unknown source site(s) {unknown}; the data has {sorted(known)}"
        )
    held = {g for g, s in zip(groups, sites, strict=True) if s in set(holdout)}
    if held and held == set(groups):
        raise DataError(
            f"data.split.holdout_sources: {list(holdout)} hold out every image (sites in the data: "
            f"{sorted(known)}); nothing is left to train on"
        )
    return held


def near_duplicate_groups(
    groups: Sequence[str] | np.ndarray, hashes: Sequence[str | None], max_distance: int
) -> list[str]:
    """Per row, the key its split follows: its group, or, where a picture of the group has a
    near-duplicate in another group (perceptual hashes at most ``max_distance`` bits apart), the
    smallest group id of all groups so linked (transitively). Rows without a hash (unreadable
    images) link nothing; ``max_distance < 0`` returns the groups unchanged."""
    grps = [str(g) for g in groups]
    if len(hashes) != len(grps):
        raise ValueError(f"hashes ({len(hashes)}) and groups ({len(grps)}) differ in length")
    if max_distance < 0:
        return grps
    rows = [i for i, h in enumerate(hashes) if h]
    parent: dict[str, str] = {}

    def root(g: str) -> str:
        while parent.get(g, g) != g:
            parent[g] = parent.get(parent[g], parent[g])  # path halving
            g = parent[g]
        return g

    for a, b in near_pairs(hash_words([str(hashes[i]) for i in rows]), max_distance):
        ra, rb = root(grps[rows[a]]), root(grps[rows[b]])
        if ra != rb:
            lo, hi = sorted((ra, rb))
            parent[hi] = lo
    return [root(g) for g in grps]


def assign_splits(
    labels: Sequence[str] | np.ndarray,
    groups: Sequence[str] | np.ndarray,
    fractions: SplitConfig,
    seed: int,
    sites: Sequence[str] | np.ndarray | None = None,
) -> np.ndarray:
    """One split name (``train``/``val``/``test``) per row, aligned with ``labels``/``groups``.

    ``labels``, ``groups`` and ``sites`` (the rows' ``source_site``; needed only when
    ``fractions.holdout_sources`` is set) are converted to ``str``. Raises ``ValueError`` if their
    lengths differ or sites are needed and missing; :class:`DataError` for unknown held-out sites.
    """
    labs = [str(x) for x in labels]
    grps = [str(x) for x in groups]
    if len(labs) != len(grps):
        raise ValueError(f"labels ({len(labs)}) and groups ({len(grps)}) differ in length")
    if fractions.holdout_sources:
        if sites is None:
            raise ValueError("data.split.holdout_sources needs each row's source site")
        site_list = [str(x) for x in sites]
        if len(site_list) != len(grps):
            raise ValueError(f"sites ({len(site_list)}) and groups ({len(grps)}) differ in length")
        return _assign_holdout(labs, grps, site_list, fractions, seed)
    group_label = _group_labels(labs, grps)
    sizes = Counter(grps)
    by_class: dict[str, dict[str, int]] = defaultdict(dict)
    for g, lab in group_label.items():
        by_class[lab][g] = sizes[g]
    group_split: dict[str, str] = {}
    for lab in sorted(by_class):
        group_split.update(split_groups(by_class[lab], fractions, _rng_for(seed, lab)))
    return np.array([group_split[g] for g in grps], dtype="<U5")


def _assign_holdout(
    labs: list[str], grps: list[str], sites: list[str], fractions: SplitConfig, seed: int
) -> np.ndarray:
    """Source-held-out mode (module docstring): held-out groups -> test, the rest train/val."""
    held = held_out_groups(grps, sites, fractions.holdout_sources)
    rest = [(lab, g) for lab, g in zip(labs, grps, strict=True) if g not in held]
    group_label = _group_labels([r[0] for r in rest], [r[1] for r in rest])
    sizes = Counter(r[1] for r in rest)
    by_class: dict[str, dict[str, int]] = defaultdict(dict)
    for g, lab in group_label.items():
        by_class[lab][g] = sizes[g]
    group_split: dict[str, str] = dict.fromkeys(held, "test")
    for lab in sorted(by_class):
        group_split.update(split_groups(by_class[lab], fractions, _rng_for(seed, lab), with_test=False))
    return np.array([group_split[g] for g in grps], dtype="<U5")
