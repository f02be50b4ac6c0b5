"""Grouped, stratified, seeded split assignment (pipeline.core.splits)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import SplitConfig
from pipeline.core.splits import assign_splits, near_duplicate_groups

FRACTIONS = SplitConfig(train=0.7, val=0.15, test=0.15)


def _random_dataset(seed: int, n_groups: int = 1200) -> pd.DataFrame:
    """Groups of 1-4 images, 5 labels with unequal frequencies."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(["a", "b", "c", "d", "e"], n_groups, p=[0.4, 0.25, 0.15, 0.12, 0.08])
    sizes = rng.integers(1, 5, n_groups)
    rows = [(f"g{i:05d}", lab) for i, (lab, n) in enumerate(zip(labels, sizes, strict=True)) for _ in range(n)]
    return pd.DataFrame(rows, columns=["group", "label"])


def _groups_in_one_split(groups: np.ndarray, splits: np.ndarray) -> bool:
    return bool((pd.DataFrame({"g": groups, "s": splits}).groupby("g")["s"].nunique() == 1).all())


def test_no_group_in_two_splits_and_fractions_per_label():
    df = _random_dataset(0)
    splits = assign_splits(df["label"], df["group"], FRACTIONS, seed=1)
    assert len(splits) == len(df)
    assert set(splits) == {"train", "val", "test"}
    assert _groups_in_one_split(df["group"].to_numpy(), splits)
    shares = pd.crosstab(df["label"], splits, normalize="index")
    for label, row in shares.iterrows():
        assert row["train"] == pytest.approx(0.70, abs=0.03), label
        assert row["val"] == pytest.approx(0.15, abs=0.03), label
        assert row["test"] == pytest.approx(0.15, abs=0.03), label


def test_other_fractions_are_followed():
    df = _random_dataset(1)
    splits = assign_splits(df["label"], df["group"], SplitConfig(train=0.5, val=0.2, test=0.3), seed=3)
    shares = pd.Series(splits).value_counts(normalize=True)
    assert shares["train"] == pytest.approx(0.5, abs=0.02)
    assert shares["val"] == pytest.approx(0.2, abs=0.02)
    assert shares["test"] == pytest.approx(0.3, abs=0.02)


def test_deterministic_and_seed_dependent():
    df = _random_dataset(2, n_groups=300)
    a = assign_splits(df["label"], df["group"], FRACTIONS, seed=7)
    b = assign_splits(df["label"], df["group"], FRACTIONS, seed=7)
    c = assign_splits(df["label"], df["group"], FRACTIONS, seed=8)
    assert (a == b).all()
    assert (a != c).any()


def test_row_order_does_not_matter():
    df = _random_dataset(3, n_groups=300)
    base = pd.Series(assign_splits(df["label"], df["group"], FRACTIONS, seed=5), index=df.index)
    shuffled = df.sample(frac=1.0, random_state=11)
    again = pd.Series(assign_splits(shuffled["label"], shuffled["group"], FRACTIONS, seed=5), index=shuffled.index)
    assert (again.sort_index() == base).all()


def test_small_classes():
    labels = ["one"] + ["two"] * 2 + ["three"] * 3 + ["four"] * 4
    groups = [f"{lab}{i}" for lab, i in zip(labels, [0, 0, 1, 0, 1, 2, 0, 1, 2, 3], strict=True)]
    splits = assign_splits(labels, groups, FRACTIONS, seed=0)
    per_label = {lab: sorted(s for s, lb in zip(splits, labels, strict=True) if lb == lab) for lab in set(labels)}
    assert per_label["one"] == ["train"]
    assert per_label["two"] == ["train", "train"]
    assert per_label["three"] == ["test", "train", "val"]
    assert per_label["four"] == ["test", "train", "train", "val"]


def test_group_with_many_images_stays_together_in_small_class():
    # one lesion photographed 6 times plus two single-image lesions: 3 groups -> one per split
    labels = ["x"] * 8
    groups = ["big"] * 6 + ["s1", "s2"]
    splits = assign_splits(labels, groups, FRACTIONS, seed=4)
    assert len(set(splits[:6])) == 1
    assert sorted(set(splits)) == ["test", "train", "val"]


def test_length_mismatch_raises():
    with pytest.raises(ValueError, match="differ in length"):
        assign_splits(["a", "b"], ["g1"], FRACTIONS, seed=0)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 30)), min_size=1, max_size=80),
    st.integers(0, 2**31),
)
def test_property_groups_never_split_and_holdout_when_possible(rows, seed):
    labels = [lab for lab, _ in rows]
    groups = [f"{lab}-{g}" for lab, g in rows]  # groups nested in labels
    splits = assign_splits(labels, groups, FRACTIONS, seed=seed)
    assert _groups_in_one_split(np.array(groups), splits)
    for lab in set(labels):
        n_groups = len({g for g, lb in zip(groups, labels, strict=True) if lb == lab})
        got = {s for s, lb in zip(splits, labels, strict=True) if lb == lab}
        if n_groups >= 3:
            assert got == {"train", "val", "test"}
        else:
            assert got == {"train"}


# ---------------------------------------------------------------------------------------------
# Source-held-out mode (data.split.holdout_sources)
# ---------------------------------------------------------------------------------------------
def _with_sites(df: pd.DataFrame, seed: int = 0) -> np.ndarray:
    """One site per group (a, b, c, d with unequal shares)."""
    rng = np.random.default_rng(seed)
    per_group = {g: rng.choice(["site_a", "site_b", "site_c", "site_d"], p=[0.4, 0.3, 0.2, 0.1])
                 for g in df["group"].unique()}  # fmt: skip
    return df["group"].map(per_group).to_numpy()


def test_holdout_sources_send_whole_sites_to_test():
    df = _random_dataset(3)
    sites = _with_sites(df)
    cfg = SplitConfig(train=0.7, val=0.15, test=0.15, holdout_sources=["site_b"])
    splits = assign_splits(df["label"], df["group"], cfg, seed=1, sites=sites)
    assert (splits[sites == "site_b"] == "test").all()
    assert (splits[sites != "site_b"] != "test").all()
    assert _groups_in_one_split(df["group"].to_numpy(), splits)
    rest = sites != "site_b"
    shares = pd.crosstab(df["label"][rest], splits[rest], normalize="index")
    for label, row in shares.iterrows():  # train:val keeps 0.7:0.15 -> 0.824:0.176
        assert row["train"] == pytest.approx(0.7 / 0.85, abs=0.04), label
        assert row["val"] == pytest.approx(0.15 / 0.85, abs=0.04), label


def test_holdout_lesion_spanning_sites_goes_to_test_whole():
    labels = ["nv"] * 8
    groups = ["L1", "L1", "L2", "L3", "L4", "L5", "L6", "L7"]
    sites = ["x", "y", "y", "y", "y", "y", "y", "y"]
    splits = assign_splits(labels, groups, SplitConfig(holdout_sources=["x"]), seed=0, sites=sites)
    assert splits[:2].tolist() == ["test", "test"]
    assert "test" not in splits[2:] and "val" in splits[2:]


def test_holdout_empty_list_is_the_random_split_bit_for_bit():
    df = _random_dataset(4, n_groups=400)
    sites = _with_sites(df)
    a = assign_splits(df["label"], df["group"], FRACTIONS, seed=5)
    b = assign_splits(df["label"], df["group"], SplitConfig(holdout_sources=[]), seed=5, sites=sites)
    assert (a == b).all()


def test_holdout_deterministic_and_order_invariant():
    df = _random_dataset(5, n_groups=300)
    df["site"] = _with_sites(df, 1)
    cfg = SplitConfig(holdout_sources=["site_c", "site_d"])
    a = assign_splits(df["label"], df["group"], cfg, seed=2, sites=df["site"])
    shuffled = df.sample(frac=1.0, random_state=0)
    b = pd.Series(assign_splits(shuffled["label"], shuffled["group"], cfg, seed=2, sites=shuffled["site"]),
                  index=shuffled.index).sort_index()  # fmt: skip
    assert (a == b.to_numpy()).all()


def test_holdout_errors_name_the_sites():
    from pipeline.errors import DataError

    labels, groups, sites = ["nv", "mel"], ["g1", "g2"], ["rosendahl", "vidir_modern"]
    with pytest.raises(DataError, match=r"unknown source site\(s\) \['vienna'\]; the data has \['rosendahl', 'vidir_modern'\]"):
        assign_splits(labels, groups, SplitConfig(holdout_sources=["vienna"]), seed=0, sites=sites)
    with pytest.raises(DataError, match="hold out every image"):
        assign_splits(labels, groups, SplitConfig(holdout_sources=["rosendahl", "vidir_modern"]), seed=0, sites=sites)
    with pytest.raises(ValueError, match="needs each row's source site"):
        assign_splits(labels, groups, SplitConfig(holdout_sources=["rosendahl"]), seed=0)


@pytest.mark.parametrize(("value", "message"), [(["a", "a"], "listed twice"), ([" "], "must not be blank")])
def test_holdout_config_rules(value, message):
    from conftest import ROOT

    from pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=rf"data.split.holdout_sources.*{message}"):
        load_config(ROOT / "params.yaml", {"data.split.holdout_sources": value})


def _hash(bits: set[int]) -> str:
    """A 256-bit hash (64 hex digits) with exactly these bit positions set."""
    value = sum(1 << (255 - b) for b in bits)
    return f"{value:064x}"


def test_near_duplicate_groups_merge_transitively_under_the_smallest_id():
    base = set(range(0, 256, 2))  # 128 bits set
    groups = ["L3", "L1", "L2", "L4", "L5", "L5"]
    hashes = [
        _hash(base),                     # L3
        _hash(base | {1, 3}),            # L1: 2 bits from L3
        _hash(base | {1, 3, 5, 7}),      # L2: 2 bits from L1, 4 from L3
        _hash(set(range(1, 256, 2))),    # L4: far from everything
        None,                            # L5: unreadable image, links nothing
        _hash(set(range(1, 256, 2)) | {0}),  # L5 again: 1 bit from L4
    ]
    assert near_duplicate_groups(groups, hashes, 2) == ["L1", "L1", "L1", "L4", "L4", "L4"]
    # at distance 1 only L4 and L5's second image are linked; L3-L1 and L1-L2 are 2 bits apart
    assert near_duplicate_groups(groups, hashes, 1) == ["L3", "L1", "L2", "L4", "L4", "L4"]
    assert near_duplicate_groups(groups, hashes, -1) == groups  # off
    no_hashes = [None] * len(groups)
    assert near_duplicate_groups(groups, no_hashes, 64) == groups  # missing hashes never match each other
    with pytest.raises(ValueError, match="differ in length"):
        near_duplicate_groups(groups, hashes[:-1], 2)


def test_merged_groups_land_in_one_split_and_others_are_untouched():
    """Split by the merged keys, linked lesions share a split; without links the keys are the
    groups themselves, so the split is the plain lesion-grouped one."""
    rng = np.random.default_rng(0)
    n = 400
    labels = rng.choice(["nv", "mel", "bkl"], n)
    groups = [f"G{i:04d}" for i in range(n)]
    hashes = [_hash(set(rng.choice(256, 128, replace=False).tolist())) for _ in range(n)]
    cfg = SplitConfig()
    assert near_duplicate_groups(groups, hashes, 12) == groups  # random hashes are ~128 bits apart
    # 20 copies of other lesions' pictures, each as its own new lesion
    copies = rng.choice(n, 20, replace=False)
    labels2 = np.concatenate([labels, labels[copies]])
    groups2 = groups + [f"COPY{i:02d}" for i in range(20)]
    hashes2 = hashes + [hashes[i] for i in copies]
    keys = near_duplicate_groups(groups2, hashes2, 12)
    split = assign_splits(labels2, keys, cfg, 7)
    for k, i in enumerate(copies):
        assert keys[n + k] == keys[i] == min(groups[i], groups2[n + k]) and split[n + k] == split[i]
    without = assign_splits(labels2, groups2, cfg, 7)
    assert any(without[n + k] != without[i] for k, i in enumerate(copies))  # what the merge prevents
