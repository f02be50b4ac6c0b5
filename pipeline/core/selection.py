"""Patent S3, the pure part: which branch becomes the recognition model, and what its export records.

The joint training keeps the lowest-validation-loss state (S2); of its two classification
branches the one whose **validation classification loss** is lower is exported (branch 1 on a
tie), with the shared feature extractor in front of it.
"""

from __future__ import annotations

from typing import Any

from pipeline.core.imaging import MEAN, STD
from pipeline.labels import CLASSES

EXPORT_FORMAT = 2  # 2: config.json records weights_sha256 / portable_sha256


def select_branch(val_loss_branch1: float, val_loss_branch2: float) -> int:
    """The branch (1 or 2) with the lower validation classification loss; 1 on a tie."""
    return 1 if val_loss_branch1 <= val_loss_branch2 else 2


def build_meta(best: dict[str, Any], selected: int, params_inference: int) -> dict[str, Any]:
    """The ``config.json`` of an export from the best-state checkpoint's fields."""
    return {
        "format": EXPORT_FORMAT,
        "model": best["model_config"],
        "num_classes": int(best["num_classes"]),
        "classes": list(best.get("classes", CLASSES)),
        "image_size": int(best["image_size"]),
        "mean": list(MEAN),
        "std": list(STD),
        "selected_branch": int(selected),
        "val_loss_branch1": float(best["val_loss_branch1"]),
        "val_loss_branch2": float(best["val_loss_branch2"]),
        "val_loss_discriminator": float(best.get("val_loss_discriminator", float("nan"))),
        "val_loss_total": float(best.get("val_loss_total", float("nan"))),
        "best_epoch": int(best["epoch"]),
        "params_inference": int(params_inference),
        "params_train": int(best.get("params_train", 0)),
        "config_digest": str(best.get("config_digest", "")),
        "train_digest": str(best.get("train_digest", "")),
        # the colour constancy training saw (older checkpoints: none)
        "preprocess": dict(best.get("preprocess") or {"color_constancy": "none", "sog_power": 6.0}),
        "tta": "none",
        "decision": {"rule": "argmax", "offsets": None},
        # where a pretrained backbone's weights came from (package, file, sha256); absent from scratch
        **({"pretrained": dict(best["pretrained"])} if best.get("pretrained") else {}),
    }
