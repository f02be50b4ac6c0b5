"""The patent's pair generator: the permutation (steps 2-4), its vectorised form, the manifest."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import PairsConfig, load_config
from pipeline.core.pairs import build_pair_manifest, patent_partner_indices, patent_partner_indices_batched, plan_counts
from pipeline.core.schema import AUGMENTED_COLUMNS, PAIR_COLUMNS
from pipeline.errors import DataError
from pipeline.layout import Layout
from pipeline.stages.pairs import run_pairs

# ------------------------------------------------------------------------------------------------
# Hand-worked examples of steps 2-4 (expected arrays written out by hand)
# ------------------------------------------------------------------------------------------------

HAND_WORKED = [
    # empty batch and a single image (a fixed point)
    ([], []),
    (["a"], [0]),
    # even, two labels interleaved: a0-a2, b1-b3 swapped; nothing unmatched
    (["a", "b", "a", "b"], [2, 3, 0, 1]),
    # odd count of one label: a0-a1 matched, a2 left alone -> the middle of one unmatched: fixed
    (["a", "a", "a"], [1, 0, 2]),
    # all one label, even / odd
    (["c", "c", "c", "c"], [1, 0, 3, 2]),
    (["c", "c", "c", "c", "c"], [1, 0, 3, 2, 4]),
    # all different labels: every element unmatched -> whole batch reversed; odd -> middle fixed
    (["a", "b", "c", "d"], [3, 2, 1, 0]),
    (["a", "b", "c", "d", "e"], [4, 3, 2, 1, 0]),
    # classes with one member among a class of three: a0-a2 matched; unmatched 1,3,4,5 reversed
    (["a", "b", "a", "c", "d", "a"], [2, 5, 0, 4, 3, 1]),
    # a batch in HAM10000 codes: mel 0-3, nv 1-2 matched; unmatched 4,5,6 -> 4<->6, 5 fixed
    (["mel", "nv", "nv", "mel", "bcc", "nv", "df"], [3, 2, 1, 0, 6, 5, 4]),
    # greedy: a0-a3 (first *later* same label), b1-b2; a4, b5 unmatched -> swapped by reversal
    (["a", "b", "b", "a", "a", "b"], [3, 2, 1, 0, 5, 4]),
    # integer labels work the same
    ([5, 5, 1, 2, 1], [1, 0, 4, 3, 2]),
]


@pytest.mark.parametrize(("labels", "expected"), HAND_WORKED)
def test_patent_permutation_hand_worked(labels, expected):
    assert patent_partner_indices(labels).tolist() == expected


@pytest.mark.parametrize(("labels", "expected"), HAND_WORKED)
def test_batched_one_batch_matches_hand_worked(labels, expected):
    assert patent_partner_indices_batched(labels, max(len(labels), 1)).tolist() == expected


def test_batched_hand_worked_two_batches():
    # batch 1 = [a, a, b] -> [1, 0, 2]; batch 2 = [b, c, b] -> b3-b5, c4 fixed -> [5, 4, 3] global
    got = patent_partner_indices_batched(["a", "a", "b", "b", "c", "b"], 3)
    assert got.tolist() == [1, 0, 2, 5, 4, 3]


# ------------------------------------------------------------------------------------------------
# Properties of the permutation
# ------------------------------------------------------------------------------------------------

label_lists = st.lists(st.integers(0, 6), max_size=60)


def _unmatched(labels: list[int]) -> list[int]:
    counts = Counter(labels)
    seen: Counter = Counter()
    out = []
    for i, lab in enumerate(labels):
        seen[lab] += 1
        if counts[lab] % 2 == 1 and seen[lab] == counts[lab]:
            out.append(i)
    return out


@settings(max_examples=300, deadline=None)
@given(label_lists)
def test_permutation_invariants(labels):
    p = patent_partner_indices(labels)
    n = len(labels)
    idx = np.arange(n)
    assert sorted(p.tolist()) == list(range(n))  # a permutation
    assert np.array_equal(p[p], idx)  # an involution
    lab = np.asarray(labels, dtype=np.int64)
    unmatched = _unmatched(labels)
    matched = np.setdiff1d(idx, unmatched)
    # matched pairs share their label and are distinct images
    assert np.all(lab[p[matched]] == lab[matched])
    assert np.all(p[matched] != matched)
    # number matched = sum over labels of 2 * floor(count / 2)
    assert len(matched) == sum(2 * (c // 2) for c in Counter(labels).values())
    # unmatched elements are mapped among themselves in reversed order
    assert p[unmatched].tolist() == unmatched[::-1]
    # at most one fixed point, and only when the number unmatched is odd
    fixed = np.flatnonzero(p == idx)
    assert len(fixed) == len(unmatched) % 2
    # a reversed (non-fixed) unmatched pair never shares a label (one leftover per label)
    non_fixed = [u for u in unmatched if p[u] != u]
    assert np.all(lab[p[non_fixed]] != lab[non_fixed])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]), max_size=80), st.integers(1, 12))
def test_batched_equals_per_batch_loop(labels, batch_size):
    expected = [patent_partner_indices(labels[i : i + batch_size]) + i for i in range(0, len(labels), batch_size)]
    expected = np.concatenate(expected) if expected else np.zeros(0, dtype=np.int64)
    got = patent_partner_indices_batched(labels, batch_size)
    assert np.array_equal(got, expected)
    # partners stay in their batch; at most one fixed point per batch
    idx = np.arange(len(labels))
    assert np.array_equal(got // batch_size, idx // batch_size)
    fixed_batches = (idx[got == idx]) // batch_size
    assert len(fixed_batches) == len(set(fixed_batches.tolist()))


def test_batched_large_random_equals_loop():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 7, size=5000)
    bs = 32
    expected = np.concatenate([patent_partner_indices(labels[i : i + bs]) + i for i in range(0, 5000, bs)])
    assert np.array_equal(patent_partner_indices_batched(labels, bs), expected)


def test_batched_rejects_bad_batch_size():
    with pytest.raises(ValueError):
        patent_partner_indices_batched([1, 2], 0)


# ------------------------------------------------------------------------------------------------
# The pair manifest
# ------------------------------------------------------------------------------------------------

CLASSES7 = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def _data(n: int, seed: int = 0, weights=None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.choice(CLASSES7, size=n, p=weights)
    ids = np.array([f"img{i:05d}__a{i % 3}" for i in range(n)], dtype=object)
    return ids, labels


def _check_manifest(df: pd.DataFrame, ids, labels, cfg: PairsConfig) -> None:
    assert list(df.columns) == list(PAIR_COLUMNS)
    lab_of = dict(zip(ids, labels))
    assert set(df["left_id"]) <= set(ids) and set(df["right_id"]) <= set(ids)
    assert (df["left_label"] == df["left_id"].map(lab_of)).all()
    assert (df["right_label"] == df["right_id"].map(lab_of)).all()
    assert (df["same"] == (df["left_label"] == df["right_label"]).astype(int)).all()
    assert set(df["kind"]) <= {"patent_positive", "patent_negative", "random_negative", "repaired"}
    assert (df.loc[df["kind"] == "patent_positive", "same"] == 1).all()
    assert (df.loc[df["kind"].isin(["patent_negative", "random_negative"]), "same"] == 0).all()
    assert (df["left_id"] != df["right_id"]).all()  # fixed points dropped or repaired
    assert sorted(df["epoch"].unique().tolist()) == list(range(cfg.epochs))
    for _, g in df.groupby("epoch"):
        assert abs(g["same"].mean() - cfg.positive_fraction) <= cfg.tolerance + 1e-12


@pytest.mark.parametrize(
    ("fraction", "tolerance", "batch_size", "fixed"),
    [(0.5, 0.02, 32, "repair"), (0.3, 0.0, 16, "drop"), (0.8, 0.01, 8, "repair"), (0.0, 0.0, 32, "drop"),
     (1.0, 0.0, 32, "repair"), (0.95, 0.01, 4, "drop")],
)
def test_manifest_meets_fraction_and_labels(fraction, tolerance, batch_size, fixed):
    ids, labels = _data(700)
    cfg = PairsConfig(
        epochs=3, batch_size=batch_size, positive_fraction=fraction, tolerance=tolerance, fixed_points=fixed
    )
    df = build_pair_manifest(ids, labels, cfg, seed=1)
    _check_manifest(df, ids, labels, cfg)
    assert len(df) > 100  # no degenerate shrinking on ordinary data


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 120),
    n_classes=st.integers(1, 7),
    batch_size=st.integers(2, 40),
    fraction=st.floats(0, 1),
    tolerance=st.sampled_from([0.0, 0.02, 0.1]),
    fixed=st.sampled_from(["drop", "repair"]),
    seed=st.integers(0, 2**32),
)
def test_manifest_property_fraction_met_or_clear_error(n, n_classes, batch_size, fraction, tolerance, fixed, seed):
    rng = np.random.default_rng(seed)
    labels = rng.choice(CLASSES7[:n_classes], size=n)
    ids = np.array([f"i{k}" for k in range(n)], dtype=object)
    cfg = PairsConfig(
        epochs=2, batch_size=batch_size, positive_fraction=fraction, tolerance=tolerance, fixed_points=fixed
    )
    try:
        df = build_pair_manifest(ids, labels, cfg, seed=seed)
    except DataError as exc:
        assert "cannot be met" in str(exc)
        return
    _check_manifest(df, ids, labels, cfg)


def test_manifest_is_patent_permutation_when_fraction_already_met():
    """With a wide tolerance the epoch is exactly the patent's X / X' pairing, batch by batch."""
    ids, labels = _data(203, seed=5)
    cfg = PairsConfig(epochs=2, batch_size=16, positive_fraction=0.5, tolerance=0.5, fixed_points="repair")
    df = build_pair_manifest(ids, labels, cfg, seed=9)
    lab_of = dict(zip(ids, labels))
    for _, g in df.groupby("epoch"):
        assert len(g) == 203 and set(g["left_id"]) == set(ids)  # one pair per image
        assert set(g["kind"]) <= {"patent_positive", "patent_negative", "repaired"}
        for _, b in g.groupby("batch"):
            x = b["left_id"].tolist()  # rows are in batch position order: this is X
            partner = patent_partner_indices([lab_of[i] for i in x])
            expected = [x[j] for j in partner]
            for pos, (got, exp, kind) in enumerate(zip(b["right_id"], expected, b["kind"])):
                if partner[pos] == pos:
                    assert kind == "repaired" and got != x[pos] and got in set(x)
                else:
                    assert got == exp


def test_drop_removes_exactly_the_fixed_points():
    """Same seed, same shuffle: ``drop`` gives the ``repair`` manifest less its repaired rows."""
    ids, labels = _data(203, seed=5)
    common = {"epochs": 2, "batch_size": 16, "positive_fraction": 0.5, "tolerance": 0.5}
    repaired = build_pair_manifest(ids, labels, PairsConfig(**common, fixed_points="repair"), seed=9)
    dropped = build_pair_manifest(ids, labels, PairsConfig(**common, fixed_points="drop"), seed=9)
    n_fixed = int((repaired["kind"] == "repaired").sum())
    assert n_fixed > 0
    assert len(dropped) == 2 * 203 - n_fixed
    kept = repaired[repaired["kind"] != "repaired"].reset_index(drop=True)
    pd.testing.assert_frame_equal(kept, dropped.reset_index(drop=True))


def test_subsamples_positives_and_adds_random_negatives():
    # 2 classes, batch 32: ~all images match -> positives far above 0.5; step-5 negatives fill in
    ids, labels = _data(640, weights=[0.5, 0.5, 0, 0, 0, 0, 0])
    cfg = PairsConfig(epochs=1, batch_size=32, positive_fraction=0.5, tolerance=0.0, fixed_points="drop")
    df = build_pair_manifest(ids, labels, cfg, seed=0)
    kinds = df["kind"].value_counts()
    assert kinds.get("random_negative", 0) > 0
    assert df["same"].mean() == 0.5


def test_too_few_positives_subsamples_negatives():
    # one class of 2 images among 60 singletons... made of 7 labels: only 'nv' can pair
    labels = np.array(["nv", "nv"] + ["akiec", "bcc", "bkl", "df", "mel", "vasc"] * 3, dtype=object)
    ids = np.array([f"x{i}" for i in range(len(labels))], dtype=object)
    cfg = PairsConfig(epochs=1, batch_size=len(labels), positive_fraction=0.5, tolerance=0.0, fixed_points="drop")
    df = build_pair_manifest(ids, labels, cfg, seed=0)
    assert df["same"].mean() == 0.5
    assert (df["same"] == 1).sum() >= 2  # both orientations of the nv pair at least


def test_same_computed_from_labels_even_for_repaired_pairs():
    labels = np.array(["a", "a", "a"] * 20, dtype=object)  # all one label: every repaired pair is positive
    ids = np.array([f"x{i}" for i in range(60)], dtype=object)
    cfg = PairsConfig(epochs=2, batch_size=3, positive_fraction=1.0, tolerance=0.0, fixed_points="repair")
    df = build_pair_manifest(ids, labels, cfg, seed=0)
    rep = df[df["kind"] == "repaired"]
    assert len(rep) == 40 and (rep["same"] == 1).all()


def test_determinism_by_seed_and_seed_changes_output():
    ids, labels = _data(300)
    cfg = PairsConfig(epochs=2, batch_size=16)
    a = build_pair_manifest(ids, labels, cfg, seed=7)
    b = build_pair_manifest(ids, labels, cfg, seed=7)
    c = build_pair_manifest(ids, labels, cfg, seed=8)
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(c)
    # epochs differ from each other
    e0 = a[a["epoch"] == 0][["left_id", "right_id"]].to_numpy()
    e1 = a[a["epoch"] == 1][["left_id", "right_id"]].to_numpy()
    assert e0.shape != e1.shape or not np.array_equal(e0, e1)


def test_error_when_every_class_has_one_member():
    ids = np.array(CLASSES7, dtype=object)
    with pytest.raises(DataError, match="single train image"):
        build_pair_manifest(ids, np.array(CLASSES7, dtype=object), PairsConfig(), seed=0)


def test_error_when_one_label_only_and_negatives_needed():
    ids = np.array([f"x{i}" for i in range(10)], dtype=object)
    with pytest.raises(DataError, match="share one label"):
        build_pair_manifest(ids, np.array(["nv"] * 10, dtype=object), PairsConfig(), seed=0)


def test_error_too_few_images_and_duplicates():
    with pytest.raises(DataError, match="at least 2"):
        build_pair_manifest(["a"], ["nv"], PairsConfig(), seed=0)
    with pytest.raises(DataError, match="duplicate"):
        build_pair_manifest(["a", "a"], ["nv", "nv"], PairsConfig(), seed=0)


def test_plan_counts():
    assert plan_counts(100, 10**6, 200, 0.5, 0.0) == (100, 100)
    assert plan_counts(10, 10**6, 200, 0.5, 0.0) == (10, 10)  # shrinks to what positives allow
    assert plan_counts(0, 10**6, 200, 0.5, 0.1) == (0, 0)  # impossible
    assert plan_counts(5, 0, 200, 1.0, 0.0) == (5, 0)
    p, n = plan_counts(7, 100, 50, 1 / 3, 0.0)  # exact thirds only: totals divisible by 3
    assert p * 3 == p + n and p <= 7


# ------------------------------------------------------------------------------------------------
# The stage
# ------------------------------------------------------------------------------------------------


def _write_augmented(cfg, n_train: int = 90) -> pd.DataFrame:
    layout = Layout.from_config(cfg)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n_train + 20):
        split = "train" if i < n_train else ("val" if i % 2 else "test")
        rows.append(
            {
                "image_id": f"ISIC_{i:04d}__a0",
                "source_id": f"ISIC_{i:04d}",
                "path": f"{split}/ISIC_{i:04d}__a0.png",
                "label": CLASSES7[int(rng.integers(0, 7))],
                "group_id": f"g{i}",
                "split": split,
                "copy": 0,
            }
        )
    df = pd.DataFrame(rows, columns=list(AUGMENTED_COLUMNS))
    layout.augmented_dir.mkdir(parents=True, exist_ok=True)
    df.sample(frac=1.0, random_state=1).to_parquet(layout.augmented_manifest, index=False)
    return df


def _cfg(tmp_path: Path, **over):
    base = {"paths.work_dir": str(tmp_path / "work"), "pairs.epochs": 2, "pairs.batch_size": 16}
    base.update(over)
    return load_config(Path(__file__).resolve().parents[1] / "params.yaml", base)


def test_run_pairs_writes_manifest_and_summary(tmp_path):
    cfg = _cfg(tmp_path)
    aug = _write_augmented(cfg)
    out = run_pairs(cfg)
    layout = Layout.from_config(cfg)
    pairs = pd.read_parquet(layout.pairs)
    train_ids = set(aug.loc[aug["split"] == "train", "image_id"])
    assert set(pairs["left_id"]) <= train_ids and set(pairs["right_id"]) <= train_ids
    _check_manifest(pairs, aug["image_id"].to_numpy(), aug["label"].to_numpy(), cfg.pairs)
    summary = json.loads(layout.pairs_summary.read_text())
    assert summary["pairs"] == len(pairs) == out["pairs"]
    assert set(summary["epochs"]) == {"0", "1"}
    for ep in summary["epochs"].values():
        assert abs(ep["positive_fraction"] - cfg.pairs.positive_fraction) <= cfg.pairs.tolerance
        assert sum(ep["kinds"].values()) == ep["pairs"]
        assert sum(c["left"] for c in ep["per_class"].values()) == ep["pairs"]


def test_run_pairs_independent_of_row_order(tmp_path):
    cfg = _cfg(tmp_path)
    _write_augmented(cfg)
    run_pairs(cfg)
    layout = Layout.from_config(cfg)
    first = pd.read_parquet(layout.pairs)
    aug = pd.read_parquet(layout.augmented_manifest)
    aug.iloc[::-1].to_parquet(layout.augmented_manifest, index=False)
    run_pairs(cfg)
    pd.testing.assert_frame_equal(first, pd.read_parquet(layout.pairs))


def test_run_pairs_missing_input(tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(DataError, match="manifest.parquet not found: run `python -m pipeline augment` first"):
        run_pairs(cfg)


def test_run_pairs_names_file_on_impossible_fraction(tmp_path):
    cfg = _cfg(tmp_path)
    layout = Layout.from_config(cfg)
    layout.augmented_dir.mkdir(parents=True)
    df = pd.DataFrame(
        [{"image_id": f"{c}__a0", "source_id": c, "path": f"train/{c}.png", "label": c, "group_id": c, "split": "train",
          "copy": 0} for c in CLASSES7],
        columns=list(AUGMENTED_COLUMNS),
    )
    df.to_parquet(layout.augmented_manifest, index=False)
    with pytest.raises(DataError, match="manifest.parquet: positive_fraction=0.5 cannot be met"):
        run_pairs(cfg)
    assert not layout.pairs.exists()
