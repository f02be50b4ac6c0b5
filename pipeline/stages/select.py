"""Stage ``select``: best.pt -> the exported inference model (patent S3).

Loads ``best.pt`` (the lowest-validation-loss state of the twin, S2), picks the branch whose
validation classification loss is lower (:func:`pipeline.core.selection.select_branch`), keeps the
shared feature extractor + that branch (:func:`pipeline.core.model.inference_model`) and writes the
export folder :attr:`pipeline.layout.Layout.export_dir` atomically
(:func:`pipeline.io.modelstore.export_inference`). Everything comes from ``best.pt`` (model config,
image size, losses), not from ``params.yaml``: the export always matches the weights that were
trained.

It also records how the model is used (:mod:`pipeline.io.modelstore`): the colour constancy of
training (from ``best.pt``), the test-time augmentation (``select.tta``) and, with
``select.decision_rule: balanced`` or ``prior``, the decision rule: per-class log-probability offsets
fitted on the **validation** split (``data/augmented``, scored exactly as inference scores:
:func:`pipeline.core.inference.predict_batch_uint8`) to maximise balanced accuracy -- seven free
offsets (:func:`pipeline.core.decision.fit_offsets`) or the model's class prior divided out to one
fitted power (:func:`pipeline.core.decision.fit_prior_power`). ``none`` records plain arg-max.
Before the rule, with ``select.calibration`` other than ``none``, it fits the calibration of the
reported probabilities on the same val probabilities (maximum likelihood:
:func:`pipeline.core.calibration.fit_calibration`), records it, and fits the rule on the calibrated
probabilities -- the numbers ``predict`` will report.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from pipeline.config import Config, ModelConfig
from pipeline.core.cam import cam_map_size
from pipeline.core.calibration import apply_calibration, calibration_meta, fit_calibration
from pipeline.core.decision import decision_meta, fit_rule
from pipeline.core.inference import inference_ready, predict_batch_uint8
from pipeline.core.model import build_twin, count_parameters, inference_model
from pipeline.core.schema import AUGMENTED_COLUMNS
from pipeline.core.selection import build_meta, select_branch
from pipeline.errors import PipelineError
from pipeline.io.checkpoints import load_best
from pipeline.io.files import atomic_dir
from pipeline.io.manifests import read_parquet, split_rows
from pipeline.io.modelstore import ExportedModel, export_inference
from pipeline.io.scoring import label_index, load_images
from pipeline.layout import Layout

log = logging.getLogger(__name__)


def run_select(cfg: Config) -> dict[str, Any]:
    layout = Layout.from_config(cfg)
    best_path = layout.train_dir / "best.pt"
    best = load_best(best_path)
    selected = select_branch(float(best["val_loss_branch1"]), float(best["val_loss_branch2"]))
    mcfg = ModelConfig.model_validate(best["model_config"])
    twin = build_twin(mcfg, int(best["num_classes"]))
    try:
        twin.load_state_dict(best["model"])
    except RuntimeError as exc:
        raise PipelineError(f"{best_path}: weights do not fit the stored model config ({exc})") from None
    inf = inference_model(twin, selected - 1).eval()  # exported as trained
    meta = build_meta(best, selected, count_parameters(inf))
    meta["tta"] = cfg.select.tta
    with torch.no_grad():  # the resolution of the explanation: CAM's feature map at the input size
        meta["cam_map"] = list(cam_map_size(inf, int(meta["image_size"])))
    fit: dict[str, Any] = {}
    cal: dict[str, Any] = {}
    if cfg.select.decision_rule != "none" or cfg.select.calibration != "none":
        # scored by the network predict/pyfunc/evaluate load (BN folded, channels-last)
        y, probs = val_probabilities(ExportedModel(model=inference_ready(inf), meta=meta), cfg, layout)
        if cfg.select.calibration != "none":
            temperature, bias, cal = fit_calibration(y, probs, cfg.select.calibration)
            meta["calibration"] = calibration_meta(cfg.select.calibration, temperature, bias)
            probs = apply_calibration(probs, temperature, bias)  # what predict_batch_uint8 now reports
            log.info("calibration %s: temperature %.3f, biases %s; val NLL %.4f -> %.4f", cfg.select.calibration,
                     temperature, np.round(bias, 2).tolist(), cal["nll_before"], cal["nll_after"])
        if cfg.select.decision_rule != "none":
            offsets, fit = fit_rule(cfg.select.decision_rule, y, probs, cfg.select)
            log.info("decision rule: val balanced accuracy %.4f (arg-max) -> %.4f (offsets %s)",
                     fit["balanced_accuracy_argmax"], fit["balanced_accuracy_offsets"], np.round(offsets, 2).tolist())
            meta["decision"] = decision_meta(offsets)
    with atomic_dir(layout.export_dir) as tmp:
        meta = export_inference(inf, meta, tmp)
    log.info("selected branch %d (val loss %.4f vs %.4f) of epoch %d -> %s", selected, meta["val_loss_branch1"],
             meta["val_loss_branch2"], meta["best_epoch"], layout.export_dir)
    return {
        "selected_branch": selected,
        "best_epoch": meta["best_epoch"],
        "val_loss_branch1": meta["val_loss_branch1"],
        "val_loss_branch2": meta["val_loss_branch2"],
        "params_inference": meta["params_inference"],
        "params_train": meta["params_train"],
        "export_dir": str(layout.export_dir),
        "portable": meta["portable"],
        "decision": meta["decision"]["rule"],
        "decision_fit": cfg.select.decision_rule,
        **({"decision_prior_power": fit["power"]} if "power" in fit else {}),
        "tta": meta["tta"],
        "calibration": cfg.select.calibration,
        **({"calibration_temperature": meta["calibration"]["temperature"],
            "val_nll_uncalibrated": cal["nll_before"], "val_nll_calibrated": cal["nll_after"]} if cal else {}),
        **{f"val_{k}": v for k, v in fit.items() if k.startswith("balanced_accuracy")},
    }


def val_probabilities(exported: ExportedModel, cfg: Config, layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) of the val split, scored exactly as inference scores (the export's
    colour constancy and views; no calibration yet: ``exported`` carries none)."""
    aug = read_parquet(layout.augmented_manifest, "augment", AUGMENTED_COLUMNS)
    val = split_rows(aug, "val", str(layout.augmented_manifest), "the calibration and the decision rule are fitted on the val split")
    y = label_index(val, str(layout.augmented_manifest))
    images = load_images(val, layout.augmented_dir, exported.image_size, cfg, name="select-val",
                         workers=cfg.select.cache_workers)
    return y, predict_batch_uint8(exported, images, cfg.select.batch_size)
