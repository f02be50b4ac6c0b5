"""The patent's data generator: positive and negative training pairs (steps 2-5).

Three layers, pure functions first, IO at the edge:

* :func:`patent_partner_indices` -- the permutation X -> X' of *one* batch exactly as the
  patent's steps 2-4 define it (the reference implementation, a plain loop).
* :func:`patent_partner_indices_batched` -- the same permutation applied to consecutive
  batches of a long label array at once, vectorised and O(n) (the hot path).
* :func:`build_pair_manifest` -- per-epoch pair table: shuffle, batch, permute, add the
  patent's step-5 random-batch negatives, handle fixed points, meet ``positive_fraction``.
* :func:`pipeline.stages.pairs.run_pairs` -- the ``pairs`` stage (IO): augmented manifest (train
  split) in, ``data/pairs.parquet`` and ``reports/pairs_summary.json`` out.

Reading of the patent (``docs/method.md``, steps 2-4) implemented here:

1. Walk the batch in order; each element that is *still unmatched* is matched with the first
   *later still-unmatched* element with the same label (greedy; an image is in at most one
   positive pair). Consequence used by the vectorised version: within each label, occurrences
   pair up in order (1st with 2nd, 3rd with 4th, ...); the last occurrence of a label with an odd
   count stays unmatched.
2. X' is a copy of X with each matched pair swapped: ``X[i]`` meets ``X'[i]``, a different image
   of the same class (positive pair). Both orientations (a, b) and (b, a) are pairs, as in the
   patent, so every image of the batch appears once on each side.
3. The unmatched positions of X' are reversed among themselves (the first unmatched position gets
   the last unmatched element, ...): negative pairs. With an odd number of unmatched elements the
   middle one maps onto itself -- a *fixed point* (an image paired with itself), returned as is by
   the permutation functions and dropped or re-paired by the manifest builder. Within one batch a
   label has at most one unmatched element, so a reversed (non-fixed) pair never shares a label;
   repaired and step-5 pairs can. The ``same`` column is therefore always computed from the two
   actual labels, never assumed from the kind.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import PairsConfig
from pipeline.core.schema import PAIR_COLUMNS
from pipeline.errors import DataError

KIND_PATENT_POSITIVE = "patent_positive"
KIND_PATENT_NEGATIVE = "patent_negative"
KIND_RANDOM_NEGATIVE = "random_negative"
KIND_REPAIRED = "repaired"
KINDS: tuple[str, ...] = (KIND_PATENT_POSITIVE, KIND_PATENT_NEGATIVE, KIND_RANDOM_NEGATIVE, KIND_REPAIRED)

# Step-5 rounds (each pairs two fresh random permutations of the epoch, batch by batch) tried
# before the remaining random negatives are drawn directly (see _random_negatives).
_MAX_STEP5_ROUNDS = 16


# ----------------------------------------------------------------------------------------------
# The permutation (steps 2-4)
# ----------------------------------------------------------------------------------------------


def patent_partner_indices(labels: Sequence[Any] | np.ndarray) -> np.ndarray:
    """Partner of every element of one batch under the patent's steps 2-4 (reference loop).

    ``result[i]`` is the position in the batch that element ``i`` is paired with (X[i] with
    X'[i] = X[result[i]]). Matched elements (greedy, in order, first later still-unmatched element
    with the same label) point at each other; the unmatched elements are mapped among themselves in
    reversed order; an odd number of unmatched elements leaves the middle one as a fixed point
    (``result[i] == i``). The result is a permutation and an involution.

    Labels may be any hashable values (strings or ints). O(n^2) worst case; this is the
    specification, :func:`patent_partner_indices_batched` is the fast equivalent.
    """
    labs = labels.tolist() if isinstance(labels, np.ndarray) else list(labels)
    n = len(labs)
    result = np.arange(n, dtype=np.int64)
    matched = [False] * n
    for i in range(n):  # step 2: walk X in order
        if matched[i]:
            continue
        for j in range(i + 1, n):  # first other still-unmatched element with the same label
            if not matched[j] and labs[j] == labs[i]:
                matched[i] = matched[j] = True
                result[i], result[j] = j, i  # step 3: swap the pair's indices in X'
                break
    unmatched = [i for i in range(n) if not matched[i]]  # step 4: reverse the unmatched ones
    for a, b in zip(unmatched, reversed(unmatched)):
        result[a] = b
    return result


def _label_codes(labels: Sequence[Any] | np.ndarray) -> np.ndarray:
    """Labels -> small non-negative integer codes (hash factorisation, O(n)).

    A small dtype lets numpy's stable sort use radix sort (linear time) in the batched variant.
    """
    arr = np.asarray(labels)
    if arr.dtype.kind in "iub" and arr.size and arr.min() >= 0 and arr.max() < 2**15:
        return arr.astype(np.int16, copy=False)
    codes, uniques = pd.factorize(pd.Series(arr, copy=False), sort=False, use_na_sentinel=False)
    dtype = np.int16 if len(uniques) < 2**15 else np.int64
    return codes.astype(dtype, copy=False)


def patent_partner_indices_batched(labels: Sequence[Any] | np.ndarray, batch_size: int) -> np.ndarray:
    """The patent permutation applied to each consecutive batch of ``labels``, vectorised, O(n).

    ``labels`` is cut into batches ``[0, B), [B, 2B), ...`` (the last one may be shorter);
    ``result[i]`` is the *global* position of ``i``'s partner, always inside ``i``'s batch.
    Identical to calling :func:`patent_partner_indices` on every batch (tested).

    How: a stable sort by label code (radix sort on int16 codes: linear) lists each label's
    positions in increasing order, hence batch by batch, so every (label, batch) group is a
    contiguous run. Greedy matching pairs a group's 1st with 2nd, 3rd with 4th, ... element, so
    the rank inside the run decides everything: even rank with a successor in the run -> partner is
    the successor, odd rank -> the predecessor, last even rank -> unmatched. The unmatched positions,
    taken in position order, are reversed within their batch with one offset computation.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    codes = _label_codes(labels)
    n = codes.shape[0]
    result = np.arange(n, dtype=np.int64)
    if n == 0:
        return result
    pos = np.arange(n, dtype=np.int64)
    batch = pos // batch_size

    order = np.argsort(codes, kind="stable")
    s_code = codes[order]
    s_batch = batch[order]
    new_group = np.empty(n, dtype=bool)
    new_group[0] = True
    new_group[1:] = (s_code[1:] != s_code[:-1]) | (s_batch[1:] != s_batch[:-1])
    starts = np.flatnonzero(new_group)
    group_len = np.diff(np.append(starts, n))
    group_id = np.cumsum(new_group) - 1
    rank = np.arange(n, dtype=np.int64) - starts[group_id]
    glen = group_len[group_id]

    odd = (rank & 1) == 1
    even_with_next = (~odd) & (rank + 1 < glen)
    t = np.flatnonzero(even_with_next)
    result[order[t]] = order[t + 1]
    t = np.flatnonzero(odd)
    result[order[t]] = order[t - 1]

    unmatched = np.zeros(n, dtype=bool)
    unmatched[order[(~odd) & (rank + 1 >= glen)]] = True
    u = np.flatnonzero(unmatched)  # in position order, hence grouped by batch
    if u.size:
        ub = batch[u]
        n_batches = int(batch[-1]) + 1
        cnt = np.bincount(ub, minlength=n_batches)
        off = np.concatenate(([0], np.cumsum(cnt)[:-1]))
        local = np.arange(u.size, dtype=np.int64) - off[ub]
        result[u] = u[off[ub] + cnt[ub] - 1 - local]
    return result


# ----------------------------------------------------------------------------------------------
# The pair manifest
# ----------------------------------------------------------------------------------------------


def _epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed % 2**63, epoch, 0x9A125]))


def _complement_sample(rng: np.random.Generator, left_codes: np.ndarray, by_code: np.ndarray,
                       code_start: np.ndarray, code_count: np.ndarray) -> np.ndarray:
    """For each left code draw a uniform element whose code differs (needs >= 2 codes present)."""
    n = by_code.shape[0]
    r = rng.integers(0, n - code_count[left_codes])
    r = r + np.where(r >= code_start[left_codes], code_count[left_codes], 0)
    return by_code[r]


def _random_negatives(rng: np.random.Generator, codes: np.ndarray, k: int, batch_size: int,
                      first_batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``k`` different-label pairs by the patent's step 5, as (left, right, batch) positions.

    Step 5 reads one random batch X and another random batch X' and pairs them element by element.
    Here a "random batch" is a chunk of a fresh random permutation of the epoch's images; a round
    pairs the chunks of two permutations, keeping only the pairs whose labels differ (the step
    gives "mostly negative" pairs; its accidental positives are discarded so that every positive of
    the manifest comes from the patent permutation). Rounds repeat until ``k`` pairs are collected.
    When labels are so imbalanced that this stalls (more than ``_MAX_STEP5_ROUNDS`` rounds), the
    rest is drawn directly -- left uniform, right uniform among the other labels -- which is the
    distribution step 5 converges to, at bounded cost. Requires >= 2 distinct labels.
    """
    n = codes.shape[0]
    nb = -(-n // batch_size)
    lefts, rights, batches = [], [], []
    got = 0
    rnd = 0
    while got < k and rnd < _MAX_STEP5_ROUNDS:
        a = rng.permutation(n)
        b = rng.permutation(n)
        keep = np.flatnonzero(codes[a] != codes[b])[: k - got]
        lefts.append(a[keep])
        rights.append(b[keep])
        batches.append(first_batch + rnd * nb + keep // batch_size)
        got += keep.size
        rnd += 1
    if got < k:
        rest = k - got
        order = np.argsort(codes, kind="stable")
        ncode = int(codes.max()) + 1
        count = np.bincount(codes, minlength=ncode)
        start = np.concatenate(([0], np.cumsum(count)[:-1]))
        left = rng.integers(0, n, size=rest)
        right = _complement_sample(rng, codes[left], order, start, count)
        lefts.append(left)
        rights.append(right)
        batches.append(first_batch + rnd * nb + np.arange(rest) // batch_size)
    return np.concatenate(lefts), np.concatenate(rights), np.concatenate(batches)


def plan_counts(n_pos: int, n_neg: int, size: int, fraction: float, tolerance: float) -> tuple[int, int]:
    """Largest epoch ``(positives, negatives)`` with at most ``size`` pairs meeting the fraction.

    ``n_pos`` positives are available, ``n_neg`` negatives (may be a huge number meaning
    "unlimited"). Among totals ``m <= size`` the largest one whose ``round(fraction * m)`` positives
    (capped at ``n_pos``) and ``m - positives`` negatives are available and give a positive share
    within ``tolerance`` of ``fraction`` wins. Returns ``(0, 0)`` when no total works. Vectorised
    over ``m`` (O(size)).
    """
    if size <= 0:
        return 0, 0
    m = np.arange(1, size + 1, dtype=np.int64)
    pos = np.minimum(np.floor(fraction * m + 0.5).astype(np.int64), n_pos)
    neg = m - pos
    ok = (neg <= n_neg) & (np.abs(pos / m - fraction) <= tolerance + 1e-12)
    idx = np.flatnonzero(ok)
    if idx.size == 0:
        return 0, 0
    best = idx[-1]
    return int(pos[best]), int(neg[best])


def build_pair_manifest(ids: Sequence[str] | np.ndarray, labels: Sequence[Any] | np.ndarray, cfg: PairsConfig,
                        seed: int) -> pd.DataFrame:
    """Per-epoch pair table (columns :data:`pipeline.core.schema.PAIR_COLUMNS`). Pure and seeded.

    For each epoch ``e`` (RNG from ``(seed, e)`` only, so epochs are independent of each other):

    1. Shuffle the images, cut them into batches of ``cfg.batch_size`` (the last may be shorter)
       and apply the patent permutation to every batch (:func:`patent_partner_indices_batched`):
       one pair ``(i, partner[i])`` per image, kind ``patent_positive`` for matched images and
       ``patent_negative`` for the reversed unmatched ones.
    2. Fixed points (an image paired with itself; at most one per batch): ``drop`` removes the
       pair; ``repair`` pairs the image with a uniformly drawn *other* image of its batch (of the
       epoch when the batch has one image), kind ``repaired``.
    3. Meet ``positive_fraction`` (design choice, the patent only says the proportion is a
       setting): the epoch keeps its natural size -- one pair per image as the patent's X/X'
       gives, less dropped fixed points -- so that training cost per epoch does not depend on the
       fraction. Let ``m`` be that size. When the patent pairs' own positive share is already
       within ``tolerance`` of the target they are kept untouched. Otherwise the epoch holds
       ``round(fraction * m)`` positives (the target itself, not the edge of the tolerance band)
       and the rest negatives. Positives are patent pairs whose labels agree; when there are more than needed
       (the usual case: with 7 classes and 32-image batches ~80 % of images match) a random
       subset is kept. Negatives are the patent's step-4 negatives first (random subset if too
       many), then the patent's step-5 random-batch negatives (:func:`_random_negatives`) fill
       the remaining slots. When positives are too few, negatives are subsampled and the epoch
       shrinks to the largest size that meets the fraction within ``tolerance``
       (:func:`plan_counts`) -- positives are never invented outside the patent permutation.
    4. ``same`` is computed from the two labels of every pair. Rows are ordered by batch (patent
       batches first, then step-5 batches), then by position.

    Raises :class:`DataError` when the fraction cannot be met: fewer than 2 images, no label
    with 2 or more images (zero positives possible) while ``positive_fraction > tolerance``, a
    single label (zero negatives possible) while ``positive_fraction < 1 - tolerance``, or an
    epoch whose batches happen to give no positive pair (the classes with >= 2 images never share
    a batch: raise ``pairs.batch_size``).

    The result depends on the order of ``ids``; the ``pairs`` stage sorts by image id first.
    """
    ids_arr = np.asarray(ids, dtype=object)
    codes = _label_codes(labels)
    labs = np.asarray(labels, dtype=object)
    n = ids_arr.shape[0]
    if codes.shape[0] != n:
        raise ValueError(f"ids and labels differ in length ({n} vs {codes.shape[0]})")
    if n < 2:
        raise DataError(f"need at least 2 train images to build pairs, got {n}")
    if len(set(ids_arr.tolist())) != n:
        raise DataError("duplicate image ids in the train set")
    counts = np.bincount(codes.astype(np.int64))
    frac, tol, bs = cfg.positive_fraction, cfg.tolerance, cfg.batch_size
    n_classes = int((counts > 0).sum())
    if frac > tol and not (counts >= 2).any():
        raise DataError(
            f"positive_fraction={frac} cannot be met: every one of the {n_classes} label(s) has a single "
            "train image, so no positive (same-class) pair exists"
        )
    if frac < 1 - tol and n_classes < 2:
        raise DataError(
            f"positive_fraction={frac} cannot be met: all {n} train images share one label, so no "
            "negative (different-class) pair exists"
        )

    frames = []
    for epoch in range(cfg.epochs):
        rng = _epoch_rng(seed, epoch)
        perm = rng.permutation(n)
        ecodes = codes[perm]
        partner = patent_partner_indices_batched(ecodes, bs)
        pos_idx = np.arange(n, dtype=np.int64)
        matched = ecodes[partner] == ecodes  # includes the fixed points (label equals itself)
        fixed = partner == pos_idx
        kind = np.where(matched, 0, 1).astype(np.int8)  # 0 patent_positive, 1 patent_negative
        left = pos_idx.copy()
        right = partner.copy()
        batch = pos_idx // bs
        # Within one batch, step 4 reverses only leftovers, at most one per label, so a non-fixed
        # unmatched pair never shares a label; 'matched' therefore equals "patent positive" except
        # at fixed points, which are handled here.
        fp = np.flatnonzero(fixed)
        kind[fp] = 3
        if cfg.fixed_points == "drop":
            keep = ~fixed
            left, right, batch, kind = left[keep], right[keep], batch[keep], kind[keep]
        elif fp.size:
            b = fp // bs
            b_start = b * bs
            b_len = np.minimum(b_start + bs, n) - b_start
            single = b_len < 2
            r = np.empty(fp.size, dtype=np.int64)
            # uniform other member of the batch: draw in [0, len-1) and skip the image itself
            if (~single).any():
                d = rng.integers(0, b_len[~single] - 1)
                cand = b_start[~single] + d
                r[~single] = np.where(cand >= fp[~single], cand + 1, cand)
            if single.any():
                d = rng.integers(0, n - 1, size=int(single.sum()))
                r[single] = np.where(d >= fp[single], d + 1, d)
            right[fp] = r
        same = ecodes[left] == ecodes[right]

        p_idx = np.flatnonzero(same)
        n_idx = np.flatnonzero(~same)
        size = left.shape[0]
        if frac > tol and p_idx.size == 0:
            raise DataError(
                f"epoch {epoch}: the patent permutation gave no positive pair (no two images of one class "
                f"share a batch of {bs}); positive_fraction={frac} cannot be met -- raise pairs.batch_size"
            )
        unlimited = size if n_classes >= 2 else 0  # step 5 supplies any number of negatives
        if abs(p_idx.size / size - frac) <= tol:  # the patent pairs already meet the fraction
            n_pos, n_neg = int(p_idx.size), int(n_idx.size)
        else:
            n_pos, n_neg = plan_counts(int(p_idx.size), int(n_idx.size) + unlimited, size, frac, tol)
        if n_pos + n_neg == 0:
            raise DataError(
                f"epoch {epoch}: positive_fraction={frac}±{tol} cannot be met with {p_idx.size} positive and "
                f"{n_idx.size} negative patent pairs"
            )
        if n_pos < p_idx.size:
            p_idx = np.sort(rng.choice(p_idx, size=n_pos, replace=False))
        if n_neg < n_idx.size:
            n_idx = np.sort(rng.choice(n_idx, size=n_neg, replace=False))
        sel = np.sort(np.concatenate([p_idx, n_idx]))
        e_left, e_right, e_batch, e_kind = left[sel], right[sel], batch[sel], kind[sel]
        extra = n_neg - n_idx.size
        if extra > 0:
            n_batches = -(-n // bs)
            rl, rr, rb = _random_negatives(rng, ecodes, extra, bs, n_batches)
            e_left = np.concatenate([e_left, rl])
            e_right = np.concatenate([e_right, rr])
            e_batch = np.concatenate([e_batch, rb])
            e_kind = np.concatenate([e_kind, np.full(extra, 2, dtype=np.int8)])
        gl, gr = perm[e_left], perm[e_right]  # shuffled positions -> input rows
        frames.append(
            pd.DataFrame(
                {
                    "epoch": np.full(gl.shape[0], epoch, dtype=np.int64),
                    "batch": e_batch.astype(np.int64),
                    "left_id": ids_arr[gl],
                    "right_id": ids_arr[gr],
                    "left_label": labs[gl],
                    "right_label": labs[gr],
                    "same": (codes[gl] == codes[gr]).astype(np.int64),
                    "kind": pd.Categorical.from_codes(e_kind, categories=list(KINDS)).astype(str),
                }
            )
        )
    out = pd.concat(frames, ignore_index=True)
    for col in ("left_id", "right_id", "left_label", "right_label"):
        out[col] = out[col].astype(str)
    return out[list(PAIR_COLUMNS)]


def summarize_pairs(pairs: pd.DataFrame) -> dict[str, Any]:
    """Per-epoch counts, positive fraction, kinds and per-class counts of a pair manifest."""
    epochs: dict[str, Any] = {}
    for epoch, g in pairs.groupby("epoch", sort=True):
        per_class: dict[str, dict[str, int]] = {}
        for side in ("left_label", "right_label"):
            for label, c in g[side].value_counts().sort_index().items():
                per_class.setdefault(str(label), {"left": 0, "right": 0, "positive": 0})[side.split("_")[0]] = int(c)
        for label, c in g.loc[g["same"] == 1, "left_label"].value_counts().items():
            per_class[str(label)]["positive"] = int(c)
        epochs[str(int(epoch))] = {
            "pairs": int(len(g)),
            "positive": int(g["same"].sum()),
            "negative": int(len(g) - g["same"].sum()),
            "positive_fraction": float(g["same"].mean()) if len(g) else 0.0,
            "kinds": {str(k): int(v) for k, v in g["kind"].value_counts().sort_index().items()},
            "per_class": per_class,
        }
    return {
        "pairs": int(len(pairs)),
        "positive_fraction": float(pairs["same"].mean()) if len(pairs) else 0.0,
        "kinds": {str(k): int(v) for k, v in pairs["kind"].value_counts().sort_index().items()},
        "epochs": epochs,
    }
