"""Speed of the patent's pair generator (``pipeline.core.pairs``) on large label arrays.

Measures, on HAM10000-like class frequencies (7 classes, nv ~67 %):

* ``loop``     -- the reference :func:`patent_partner_indices` called batch by batch (pure Python),
                  timed on a slice and extrapolated linearly to ``n`` (it is linear per batch);
* ``batched``  -- the vectorised :func:`patent_partner_indices_batched` on all ``n`` labels
                  (its result is checked against the loop on the slice);
* ``manifest`` -- :func:`build_pair_manifest` for one epoch of ``n`` images (shuffle, permutation,
                  fixed points, positive fraction, step-5 negatives, the DataFrame itself).

Best of ``--repeats`` runs. Prints a table and writes ``bench/results/pairs.json`` (gitignored).

    python bench/pairs_bench.py [--n 1000000] [--batch-size 32] [--repeats 3] [--loop-n 50000]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import PairsConfig  # noqa: E402
from pipeline.core.pairs import build_pair_manifest, patent_partner_indices, patent_partner_indices_batched
from pipeline.io.files import write_json  # noqa: E402
from pipeline.labels import CLASSES  # noqa: E402

# HAM10000 class shares (10015 images), in CLASSES order: akiec bcc bkl df mel nv vasc.
HAM_COUNTS = np.array([327, 514, 1099, 115, 1113, 6705, 142], dtype=np.float64)


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="labels / images (default 1,000,000)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--loop-n", type=int, default=50_000, help="slice timed for the reference loop")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "pairs.json"))
    args = ap.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    n, bs = args.n, args.batch_size
    codes = rng.choice(len(CLASSES), size=n, p=HAM_COUNTS / HAM_COUNTS.sum()).astype(np.int16)
    names = np.asarray(CLASSES, dtype=object)[codes]
    ids = np.array([f"ISIC_{i:08d}__a0" for i in range(n)], dtype=object)

    m = min(args.loop_n, n)
    m -= m % bs or 0
    sl = codes[:m]

    def loop() -> np.ndarray:
        return np.concatenate([patent_partner_indices(sl[i : i + bs]) + i for i in range(0, m, bs)])

    ref = loop()
    if not np.array_equal(ref, patent_partner_indices_batched(sl, bs)):
        raise SystemExit("batched result differs from the reference loop")
    t_loop_slice = _best(loop, args.repeats)
    t_loop = t_loop_slice * n / m
    t_batched = _best(lambda: patent_partner_indices_batched(codes, bs), args.repeats)
    t_batched_str = _best(lambda: patent_partner_indices_batched(names, bs), args.repeats)
    cfg = PairsConfig(epochs=1, batch_size=bs)
    t_manifest = _best(lambda: build_pair_manifest(ids, names, cfg, seed=args.seed), args.repeats)
    pairs = build_pair_manifest(ids, names, cfg, seed=args.seed)

    rows = [
        ("loop (reference, extrapolated)", t_loop, f"timed on {m:,} labels"),
        ("batched, int labels", t_batched, ""),
        ("batched, string labels", t_batched_str, "includes factorising the strings"),
        ("build_pair_manifest, 1 epoch", t_manifest, f"{len(pairs):,} pairs, positive {pairs['same'].mean():.3f}"),
    ]
    print(f"pairs bench: n={n:,} labels, batch_size={bs}, best of {args.repeats}")
    print(f"{'variant':34s} {'seconds':>9s} {'M labels/s':>11s}  note")
    for name, t, note in rows:
        print(f"{name:34s} {t:9.3f} {n / t / 1e6:11.2f}  {note}")
    print(f"speed-up batched vs loop: {t_loop / t_batched:,.0f}x")

    write_json(
        args.out,
        {
            "n": n,
            "batch_size": bs,
            "repeats": args.repeats,
            "loop_slice": m,
            "seconds": {
                "loop_extrapolated": t_loop,
                "batched_int": t_batched,
                "batched_str": t_batched_str,
                "manifest_one_epoch": t_manifest,
            },
            "speedup_batched_vs_loop": t_loop / t_batched,
            "manifest_pairs": int(len(pairs)),
            "manifest_positive_fraction": float(pairs["same"].mean()),
            "kinds": {str(k): int(v) for k, v in pairs["kind"].value_counts().items()},
            "machine": {"python": platform.python_version(), "numpy": np.__version__, "cpu": platform.processor(),
                        "platform": platform.platform()},
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
