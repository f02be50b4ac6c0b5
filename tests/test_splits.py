"""Grouped, stratified, seeded split assignment (pipeline.core.splits)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import SplitConfig
from pipeline.core.splits import assign_splits

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
