"""The model card of a registered version (Markdown): what the model is for, what it was trained
and judged on, how well and how sure it is, why it was (not) promoted, and what it cannot do.

Pure: everything is passed in; the ``register`` stage writes it as the run artifact
``model_card.md``, as the version's description (what the registry page shows) and into the run
report. Short enough for MLflow's 5,000-character description field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pipeline import __version__

from pipeline.labels import CLASSES

DESCRIPTION_LIMIT = 5000  # MLflow's model-version description column


def _calibration(export: dict[str, Any]) -> str:
    """``none`` or e.g. ``temperature_bias (T 0.901)`` from an export's ``config.json``."""
    cal = export.get("calibration") or {}
    method = str(cal.get("method", "none"))
    return method if method == "none" else f"{method} (T {_num(cal.get('temperature'))})"


def _num(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return f"{f:.{digits}f}" if math.isfinite(f) else "n/a"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _intervals(metrics: Mapping[str, Any]) -> str:
    """The sentence on the bootstrap intervals of ``metrics.json`` (empty when it has none)."""
    if metrics.get("balanced_accuracy_ci_low") is None or metrics.get("ci_level") is None:
        return ""
    pairs = [(label, metrics.get(f"{k}_ci_low"), metrics.get(f"{k}_ci_high"))
             for label, k in (("balanced accuracy", "balanced_accuracy"), ("macro AUC", "macro_auc"))]
    return (f" {100 * float(metrics['ci_level']):g} % intervals over resamples of the test images: "
            + ", ".join(f"{label} {_num(lo)}-{_num(hi)}" for label, lo, hi in pairs)
            + " (they leave out how much another training run would differ).")


def model_card(
    *,
    name: str,
    version: str,
    run_id: str,
    metrics: Mapping[str, Any],
    export: Mapping[str, Any],
    data: Mapping[str, Any],
    gate: Mapping[str, Any],
    lineage: Mapping[str, Any],
) -> str:
    """The card. ``data``: ``source``, ``root``, ``synthetic`` (bool), ``counts`` (split -> class ->
    n); ``gate``: ``decision``, ``reason``, challenger/champion balanced accuracy, champion version,
    margin, floor; ``lineage``: ``commit``, ``params_digest``, ``data_digests`` (split -> digest)."""
    counts: Mapping[str, Mapping[str, int]] = data.get("counts") or {}
    splits = [s for s in ("train", "val", "test") if s in counts]
    synthetic = bool(data.get("synthetic"))
    per_class = [
        [c] + [str(counts[s].get(c, 0)) for s in splits]
        + [_num(metrics.get(f"precision_{c}")), _num(metrics.get(f"recall_{c}")), _num(metrics.get(f"auc_{c}")),
           str(metrics.get(f"support_{c}", 0))]
        for c in CLASSES
    ]  # fmt: skip
    train = counts.get("train", {})
    rare = sorted((n, c) for c, n in train.items())[:2]
    res = export.get("image_size")
    lines = [
        f"# Model card: {name} version {version}",
        "",
        f"Lightweight twin (Siamese) CNN, one branch exported (patent S3). MLflow run `{run_id}`. "
        f"**Gate: {gate.get('decision', 'n/a')}**.",
        "",
        "## Intended use",
        "Research and engineering use: classifying dermoscopy images into the seven HAM10000 classes "
        f"({', '.join(CLASSES)}), with a class activation map for each prediction.",
        "",
        "## Out of scope",
        "Not a medical device: not for diagnosis, triage or any clinical decision. Not validated on images "
        "from other clinics, devices or populations than its training data; not for non-dermoscopic photos.",
        "",
        "## Training data",
        f"Source `{data.get('source')}` ({'SYNTHETIC images, no real patients' if synthetic else 'real images'}), "
        f"root `{data.get('root')}`; lesion-grouped splits.",
        "",
        _table(["class", *splits, "precision", "recall", "AUC", "test support"], per_class),
        "",
        "## Evaluation (test split)",
        f"Balanced accuracy {_num(metrics.get('balanced_accuracy'))}, accuracy {_num(metrics.get('accuracy'))}, "
        f"macro AUC {_num(metrics.get('macro_auc'))}, expected calibration error (ECE) {_num(metrics.get('ece'))}."
        + _intervals(metrics),
        "",
        "## Model",
        f"Branch {export.get('selected_branch')} selected: validation loss {_num(export.get('val_loss_branch1'), 4)} "
        f"(branch 1) vs {_num(export.get('val_loss_branch2'), 4)} (branch 2), best epoch {export.get('best_epoch')}; "
        f"{res} x {res} px input, {export.get('params_inference')} parameters, "
        f"{_backbone(export)}; class activation maps at {_cam_map(export)}. "
        f"Inference: colour constancy {(export.get('preprocess') or {}).get('color_constancy', 'none')}, "
        f"test-time augmentation {export.get('tta', 'none')}, calibration {_calibration(export)}, decision rule "
        f"{(export.get('decision') or {}).get('rule', 'argmax')} (the evaluation above uses it; arg-max balanced "
        f"accuracy {_num(metrics.get('argmax_balanced_accuracy', metrics.get('balanced_accuracy')))}).",
        "",
        "## Promotion gate",
        f"{gate.get('decision')}: {gate.get('reason')}. Challenger v{version} balanced accuracy "
        f"{_num(gate.get('challenger_balanced_accuracy'), 6)}, champion "
        f"{'v' + str(gate['champion_version']) if gate.get('champion_version') not in (None, 'none') else '(none)'} "
        f"{_num(gate.get('champion_balanced_accuracy'), 6)} on the same test split; margin {gate.get('margin')}, "
        f"floor {gate.get('floor')}.",
        "",
        "## Lineage",
        f"skin-twin {__version__} (`CHANGELOG.md`), commit `{lineage.get('commit')}`, params `{str(lineage.get('params_digest'))[:16]}`, data "
        + ", ".join(f"{s} `{str(d)[:16]}`" for s, d in (lineage.get("data_digests") or {}).items())
        + ". `python -m pipeline lineage --model models:/" + f"{name}/{version} --verify` checks them.",
        "",
        "## Known limitations",
        f"- Low resolution ({res} px): fine structures of the lesion are lost.",
        "- Class imbalance: rarest training classes "
        + ", ".join(f"{c} ({n})" for n, c in rare)
        + "; their recall is the least reliable.",
        f"- Calibration: ECE {_num(metrics.get('ece'))} (calibration {_calibration(export)}, fitted on the validation "
        "split); probabilities are not risk estimates.",
        "- Trained and tested on one distribution; performance on other sources is unknown.",
    ]
    if synthetic:
        lines.append("- Trained on SYNTHETIC data: it shows the pipeline works, not that the model recognises real lesions.")
    return "\n".join(lines) + "\n"


def description(card: str, link: str) -> str:
    """The card as the version's description, cut (with a link to the full card) past the limit."""
    if len(card) <= DESCRIPTION_LIMIT:
        return card
    tail = f"\n\n... (full card: {link})\n"
    return card[: DESCRIPTION_LIMIT - len(tail)] + tail


def _backbone(export: dict[str, Any]) -> str:
    """The extractor family: the pretrained backbone and its weight file's sha256, or from scratch."""
    model = export.get("model") or {}
    name = model.get("extractor")
    if not isinstance(name, str):
        return "extractor trained from scratch"
    sha = (export.get("pretrained") or {}).get("pretrained_sha256", "")
    return f"{name} extractor from ImageNet weights (sha256 {sha[:16]}...)" if sha else f"{name} extractor"


def _cam_map(export: dict[str, Any]) -> str:
    hw = export.get("cam_map")
    return f"{hw[0]} x {hw[1]} cells" if isinstance(hw, list) and len(hw) == 2 else "an unrecorded resolution"
