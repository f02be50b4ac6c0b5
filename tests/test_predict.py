"""Predict stage: CSV contract on images of any size/mode, skipping unreadable files, the pure core."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from test_train import tiny_cfg

from pipeline.errors import DataError
from pipeline.labels import CLASSES

COLUMNS = ["image_id", "label", *CLASSES]


@pytest.fixture
def export_dir(tmp_path: Path) -> Path:
    """An exported (untrained, seeded) tiny inference model."""
    from pipeline.core.model import build_twin, count_parameters, inference_model
    from pipeline.core.selection import build_meta
    from pipeline.io.modelstore import export_inference

    cfg = tiny_cfg(tmp_path)
    torch.manual_seed(0)
    inf = inference_model(build_twin(cfg.model, 7), 0).eval()
    best = {"model_config": cfg.model.model_dump(mode="json"), "num_classes": 7, "image_size": 32, "epoch": 1,
            "val_loss_branch1": 0.1, "val_loss_branch2": 0.2}
    folder = tmp_path / "export"
    folder.mkdir()
    export_inference(inf, build_meta(best, 1, count_parameters(inf)), folder)
    return folder


def _images(folder: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sub").mkdir(exist_ok=True)
    files = {}
    rgb = rng.integers(0, 255, (45, 60, 3), dtype=np.uint8)
    files["rgb"] = folder / "rgb.png"
    Image.fromarray(rgb).save(files["rgb"])
    files["gray"] = folder / "sub" / "gray.png"
    Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8), mode="L").save(files["gray"])
    files["rgba"] = folder / "rgba.png"
    Image.fromarray(rng.integers(0, 255, (33, 31, 4), dtype=np.uint8), mode="RGBA").save(files["rgba"])
    files["deep"] = folder / "deep16.png"
    Image.fromarray(rng.integers(0, 65535, (40, 40), dtype=np.uint16)).save(files["deep"])
    files["cmyk"] = folder / "sub" / "cmyk.jpg"
    Image.fromarray(rgb).convert("CMYK").save(files["cmyk"], quality=90)
    files["big"] = folder / "big.jpeg"
    Image.fromarray(rng.integers(0, 255, (300, 500, 3), dtype=np.uint8)).save(files["big"])
    return files


def test_predict_csv_contract(tmp_path: Path, export_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.stages.predict import run_predict

    files = _images(tmp_path / "imgs")
    assert Image.open(files["deep"]).mode.startswith("I;16")
    assert Image.open(files["cmyk"]).mode == "CMYK"
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    out = tmp_path / "pred.csv"
    summary = run_predict(tiny_cfg(tmp_path), str(export_dir), str(tmp_path / "imgs"), str(out), None)
    assert summary["images"] == len(files) and summary["skipped"] == 1
    assert "broken.jpg" in capsys.readouterr().err
    df = pd.read_csv(out)
    assert list(df.columns) == COLUMNS
    assert sorted(df["image_id"]) == sorted(p.stem for p in files.values())
    probs = df[list(CLASSES)].to_numpy()
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    assert (probs >= 0).all()
    assert list(df["label"]) == [CLASSES[i] for i in probs.argmax(axis=1)]


def test_predict_proba_matches_stage_and_any_size(tmp_path: Path, export_dir: Path) -> None:
    from pipeline.core.inference import predict_proba
    from pipeline.io.images import load_rgb
    from pipeline.io.modelstore import load_exported
    from pipeline.stages.predict import run_predict

    files = _images(tmp_path / "imgs")
    exported = load_exported(export_dir)
    arrays = [np.asarray(load_rgb(p)) for p in files.values()]
    assert len({a.shape for a in arrays}) > 2
    probs = predict_proba(exported, arrays, 64)
    assert probs.shape == (len(arrays), 7)
    assert np.allclose(probs.sum(axis=1), 1.0)
    out = tmp_path / "p.csv"
    run_predict(tiny_cfg(tmp_path), str(export_dir), str(tmp_path / "imgs"), str(out))
    df = pd.read_csv(out).set_index("image_id")
    for p, row in zip(files.values(), probs, strict=True):
        assert np.allclose(df.loc[p.stem, list(CLASSES)].to_numpy(dtype=float), row, atol=1e-5)
    # single file input, grayscale array input
    one = run_predict(tiny_cfg(tmp_path), str(export_dir), str(files["rgb"]), str(tmp_path / "one.csv"))
    assert one["images"] == 1
    gray = predict_proba(exported, [np.zeros((10, 12), np.uint8)], 64)
    assert gray.shape == (1, 7)
    with pytest.raises(DataError, match="uint8"):
        predict_proba(exported, [np.zeros((10, 12, 3), np.float32)], 64)


def test_all_unreadable_is_an_error(tmp_path: Path, export_dir: Path) -> None:
    from pipeline.app.cli import main
    from pipeline.stages.predict import run_predict

    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"nope")
    (folder / "b.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="none of the 2"):
        run_predict(tiny_cfg(tmp_path), str(export_dir), str(folder), str(tmp_path / "x.csv"))
    assert not (tmp_path / "x.csv").exists()
    rc = main(["predict", "--set", f"paths.work_dir={tmp_path}", "--model", str(export_dir), "--images", str(folder),
               "--out", str(tmp_path / "x.csv")])
    assert rc == 1
    with pytest.raises(DataError, match="model folder not found"):
        run_predict(tiny_cfg(tmp_path), str(tmp_path / "missing"), str(folder), str(tmp_path / "x.csv"))


def test_registry_uri_and_cams(tmp_path: Path, export_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.stages.predict import run_predict

    seen = {}

    def download_model(uri: str, cfg: object) -> Path:
        seen["uri"] = uri
        return export_dir

    monkeypatch.setitem(sys.modules, "pipeline.io.registry", types.SimpleNamespace(download_model=download_model))
    files = _images(tmp_path / "imgs")
    cams = tmp_path / "cams"
    summary = run_predict(tiny_cfg(tmp_path), "models:/skin-twin@champion", str(tmp_path / "imgs"),
                          str(tmp_path / "p.csv"), str(cams))
    assert seen["uri"] == "models:/skin-twin@champion"
    assert summary["images"] == len(files)
    pngs = sorted(p.stem for p in cams.glob("*.png"))
    assert pngs == sorted(p.stem for p in files.values())
    assert sorted(p.name.removesuffix(".cam.npy") for p in cams.glob("*.cam.npy")) == pngs
    # drawn on the original picture at its own size: plain | overlay side by side under a caption
    for stem, (h, w) in {"rgb": (45, 60), "big": (300, 500), "rgba": (33, 31), "gray": (20, 20)}.items():
        cam = np.load(cams / f"{stem}.cam.npy")
        assert cam.shape == (h, w) and cam.dtype == np.float32 and 0 <= cam.min() and cam.max() <= 1
        with Image.open(cams / f"{stem}.png") as im:
            assert im.mode == "RGB" and im.size[0] >= 2 * w and im.size[1] > h
            panel = np.asarray(im)
        with Image.open(files[stem]) as src:
            from pipeline.core.imaging import to_rgb

            original = np.asarray(to_rgb(src))
        band = panel.shape[0] - h
        np.testing.assert_array_equal(panel[band:, :w], original)


def test_cam_follows_exif_orientation(tmp_path: Path, export_dir: Path) -> None:
    """A JPEG stored 40 x 60 (h x w) with EXIF orientation 6 is displayed 60 x 40: the map has the
    displayed shape, row 0 at the top of the picture as displayed, and is the map of that picture."""
    from pipeline.core.imaging import resize_square
    from pipeline.core.inference import cam_of
    from pipeline.io.images import load_rgb
    from pipeline.io.modelstore import load_exported
    from pipeline.stages.predict import run_predict

    rng = np.random.default_rng(3)
    stored = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    stored[:10, :15] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    folder = tmp_path / "exif"
    folder.mkdir()
    Image.fromarray(stored).save(folder / "turned.jpg", exif=exif.tobytes(), quality=95)
    cams = tmp_path / "cams"
    run_predict(tiny_cfg(tmp_path), str(export_dir), str(folder), str(tmp_path / "p.csv"), str(cams))
    cam = np.load(cams / "turned.cam.npy")
    shown = load_rgb(folder / "turned.jpg")
    assert shown.size == (40, 60) and cam.shape == (60, 40)
    exported = load_exported(export_dir)
    x = np.asarray(resize_square(shown, exported.image_size), dtype=np.uint8).transpose(2, 0, 1)
    label = int(pd.read_csv(tmp_path / "p.csv")["label"].map(CLASSES.index).iloc[0])
    expected, _, _ = cam_of(exported, x, label, (60, 40))
    np.testing.assert_allclose(cam, expected, atol=1e-6)
    with Image.open(cams / "turned.png") as im:
        assert im.size[1] > 60 and im.size[0] >= 80


def test_serving_threads_travel_with_the_logged_model_and_set_the_loading_process(
    tmp_path: Path, export_dir: Path
) -> None:
    import json

    import mlflow.pyfunc

    from pipeline.io.model_files import write_embedded
    from pipeline.io.pyfunc import SERVING_FILE, encode_png, save_model
    from pipeline.stages.predict import run_predict

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        save_model(tmp_path / "m1", export_dir, 8, cpu_threads=1)
        serving = tmp_path / "m1" / "data" / "export" / SERVING_FILE
        assert json.loads(serving.read_text()) == {"batch_size": 8, "cpu_threads": 1}
        loaded = mlflow.pyfunc.load_model(str(tmp_path / "m1"))
        assert torch.get_num_threads() == 1  # the serving process runs on the threads it was logged with
        frame = pd.DataFrame({"image": [encode_png(np.full((32, 32, 3), 90, np.uint8))]})
        assert loaded.predict(frame).shape == (1, 8)

        # a model logged before the knob (serving.json with batch_size only) leaves torch's threads alone
        torch.set_num_threads(2)
        serving.write_text(json.dumps({"batch_size": 8}) + "\n")
        with pytest.raises(DataError, match="data/export/serving.json: changed"):  # the loader checks its files
            mlflow.pyfunc.load_model(str(tmp_path / "m1"))
        write_embedded(tmp_path / "m1")  # as such a model would have been logged
        mlflow.pyfunc.load_model(str(tmp_path / "m1"))
        assert torch.get_num_threads() == 2

        # the predict stage takes predict.cpu_threads; 0 keeps the process's setting
        cfg = tiny_cfg(tmp_path / "w")
        images = tmp_path / "imgs"
        _images(images)
        run_predict(cfg, str(export_dir), str(images), str(tmp_path / "p0.csv"))
        assert torch.get_num_threads() == 2
        run_predict(cfg.with_overrides({"predict.cpu_threads": 1}), str(export_dir), str(images), str(tmp_path / "p1.csv"))
        assert torch.get_num_threads() == 1
        assert pd.read_csv(tmp_path / "p0.csv").equals(pd.read_csv(tmp_path / "p1.csv"))
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_served_over_http_by_mlflow_with_workers_predicts_like_the_export(tmp_path: Path, export_dir: Path) -> None:
    """The deployment the README describes: ``mlflow models serve --workers 2`` on a model logged
    with ``predict.cpu_threads: 1``, real processes and real HTTP."""
    import base64
    import json
    import urllib.error
    import urllib.request

    from mlflow_server import serve_model

    from pipeline.io.pyfunc import SkinTwinClassifier, encode_png, save_model

    save_model(tmp_path / "model", export_dir, 8, cpu_threads=1)
    server = serve_model(tmp_path / "model", tmp_path / "serve", workers=2)

    def post(rows: list[bytes]) -> tuple[int, dict]:
        body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(r).decode()] for r in rows]}}
        req = urllib.request.Request(f"{server.uri}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    try:
        rng = np.random.default_rng(3)
        images = [encode_png(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((32, 32), (45, 60), (200, 150))]
        want = SkinTwinClassifier(export_dir, 8).predict(pd.DataFrame({"image": images}))
        for _ in range(4):  # several requests, so both workers are likely to answer one
            status, got = post(images)
            assert status == 200
            frame = pd.DataFrame(got["predictions"])
            assert list(frame.columns) == ["label", *CLASSES]
            assert frame["label"].tolist() == want["label"].tolist()
            np.testing.assert_allclose(frame[list(CLASSES)].to_numpy(float), want[list(CLASSES)].to_numpy(float), atol=1e-6)
        status, err = post([b"not an image"])
        assert status >= 400 and "row 0: not a readable image" in json.dumps(err)
    finally:
        server.stop()
