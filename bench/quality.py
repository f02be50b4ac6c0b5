"""Quality benchmark: the twin model on real HAM10000 images next to two baselines.

    .venv/bin/python bench/quality.py [--data ../shared/data/ham10000-224] [--set key=value ...]

Runs the pipeline's own stages (ingest → validate → augment → pairs → train → select → evaluate)
with ``data.source=ham10000`` on the given folder into ``bench/results/quality/``, then trains, on
the **same** lesion-grouped split and the same augmented train images, two baselines:

* ``single_branch_ce`` — the same backbone (extractor + one branch, :func:`build_inference`) as a
  plain classifier with cross-entropy, same epochs/optimizer/schedule (does twin training help?);
* ``mobilenet_v3_small`` — torchvision MobileNetV3-Small from scratch (no downloaded weights).

Each baseline keeps its lowest-validation-loss epoch, like the twin (patent S2). All three are
scored on the test split with :func:`pipeline.core.metrics.classification_metrics`. Results: a table
on stdout and ``bench/results/quality.json`` (balanced accuracy, accuracy, macro AUC, parameter
counts, wall-clock seconds). Targets for the twin model (issue 3): BA ≥ 0.70, macro AUC ≥ 0.94,
inference model ≤ 1.0 M params, ≤ 30 min on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The benchmark's default config (on top of params.yaml); override with --set. Chosen on this
# 2-core CPU (see bench/README.md): 64 px, one augmented copy per image with class balancing up to
# 20 copies (rare classes get distinct augmented views, not repeats), the patent's unweighted
# focal loss (alpha null: balancing comes from the copies), 12 epochs.
BENCH_OVERRIDES: dict[str, object] = {
    "augment.image_size": 64,
    "augment.copies": 1,
    "augment.max_copies": 20,
    "pairs.epochs": 12,
    "train.epochs": 12,
    "train.batch_size": 64,
    "train.lr": 0.004,
    "loss.alpha": None,
    "train.progress": False,
    "validate.workers": 2,
    "augment.workers": 2,
}


def _train_baseline(model, x_train, y_train, x_val, y_val, cfg, seed: int) -> tuple[object, list[dict]]:
    """Plain cross-entropy training, lowest validation loss kept; same optimizer/schedule as the twin."""
    import torch
    import torch.nn.functional as F

    from pipeline.core.imaging import to_model_input
    from pipeline.core.training import build_optimizer, lr_factor

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    tc = cfg.train
    opt = build_optimizer(model.parameters(), tc)
    bs = tc.batch_size
    steps_per_epoch = max(1, len(x_train) // bs)
    total = steps_per_epoch * tc.epochs
    best_loss, best_state, history, step = float("inf"), None, [], 0
    xt, yt = torch.from_numpy(np.asarray(x_train)), torch.from_numpy(y_train).long()
    xv, yv = torch.from_numpy(np.asarray(x_val)), torch.from_numpy(y_val).long()
    for epoch in range(tc.epochs):
        model.train()
        order = torch.randperm(len(xt), generator=gen)
        for b in range(steps_per_epoch):
            idx = order[b * bs : (b + 1) * bs]
            x = to_model_input(xt[idx])
            if tc.online_flip:
                if torch.rand(1, generator=gen).item() < 0.5:
                    x = x.flip(3)
                if torch.rand(1, generator=gen).item() < 0.5:
                    x = x.flip(2)
            for g in opt.param_groups:
                g["lr"] = tc.lr * lr_factor(step, total, 0, tc.schedule)
            loss = F.cross_entropy(model(x), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        model.eval()
        with torch.no_grad():
            val_loss = sum(
                F.cross_entropy(model(to_model_input(xv[i : i + 256])), yv[i : i + 256], reduction="sum").item()
                for i in range(0, len(xv), 256)
            ) / len(xv)
        history.append({"epoch": epoch + 1, "val_loss": val_loss})
        print(f"    epoch {epoch + 1}: val_loss {val_loss:.4f}", flush=True)
        if val_loss < best_loss:
            best_loss, best_state = val_loss, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return model.eval(), history


def _probs(model, x) -> np.ndarray:
    import torch

    from pipeline.core.imaging import to_model_input

    out = []
    with torch.no_grad():
        for i in range(0, len(x), 256):
            out.append(torch.softmax(model(to_model_input(torch.from_numpy(np.asarray(x[i : i + 256])))), 1).numpy())
    return np.concatenate(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ham10000-224"))
    ap.add_argument("--work", default=str(ROOT / "bench" / "results" / "quality"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="key=value")
    ap.add_argument("--skip-baselines", action="store_true")
    ns = ap.parse_args(argv)
    data = Path(ns.data)
    if not (data / "HAM10000_metadata.csv").is_file():
        print(f"skip: {data} has no HAM10000_metadata.csv (real data not available here)")
        return 0

    import torch
    import torchvision

    from pipeline.config import load_config, parse_override
    from pipeline.core.metrics import classification_metrics
    from pipeline.core.model import build_inference, count_parameters
    from pipeline.io.imagecache import load_image_cache
    from pipeline.labels import CLASS_TO_INDEX
    from pipeline.layout import Layout
    from pipeline.stages.augment import run_augment
    from pipeline.stages.evaluate import run_evaluate
    from pipeline.stages.ingest import run_ingest
    from pipeline.stages.pairs import run_pairs
    from pipeline.stages.select import run_select
    from pipeline.stages.train import run_train
    from pipeline.stages.validate import run_validate

    overrides = dict(BENCH_OVERRIDES)
    overrides.update({"data.source": "ham10000", "data.root": str(data.resolve()), "paths.work_dir": ns.work})
    overrides.update(dict(parse_override(o) for o in ns.overrides))
    cfg = load_config(ROOT / "params.yaml", overrides)
    layout = Layout.from_config(cfg)
    times: dict[str, float] = {}

    t_all = time.perf_counter()
    for name, fn in [
        ("ingest", run_ingest),
        ("validate", run_validate),
        ("augment", run_augment),
        ("pairs", run_pairs),
        ("train", run_train),
        ("select", run_select),
        ("evaluate", run_evaluate),
    ]:
        t0 = time.perf_counter()
        print(f"[quality] {name} ...", flush=True)
        fn(cfg)
        times[name] = round(time.perf_counter() - t0, 1)
    twin_seconds = round(time.perf_counter() - t_all, 1)
    twin = json.loads(layout.metrics.read_text())
    results = {
        "twin": {
            "balanced_accuracy": twin["balanced_accuracy"],
            "accuracy": twin["accuracy"],
            "macro_auc": twin["macro_auc"],
            "params_inference": twin["params_inference"],
            "params_train": twin["params_train"],
            "selected_branch": twin["selected_branch"],
            "seconds_end_to_end": twin_seconds,
        }
    }

    if not ns.skip_baselines:
        import pandas as pd

        man = pd.read_parquet(layout.augmented_manifest)
        size = cfg.augment.image_size

        def arrays(split: str):
            df = man[man["split"] == split].sort_values("image_id")
            paths = [layout.augmented_dir / p for p in df["path"]]
            cache = load_image_cache(list(df["image_id"]), paths, size, layout.cache_dir, name=f"bench_{split}",
                                     workers=cfg.evaluate.cache_workers)
            return cache.array, df["label"].map(CLASS_TO_INDEX).to_numpy()

        (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = arrays("train"), arrays("val"), arrays("test")
        baselines = {
            "single_branch_ce": lambda: build_inference(cfg.model),
            "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(weights=None, num_classes=7),
        }
        for name, make in baselines.items():
            print(f"[quality] baseline {name} ...", flush=True)
            t0 = time.perf_counter()
            torch.manual_seed(cfg.seed)
            model, history = _train_baseline(make(), x_tr, y_tr, x_va, y_va, cfg, cfg.seed)
            m = classification_metrics(y_te, _probs(model, x_te))
            results[name] = {
                "balanced_accuracy": m["balanced_accuracy"],
                "accuracy": m["accuracy"],
                "macro_auc": m["macro_auc"],
                "params_inference": count_parameters(model),
                "seconds_train": round(time.perf_counter() - t0, 1),
            }

    out = {
        "data": str(data),
        "config_overrides": {k: v for k, v in overrides.items() if k != "paths.work_dir"},
        "stage_seconds": times,
        "torch_threads": torch.get_num_threads(),
        "results": results,
        "targets_twin": {"balanced_accuracy": 0.70, "macro_auc": 0.94, "params_inference": 1_000_000, "minutes": 30},
    }
    dest = ROOT / "bench" / "results" / "quality.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\n{'model':<20} {'BA':>7} {'acc':>7} {'mAUC':>7} {'params':>10} {'seconds':>8}")
    for name, r in results.items():
        secs = r.get("seconds_end_to_end", r.get("seconds_train"))
        print(
            f"{name:<20} {r['balanced_accuracy']:>7.3f} {r['accuracy']:>7.3f} {r['macro_auc']:>7.3f} "
            f"{r['params_inference']:>10,} {secs:>8}"
        )
    print(f"\nwritten {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
