"""Stage ``select``: best.pt -> the exported inference model (patent S3).

Loads ``best.pt`` (the lowest-validation-loss state of the twin, S2), picks the branch whose
validation classification loss is lower (:func:`pipeline.core.selection.select_branch`), keeps the
shared feature extractor + that branch (:func:`pipeline.core.model.inference_model`) and writes the
export folder :attr:`pipeline.layout.Layout.export_dir` atomically
(:func:`pipeline.io.modelstore.export_inference`). Everything comes from ``best.pt`` (model config,
image size, losses), not from ``params.yaml``: the export always matches the weights that were
trained.
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline.config import Config, ModelConfig
from pipeline.core.model import build_twin, count_parameters, inference_model
from pipeline.core.selection import build_meta, select_branch
from pipeline.errors import PipelineError
from pipeline.io.checkpoints import load_best
from pipeline.io.files import atomic_dir
from pipeline.io.modelstore import export_inference
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
    inf = inference_model(twin, selected - 1).eval()
    meta = build_meta(best, selected, count_parameters(inf))
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
    }
