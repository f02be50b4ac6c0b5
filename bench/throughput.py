"""Throughput of the twin network: training pairs/s and inference ms/image (batch 1 and 256), and
batch 1 through the whole predict path (colour constancy, TTA, decision rule: ``predict path``).

Uses the model config of ``params.yaml`` at ``augment.image_size`` on random inputs (the data
pipeline is not measured: training reads a decoded uint8 cache; the training row runs the train
stage's :class:`pipeline.core.training.Trainer` on such uint8 batches, its online flips included).
Runs on CPU and, when present, on CUDA. The training and plain inference rows use training's AMP /
channels_last choices (:mod:`pipeline.io.compute`); the inference rows run the network with its
batch norm folded into the convs, as every inference path does
(:func:`pipeline.core.model.fold_batch_norm`); the predict-path row runs the model as predict,
pyfunc and evaluate load it (float32, BN folded, channels-last:
:func:`pipeline.core.inference.inference_ready`). ``--unfolded`` runs the inference rows with the
plain eval-mode network instead (what the fold saves). Prints a table and writes
``bench/results/throughput.json`` (gitignored).

    python bench/throughput.py [--params params.yaml] [--set k=v ...] [--steps 20] [--device cpu] [--unfolded]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import load_config  # noqa: E402
from pipeline.core.model import build_twin, count_parameters, fold_batch_norm, inference_model  # noqa: E402
from pipeline.core.training import Trainer, build_optimizer, flip_transform, twin_loss  # noqa: E402
from pipeline.io.compute import resolve_device  # noqa: E402
from pipeline.io.files import write_json  # noqa: E402
from pipeline.labels import NUM_CLASSES  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Seconds for ``iters`` calls of ``fn`` after ``warmup`` untimed ones (CUDA synchronised)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return time.perf_counter() - t0


def bench_train(cfg, device_name: str, steps: int, warmup: int) -> dict:
    ds = resolve_device(cfg.train.model_copy(update={"device": device_name}))
    torch.manual_seed(0)
    twin = build_twin(cfg.model, NUM_CLASSES).to(ds.device)
    if ds.channels_last:
        twin.to(memory_format=torch.channels_last)
    twin.train()
    opt = build_optimizer(twin.parameters(), cfg.train)
    scaler = torch.amp.GradScaler("cuda", enabled=ds.grad_scaler)
    bs, s = cfg.train.batch_size, cfg.augment.image_size
    u1 = torch.randint(0, 256, (bs, 3, s, s), dtype=torch.uint8)  # host uint8 batches, as the cache gives them
    u2 = torch.randint(0, 256, (bs, 3, s, s), dtype=torch.uint8)
    y1 = torch.randint(0, NUM_CLASSES, (bs,), device=ds.device)
    y2 = torch.randint(0, NUM_CLASSES, (bs,), device=ds.device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    trainer = Trainer(twin, twin, twin_loss(cfg.loss, None), opt, sched, scaler, ds, torch.Generator().manual_seed(0),
                      transform=flip_transform(cfg.train))  # fmt: skip

    def step() -> None:  # one optimizer step of the train stage's loop on one pair batch
        trainer.train_epoch(iter([(u1.clone(), u2.clone(), y1, y2)]), 0)

    dt = _timed(step, ds.device, warmup, steps)
    return {"device": ds.describe(), "batch_pairs": bs, "steps": steps, "pairs_per_s": bs * steps / dt}


@torch.no_grad()
def bench_infer(cfg, device_name: str, batch: int, iters: int, warmup: int, fold: bool = True) -> dict:
    ds = resolve_device(cfg.train.model_copy(update={"device": device_name}))
    torch.manual_seed(0)
    model = inference_model(build_twin(cfg.model, NUM_CLASSES), 0).eval().to(ds.device)
    model = fold_batch_norm(model) if fold else model
    if ds.channels_last:
        model.to(memory_format=torch.channels_last)
    s = cfg.augment.image_size
    x = torch.randn(batch, 3, s, s, device=ds.device)
    if ds.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for _ in range(warmup):
        with ds.autocast():
            model(x)
    _sync(ds.device)
    t0 = time.perf_counter()
    for _ in range(iters):
        with ds.autocast():
            model(x)
    _sync(ds.device)
    dt = time.perf_counter() - t0
    return {"device": ds.describe(), "batch": batch, "iters": iters, "ms_per_image": dt / (iters * batch) * 1000,
            "images_per_s": iters * batch / dt, "bn_folded": fold}


def bench_pipeline_infer(cfg, device_name: str, iters: int, warmup: int, fold: bool = True) -> dict:
    """Batch 1 through the shared inference path that predict, pyfunc and evaluate use: the export's
    colour constancy (``augment.color_constancy``), test-time augmentation (``select.tta``), the
    calibration (``select.calibration``) and a decision rule with per-class offsets, from a uint8
    image at the model size to a class index (``fold=False``: the network without its BN folded)."""
    import numpy as np
    from types import SimpleNamespace

    from pipeline.core.calibration import calibration_meta
    from pipeline.core.decision import decision_meta
    from pipeline.core.inference import inference_ready, predict_batch_uint8, predicted_labels

    ds = resolve_device(cfg.train.model_copy(update={"device": device_name}))
    torch.manual_seed(0)
    plain = inference_model(build_twin(cfg.model, NUM_CLASSES), 0).to(ds.device)
    model = inference_ready(plain) if fold else plain.eval().to(memory_format=torch.channels_last)
    s = cfg.augment.image_size
    meta = {"num_classes": NUM_CLASSES, "tta": cfg.select.tta,
            "preprocess": {"color_constancy": cfg.augment.color_constancy, "sog_power": cfg.augment.sog_power},
            "decision": decision_meta(np.linspace(-0.5, 0.5, NUM_CLASSES))}  # fmt: skip
    if cfg.select.calibration != "none":  # a fitted map costs the same whatever its numbers
        bias = np.linspace(-0.3, 0.3, NUM_CLASSES) if cfg.select.calibration == "temperature_bias" else np.zeros(NUM_CLASSES)
        meta["calibration"] = calibration_meta(cfg.select.calibration, 0.9, bias)
    exported = SimpleNamespace(model=model, meta=meta)
    img = np.random.default_rng(0).integers(0, 256, (1, 3, s, s), dtype=np.uint8)

    def once() -> None:
        with torch.inference_mode():
            predicted_labels(exported, predict_batch_uint8(exported, img, 1))

    dt = _timed(once, ds.device, warmup, iters)
    # the predict path runs the export as loaded: float32, BN folded, channels-last (no autocast)
    return {"device": f"{ds.device} fp32 channels_last", "batch": 1, "iters": iters, "ms_per_image": dt / iters * 1000,
            "color_constancy": cfg.augment.color_constancy, "tta": cfg.select.tta,
            "calibration": cfg.select.calibration, "decision": "offsets", "bn_folded": fold}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--steps", type=int, default=20, help="timed training steps")
    ap.add_argument("--device", action="append", choices=["cpu", "cuda"], help="default: cpu, and cuda when present")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "throughput.json"))
    ap.add_argument("--unfolded", action="store_true", help="inference rows without folding BN into the convs")
    ns = ap.parse_args(argv)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    cfg = load_config(ns.params, ns.overrides)
    devices = ns.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    twin = build_twin(cfg.model, NUM_CLASSES)
    result = {
        "image_size": cfg.augment.image_size,
        "params_train": count_parameters(twin),
        "params_inference": count_parameters(inference_model(twin, 0)),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "runs": [],
    }
    for dev in devices:
        fast = dev == "cuda"
        tr = bench_train(cfg, dev, ns.steps * (5 if fast else 1), warmup=10 if fast else 3)
        result["runs"].append({"kind": "train", **tr})
        for batch in (1, 256):
            iters = (200 if batch == 1 else 20) if fast else (50 if batch == 1 else 3)
            row = bench_infer(cfg, dev, batch, iters, warmup=10 if fast else 2, fold=not ns.unfolded)
            result["runs"].append({"kind": "infer", **row})
        row = bench_pipeline_infer(cfg, dev, 200 if fast else 50, warmup=5, fold=not ns.unfolded)
        result["runs"].append({"kind": "pipeline", **row})
    print(f"params: train {result['params_train']:,}  inference {result['params_inference']:,}  "
          f"image {result['image_size']}px  torch {result['torch']}  threads {result['cpu_threads']}  "
          f"BN {'not folded' if ns.unfolded else 'folded'}")
    print(f"{'what':<22}{'device':<30}{'value':>14}")
    for r in result["runs"]:
        if r["kind"] == "train":
            print(f"{'train (batch ' + str(r['batch_pairs']) + ')':<22}{r['device']:<30}{r['pairs_per_s']:>10.1f} pairs/s")
        elif r["kind"] == "pipeline":
            what = f"predict path b1 (cc={r['color_constancy']}, tta={r['tta']}, rule)"
            print(f"{what:<22}\n{'':<22}{r['device']:<30}{r['ms_per_image']:>10.3f} ms/img")
        else:
            print(f"{'infer batch ' + str(r['batch']):<22}{r['device']:<30}{r['ms_per_image']:>10.3f} ms/img")
    write_json(ns.out, result)
    print(f"wrote {ns.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
