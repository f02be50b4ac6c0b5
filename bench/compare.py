"""Two quality-benchmark runs on the same images, paired: run A minus run B.

    .venv/bin/python bench/compare.py WORK_A WORK_B [--samples 1000] [--level 0.95] [--seed 42] [--out FILE]
        [--by-split] [--sets test,external]

``WORK_A`` and ``WORK_B`` are the ``--work`` folders of two ``bench/quality.py`` runs, e.g. a trial
and the committed recipe. ``bench/quality.py`` keeps every model's labels and probabilities in
``<work>/<data>-<split>/reports/bench/predictions_<model>_<set>.csv`` (``set``: ``test`` or
``external``). For each such file that both runs have, this checks that both scored the same images
with the same true classes and prints A minus B for balanced accuracy (each run's own decided
labels), accuracy and macro AUC: the difference on all images, its paired-bootstrap interval and
the share of resamples in which A is ahead (:func:`pipeline.core.metrics.paired_differences`; class
stratified, so each class keeps its count).

Why paired: a single held-out figure carries a test-sampling interval of about ±0.055 BA on its own
(bench/README.md, trials 31–34), so two runs' separate intervals overlap even where one model is
ahead on the same images; scoring both on the same resamples resolves far smaller differences.
The interval is over test images only, not over training seeds or machines.

The same split seed and split mode give the same test images. Files that differ in images or true
classes are an error naming both files (exit 2), as is a pair of folders with no file in common.

Runs on other training data (``--isic-only``: run folder ``ham10000+isic-holdout``, not
``ham10000-holdout``) pair with ``--by-split``, which matches run folders by their split (the part
of the folder name after the last ``-``; two folders of one run with the same split are an error).
The held-out source is the same test set with or without extra training data; a random split is
not (the extra images join the split), so pair such runs on ``--sets external`` only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.core.evaluation import PREDICTION_COLUMNS  # noqa: E402
from pipeline.errors import DataError  # noqa: E402
from pipeline.labels import CLASS_TO_INDEX, CLASSES  # noqa: E402

PATTERN = "*/reports/bench/predictions_*.csv"
SETS = ("test", "external")
KEYS = ("balanced_accuracy", "accuracy", "macro_auc")


def prediction_files(work: Path, by_split: bool = False, sets: tuple[str, ...] = SETS) -> dict[tuple[str, str, str], Path]:
    """``{(run folder, model, set): path}`` of the prediction files of ``sets`` under one ``--work``
    folder; with ``by_split`` the run folder is named by its split alone (``ham10000+isic-holdout``
    -> ``holdout``), and two run folders with one split are an error."""
    found: dict[tuple[str, str, str], Path] = {}
    for path in sorted(Path(work).glob(PATTERN)):
        model, _, kind = path.stem.removeprefix("predictions_").rpartition("_")
        if not model or kind not in sets:
            continue
        run = path.parents[2].name
        key = (run.rpartition("-")[2] if by_split else run, model, kind)
        if key in found:
            raise DataError(f"{work}: {found[key].parents[2].name} and {run} are both split {key[0]!r}; "
                            "--by-split needs one run folder per split")  # fmt: skip
        found[key] = path
    return found


def read_predictions(path: Path) -> pd.DataFrame:
    """A prediction file, checked: every column, known classes, probabilities in [0, 1], unique ids."""
    try:
        df = pd.read_csv(path, dtype={"image_id": str, "label": str, "predicted": str})
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the prediction file ({exc})") from exc
    missing = [c for c in PREDICTION_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing columns {missing}")
    unknown = sorted(set(df["label"]).union(df["predicted"]) - set(CLASSES))
    if unknown:
        raise DataError(f"{path}: unknown classes {unknown[:5]}")
    probs = df[list(CLASSES)].to_numpy(dtype=np.float64)
    if not np.isfinite(probs).all() or (probs < 0).any() or (probs > 1).any():
        raise DataError(f"{path}: probabilities must be finite and within [0, 1]")
    if df["image_id"].duplicated().any():
        raise DataError(f"{path}: image {df['image_id'][df['image_id'].duplicated()].iloc[0]!r} appears twice")
    return df


def paired(a: pd.DataFrame, b: pd.DataFrame, path_a: Path, path_b: Path, samples: int, level: float,
           seed: int) -> dict[str, dict]:
    """A minus B on the same images (rows matched by ``image_id``), for :data:`KEYS`."""
    from pipeline.core.metrics import paired_differences

    only_a, only_b = set(a["image_id"]) - set(b["image_id"]), set(b["image_id"]) - set(a["image_id"])
    if only_a or only_b:
        raise DataError(f"{path_a} and {path_b} score different images ({len(only_a)} only in the first, "
                        f"{len(only_b)} only in the second, e.g. {sorted(only_a or only_b)[0]!r}): "
                        "not the same split, so they cannot be paired")  # fmt: skip
    b = b.set_index("image_id").loc[a["image_id"]].reset_index()
    differ = (a["label"].to_numpy() != b["label"].to_numpy()).nonzero()[0]
    if differ.size:
        raise DataError(f"{path_a} and {path_b} give image {a['image_id'].iloc[differ[0]]!r} different true classes")
    y = a["label"].map(CLASS_TO_INDEX).to_numpy()
    diff = paired_differences(y, a[list(CLASSES)].to_numpy(), b[list(CLASSES)].to_numpy(),
                              a["predicted"].map(CLASS_TO_INDEX).to_numpy(),
                              b["predicted"].map(CLASS_TO_INDEX).to_numpy(), samples, level, seed)  # fmt: skip
    return {k: diff[k] for k in KEYS}


def compare(work_a: Path, work_b: Path, samples: int = 1000, level: float = 0.95, seed: int = 42, *,
            by_split: bool = False, sets: tuple[str, ...] = SETS) -> list[dict]:
    """One row per prediction file both folders hold: run folder (its split with ``by_split``),
    model, set, images, A - B per key; only the files of ``sets``."""
    fa, fb = prediction_files(work_a, by_split, sets), prediction_files(work_b, by_split, sets)
    common = sorted(set(fa) & set(fb))
    if not common:
        raise DataError(f"{work_a} and {work_b} have no prediction file in common ({PATTERN}; "
                        f"{len(fa)} and {len(fb)} files): run bench/quality.py with --work on both")  # fmt: skip
    rows = []
    for key in common:
        a, b = read_predictions(fa[key]), read_predictions(fb[key])
        rows.append({"run": key[0], "model": key[1], "set": key[2], "n": len(a), "level": level, "samples": samples,
                     "a_minus_b": paired(a, b, fa[key], fb[key], samples, level, seed)})  # fmt: skip
    return rows


def format_rows(rows: list[dict]) -> str:
    """The table: per row and key, ``difference (low to high), share of resamples with A ahead``."""
    pct = f"{100 * rows[0]['level']:g} %" if rows else ""
    head = f"{'run':<18} {'model':<19} {'set':<9} {'n':>5} " + " ".join(f"{k:>30}" for k in KEYS)
    lines = [f"A minus B on the same images ({pct} paired-bootstrap interval, share of resamples with A ahead)", head]
    for r in rows:
        cells = []
        for k in KEYS:
            d = r["a_minus_b"][k]
            lo, hi = d["interval"]
            cells.append(f"{d['difference']:+.3f} ({lo:+.3f} to {hi:+.3f}) {100 * d['a_better']:3.0f}%".rjust(30))
        lines.append(f"{r['run']:<18} {r['model']:<19} {r['set']:<9} {r['n']:>5} " + " ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work_a", type=Path, help="--work folder of run A (e.g. the trial)")
    ap.add_argument("work_b", type=Path, help="--work folder of run B (e.g. the committed recipe)")
    ap.add_argument("--samples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    ap.add_argument("--level", type=float, default=0.95, help="interval level (default 0.95)")
    ap.add_argument("--seed", type=int, default=42, help="seed of the resamples (default 42)")
    ap.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    ap.add_argument("--by-split", action="store_true",
                    help="match run folders by split alone (runs on other training data, e.g. --isic-only)")
    ap.add_argument("--sets", default=",".join(SETS), help=f"comma list of the sets to pair (default {','.join(SETS)})")
    ns = ap.parse_args(argv)
    if ns.samples < 1 or not 0 < ns.level < 1:
        ap.error("--samples must be >= 1 and --level within (0, 1)")
    sets = tuple(s.strip() for s in ns.sets.split(",") if s.strip())
    if not sets or any(s not in SETS for s in sets):
        ap.error(f"--sets: a comma list of {', '.join(SETS)}, got {ns.sets!r}")
    try:
        rows = compare(ns.work_a, ns.work_b, ns.samples, ns.level, ns.seed, by_split=ns.by_split, sets=sets)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"A = {ns.work_a}\nB = {ns.work_b}")
    print(format_rows(rows))
    if ns.out is not None:
        ns.out.parent.mkdir(parents=True, exist_ok=True)
        ns.out.write_text(json.dumps({"a": str(ns.work_a), "b": str(ns.work_b), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
