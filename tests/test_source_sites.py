"""Acquisition sources (``source_site``) through ingest, the ``holdout_sources`` split mode and several
data sources in one run (``data.sources``), on small project-made fixtures."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from test_sources import textured_image

from pipeline.config import SyntheticConfig
from pipeline.core.schema import MANIFEST_COLUMNS
from pipeline.core.synthetic import plan, site_of
from pipeline.errors import DataError
from pipeline.io.readers import read_ham10000
from pipeline.stages.ingest import build_manifest, run_ingest, with_sites
from pipeline.stages.synthesize import run_synthesize

HAM_HEADER = "lesion_id,image_id,dx,dx_type,age,sex,localization,dataset\n"


def _jpeg(path: Path, colour: tuple[int, int, int] = (150, 90, 60)) -> None:
    """A small JPEG of its own picture (a pattern seeded by the file name, tinted ``colour``): distinct
    files are distinct pictures, as ingest's near-duplicate grouping expects of real data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    textured_image(path.name, (40, 30), colour).save(path, format="JPEG", quality=90)


def make_ham(root: Path, rows: list[tuple[str, str, str, str]], images: bool = True) -> Path:
    """HAM10000 layout with (lesion_id, image_id, dx, dataset) rows."""
    root.mkdir(parents=True, exist_ok=True)
    text = HAM_HEADER + "".join(f"{les},{img},{dx},histo,50.0,male,back,{site}\n" for les, img, dx, site in rows)
    (root / "HAM10000_metadata.csv").write_text(text, encoding="utf-8")
    if images:
        for i, (_, img, _, _) in enumerate(rows):
            _jpeg(root / "images" / f"{img}.jpg", (40 + i % 200, 90, 60))
    return root


def test_ham_dataset_column_becomes_source_site(tmp_path: Path, tiny_config):
    root = make_ham(tmp_path / "ham", [("L1", "A", "nv", "rosendahl"), ("L2", "B", "mel", " vidir_modern "),
                                       ("L3", "C", "bkl", "")])  # fmt: skip
    table = read_ham10000(root)
    assert table["source_site"].tolist() == ["rosendahl", "vidir_modern", ""]
    manifest = build_manifest(table, root, tiny_config.with_overrides({"data.source": "ham10000"}))
    assert tuple(manifest.columns) == MANIFEST_COLUMNS
    assert manifest["source_site"].tolist() == ["rosendahl", "vidir_modern", "ham10000"]  # blank -> source name


def test_reader_without_sites_gets_the_source_name():
    table = pd.DataFrame({"image_id": ["a"], "path": ["a.jpg"], "label": ["nv"], "group_id": ["a"]})
    assert with_sites(table, "isic_csv")["source_site"].tolist() == ["isic_csv"]
    assert "source_site" not in table.columns  # not modified in place


def test_synthetic_sites_round_robin_by_lesion():
    cfg = SyntheticConfig(images_per_class=6, images_per_lesion=2, sites=3)
    items = plan(cfg)
    sites = {it.lesion_id: site_of(it, cfg.sites) for it in items}
    assert set(sites.values()) == {"synthetic_1", "synthetic_2", "synthetic_3"}
    for it in items:  # every view of a lesion shares its site
        assert site_of(it, cfg.sites) == sites[it.lesion_id]
    assert {site_of(it) for it in items} == {"synthetic"}  # one site: the historical value


def test_synthetic_sites_reach_the_manifest(tiny_config):
    cfg = tiny_config.with_overrides({"synthetic.sites": 2})
    run_synthesize(cfg)
    run_ingest(cfg)
    manifest = pd.read_parquet(Path(cfg.paths.work_dir) / "data" / "manifest.parquet")
    assert sorted(manifest["source_site"].unique()) == ["synthetic_1", "synthetic_2"]
    assert (manifest.groupby("source_site")["label"].nunique() == 7).all()


def test_ingest_holdout_sources(tmp_path: Path, tiny_config):
    rows = [(f"L{i}", f"IMG_{i:03d}", cls, site)
            for i, (cls, site) in enumerate((c, s) for s in ("rosendahl", "vidir_modern", "vienna_dias")
                                            for c in ("nv", "mel", "bkl") for _ in range(4))]  # fmt: skip
    root = make_ham(tmp_path / "ham", rows)
    cfg = tiny_config.with_overrides({"data.source": "ham10000", "data.root": str(root),
                                      "data.split.holdout_sources": ["vidir_modern"]})  # fmt: skip
    summary = run_ingest(cfg)
    manifest = pd.read_parquet(Path(cfg.paths.work_dir) / "data" / "manifest.parquet")
    assert set(manifest.loc[manifest["split"] == "test", "source_site"]) == {"vidir_modern"}
    assert (manifest.loc[manifest["source_site"] == "vidir_modern", "split"] == "test").all()
    assert summary["per_split"]["test"] == 12 and summary["per_site"]["vidir_modern"] == 12
    with pytest.raises(DataError, match=r"unknown source site\(s\) \['vidir_old'\]"):
        run_ingest(cfg.with_overrides({"data.split.holdout_sources": ["vidir_old"]}))


# ---------------------------------------------------------------------------------------------
# Several data sources in one run (data.source: multi + data.sources)
# ---------------------------------------------------------------------------------------------
def _two_sources(tmp_path: Path) -> tuple[Path, Path]:
    ham = make_ham(tmp_path / "shared" / "ham", [(f"L{i}", f"IMG_{i:03d}", c, s) for i, (c, s) in enumerate(
        [(c, s) for s in ("rosendahl", "vidir_modern") for c in ("nv", "mel", "bkl") for _ in range(3)])])
    # a second HAM-layout folder without a dataset column and one id that collides with the first
    extra = tmp_path / "shared" / "extra" / "isic"
    extra.mkdir(parents=True)
    (extra / "HAM10000_metadata.csv").write_text(
        "lesion_id,image_id,dx\n" + "".join(f"X{i},{'IMG_000' if i == 0 else f'EXT_{i}'},nv\n" for i in range(4)))
    for i in range(4):
        _jpeg(extra / "images" / f"{'IMG_000' if i == 0 else f'EXT_{i}'}.jpg", (200, 40 + 30 * i, 60))
    return ham, extra


def test_multi_source_manifest(tmp_path: Path, tiny_config):
    ham, extra = _two_sources(tmp_path)
    cfg = tiny_config.with_overrides({"data.source": "multi", "data.sources": [
        {"source": "ham10000", "root": str(ham)}, {"source": "ham10000", "root": str(extra), "name": "isic_archive"}]})
    from pipeline.io.readers import data_root

    assert data_root(cfg) == (tmp_path / "shared").resolve()  # the common root
    summary = run_ingest(cfg)
    m = pd.read_parquet(Path(cfg.paths.work_dir) / "data" / "manifest.parquet").set_index("image_id")
    assert summary["rows"] == 22 and summary["unreadable"] == 0
    # colliding id prefixed in both entries; paths relative to the common root
    assert {"ham__IMG_000", "isic_archive__IMG_000"} <= set(m.index) and "IMG_000" not in m.index
    assert m.loc["ham__IMG_000", "path"] == "ham/images/IMG_000.jpg"
    assert m.loc["isic_archive__IMG_000", "path"] == "extra/isic/images/IMG_000.jpg"
    assert m.loc["EXT_1", "source_site"] == "isic_archive"  # no dataset column -> entry name
    assert m.loc["IMG_005", "source_site"] == "rosendahl"
    assert summary["per_site"] == {"isic_archive": 4, "rosendahl": 9, "vidir_modern": 9}
    assert [s["name"] for s in summary["sources"]] == ["ham", "isic_archive"]


def test_multi_source_with_holdout_and_validate(tmp_path: Path, tiny_config):
    ham, extra = _two_sources(tmp_path)
    cfg = tiny_config.with_overrides({
        "data.source": "multi", "data.split.holdout_sources": ["vidir_modern"], "validate.min_train_per_class": 1,
        "data.sources": [{"source": "ham10000", "root": str(ham)}, {"source": "ham10000", "root": str(extra)}]})
    run_ingest(cfg)
    m = pd.read_parquet(Path(cfg.paths.work_dir) / "data" / "manifest.parquet")
    assert set(m.loc[m["split"] == "test", "source_site"]) == {"vidir_modern"}
    from pipeline.core.checks import build_tables
    from pipeline.io.imagefacts import gather_facts
    from pipeline.io.readers import data_root

    facts = gather_facts(m, data_root(cfg), cfg.validate_cfg)
    images = build_tables(facts)["images"]
    assert images["exists"].all() and images["inside_root"].all() and images["decodes"].all()


def test_multi_source_config_rules(tmp_path: Path):
    from conftest import ROOT

    from pipeline.app.params import load_params
    from pipeline.config import ConfigError

    params = ROOT / "params.yaml"
    with pytest.raises(ConfigError, match=r"data.sources\[1\].source: unknown source 'clinic'"):
        load_params(params, {"data.source": "multi", "data.sources": [
            {"source": "ham10000", "root": "a"}, {"source": "clinic", "root": "b"}]})
    with pytest.raises(ConfigError, match=r"data.sources\[0\].csv: must be set for source 'isic_csv'"):
        load_params(params, {"data.source": "multi", "data.sources": [{"source": "isic_csv", "root": "a"}]})
    with pytest.raises(ConfigError, match="data.source: must be 'multi' when data.sources is set"):
        load_params(params, {"data.sources": [{"source": "ham10000", "root": "a"}]})
    with pytest.raises(ConfigError, match="data.root: must be null with data.source='multi'"):
        load_params(params, {"data.source": "multi", "data.root": "x", "data.sources": [{"source": "ham10000", "root": "a"}]})
    with pytest.raises(ConfigError, match=r"entry name\(s\) \['x'\] used twice"):
        load_params(params, {"data.source": "multi", "data.sources": [
            {"source": "ham10000", "root": "a/x"}, {"source": "ham10000", "root": "b/x"}]})
    # relative roots and csvs are relative to the params file's folder, like data.root
    cfg = load_params(params, {"data.source": "multi", "data.sources": [
        {"source": "isic_csv", "root": "d/isic", "csv": "gt.csv"}]})
    assert cfg.data.sources[0].root == str(ROOT / "d" / "isic") and cfg.data.sources[0].csv == str(ROOT / "gt.csv")


def test_multi_source_dvc_deps_and_provenance(tmp_path: Path, tiny_config):
    from pipeline.app.dvcgen import data_deps
    from pipeline.layout import Layout

    ham, extra = _two_sources(tmp_path)
    cfg = tiny_config.with_overrides({"data.source": "multi", "data.sources": [
        {"source": "ham10000", "root": str(ham)}, {"source": "ham10000", "root": str(extra), "name": "isic"}]})
    assert data_deps(cfg, tmp_path, Layout.from_config(cfg)) == ["shared/ham", "shared/extra/isic"]
    from pipeline.io.provenance import TAG, lineage_tags

    tags = lineage_tags(cfg, project_root=tmp_path)
    assert tags[f"{TAG}data_source"] == "multi" and tags[f"{TAG}data_root"] == str((tmp_path / "shared").resolve())
    assert tags[f"{TAG}data_roots"] == f"ham=ham10000:{ham}; isic=ham10000:{extra}"
    assert f"{TAG}data_roots" not in lineage_tags(tiny_config, project_root=tmp_path)  # one source: as before
