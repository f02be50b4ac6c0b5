"""The one typed configuration of the pipeline, read from ``params.yaml``.

Every value a stage uses lives here. ``load_config`` reads the YAML file, applies
``--set dotted.key=value`` overrides (values parsed as YAML, so ``--set train.epochs=3``
gives an int) and validates the result with pydantic. An unknown key, a wrong type, an
impossible value (every number is bounded; ``inf``/``nan`` are refused), a key written twice in
the file, or knobs that contradict each other raise :class:`ConfigError` whose message names the
dotted key -- at load time, before any stage runs.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.labels import CLASSES


class ConfigError(ValueError):
    """A bad ``params.yaml`` or override; the message names the key and the problem."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)


class PathsConfig(_Section):
    # Every artifact of one pipeline run lives below work_dir (see pipeline.layout).
    work_dir: str = "."


class SplitConfig(_Section):
    train: float = Field(0.7, gt=0, lt=1)
    val: float = Field(0.15, gt=0, lt=1)
    test: float = Field(0.15, gt=0, lt=1)
    # A class with fewer lesions (groups) than this goes entirely to train.
    min_groups_for_holdout: int = Field(3, ge=3, le=1000)
    # Source-held-out split: every image of these acquisition sites (manifest column source_site,
    # e.g. [vidir_modern]) goes to test; the rest is split into train/val with the train/val
    # fractions renormalised (test is then ignored). [] = the lesion-grouped random split.
    holdout_sources: list[str] = []
    # Near-duplicate pictures (perceptual hashes at most validate.near_duplicate_distance bits apart,
    # e.g. one photo stored under two ids) are split as one group, so the same picture never sits in
    # two splits; false = lesion groups only (the validate stage then reports such pictures).
    group_near_duplicates: bool = True

    @model_validator(mode="after")
    def _sums_to_one(self) -> "SplitConfig":
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split fractions must sum to 1, got {total:.4f}")
        return self

    @field_validator("holdout_sources")
    @classmethod
    def _site_names(cls, v: list[str]) -> list[str]:
        if any(not s.strip() for s in v):
            raise ValueError("site names must not be blank")
        dup = sorted({s for s in v if v.count(s) > 1})
        if dup:
            raise ValueError(f"site(s) listed twice: {dup}")
        return v


# data.source value that reads the list data.sources (several sources concatenated in one run).
MULTI_SOURCE = "multi"
_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class SourceEntry(_Section):
    """One entry of ``data.sources``: a registered reader on its own root (and CSV)."""

    # A reader registered in pipeline.io.readers: ham10000 | isic_csv | imagefolder | synthetic.
    source: str = Field(min_length=1)
    # Its data root (relative: to the params file's folder).
    root: str = Field(min_length=1)
    # Its ground-truth CSV, for readers that need one (isic_csv); relative: to the params file's
    # folder, else looked up below the root.
    csv: str | None = None
    # The entry's name: the source_site of its rows that carry none, and the prefix that keeps an
    # image id unique when two entries share it (<name>__<id>). null = the root folder's name.
    name: str | None = Field(None, pattern=_NAME_PATTERN)

    @property
    def label(self) -> str:
        """``name``, else the root folder's name (``source`` when the root has no name)."""
        return self.name or Path(self.root).name or self.source


class DataConfig(_Section):
    # A name registered in pipeline.io.readers (checked when the CLI / DAG loads the params, and by
    # ingest): synthetic | ham10000 | isic_csv | imagefolder; or "multi" to read data.sources.
    source: str = Field("synthetic", min_length=1)
    # Data root. For `synthetic`, null means <work_dir>/data/synthetic (generated there).
    root: str | None = None
    # Sources that need one (isic_csv): path of the ground-truth CSV.
    csv: str | None = None
    # With source: multi, the sources read and concatenated into one manifest, each
    # {source, root, csv, name}; root and csv above must then be null.
    sources: list[SourceEntry] = []
    # Threads reading image headers and hashing files at ingest.
    workers: int = Field(4, ge=1, le=256)
    split: SplitConfig = SplitConfig()

    @model_validator(mode="after")
    def _sources(self) -> "DataConfig":
        if self.sources and self.source != MULTI_SOURCE:
            raise ValueError(f"source: must be {MULTI_SOURCE!r} when data.sources is set")
        if self.source == MULTI_SOURCE:
            if not self.sources:
                raise ValueError(f"source: {MULTI_SOURCE!r} needs data.sources, a list of {{source, root, csv, name}}")
            for key in ("root", "csv"):
                if getattr(self, key) is not None:
                    raise ValueError(
                        f"{key}: must be null with data.source={MULTI_SOURCE!r} (each entry of data.sources has its own)"
                    )
            labels = [e.label for e in self.sources]
            dup = sorted({x for x in labels if labels.count(x) > 1})
            if dup:
                raise ValueError(f"sources: entry name(s) {dup} used twice; give the entries distinct `name`s")
        return self


class SyntheticConfig(_Section):
    images_per_class: int = Field(40, ge=2, le=1_000_000)
    # Optional per-class counts overriding images_per_class, e.g. {nv: 120, df: 10}.
    class_counts: dict[str, int] = {}
    image_size: int = Field(128, ge=32, le=2048)
    # Images per lesion (group_id); >1 gives several views of the same lesion.
    images_per_lesion: int = Field(1, ge=1, le=1000)
    jpeg_quality: int = Field(92, ge=1, le=100)
    # Acquisition sites (metadata column `dataset`): 1 = "synthetic"; k > 1 = synthetic_1 .. synthetic_k,
    # assigned round robin by lesion within each class (labels only; the pixels do not change).
    sites: int = Field(1, ge=1, le=1000)

    @field_validator("class_counts")
    @classmethod
    def _known_classes(cls, v: dict[str, int]) -> dict[str, int]:
        bad = sorted(set(v) - set(CLASSES))
        if bad:
            raise ValueError(f"unknown class(es) {bad}; allowed {list(CLASSES)}")
        if any(n < 0 or n > 1_000_000 for n in v.values()):
            raise ValueError("class counts must be within [0, 1000000]")
        return v


class ValidateConfig(_Section):
    min_train_per_class: int = Field(2, ge=1)
    min_width: int = Field(32, ge=1)
    min_height: int = Field(32, ge=1)
    max_width: int = Field(10000, ge=1)
    max_height: int = Field(10000, ge=1)
    # Images larger than this many pixels are refused before decoding (decompression bombs).
    max_pixels: int = Field(40_000_000, ge=1)
    allowed_modes: list[str] = Field(["RGB"], min_length=1)
    workers: int = Field(2, ge=1, le=256)
    # Number of example offending rows printed per failed expectation.
    examples: int = Field(5, ge=1, le=10_000)
    # Number of example offending rows kept per failed expectation in result.json / summary.html.
    report_examples: int = Field(50, ge=1, le=100_000)
    # Images of one lesion (group_id) with different labels: "refuse" fails validation naming the
    # lesion; "allow" keeps each image's own label (the lesion's split follows its majority label).
    lesion_label_conflict: Literal["refuse", "allow"] = "refuse"
    # Near-duplicate images (the same pixels re-encoded, resized or re-saved) in different splits
    # fail validation: Hamming distance between 256-bit perceptual hashes of the decoded pixels at
    # most this many bits. -1 turns the check off; 0 finds identical hashes only. Calibrated on
    # ham10000-224: distinct lesions >= 19 bits apart, resized copies <= 12 (core.imaging).
    near_duplicate_distance: int = Field(12, ge=-1, le=64)

    @model_validator(mode="after")
    def _bounds(self) -> "ValidateConfig":
        if self.min_width > self.max_width:
            raise ValueError("min_width must be <= max_width")
        if self.min_height > self.max_height:
            raise ValueError("min_height must be <= max_height")
        return self


class AugmentConfig(_Section):
    # Training resolution (square); every split is resized to it.
    image_size: int = Field(64, ge=16, le=1024)
    # Augmented copies per train image (before class balancing).
    copies: int = Field(2, ge=1, le=1000)
    # More copies for rarer classes: copies * (n_max / n_class), capped at max_copies.
    balance: bool = True
    max_copies: int = Field(8, ge=1, le=1000)
    # With balance: the images the class balancing gives each class shared equally among the
    # acquisition sites (manifest source_site) that have train images of it, as far as max_copies
    # allows, so no site's look stands for a class (pipeline.core.augment.copies_per_site).
    # Off = class balancing only.
    balance_sites: bool = False
    hflip: float = Field(0.5, ge=0, le=1)
    vflip: float = Field(0.5, ge=0, le=1)
    rotation: float = Field(180.0, ge=0, le=180)
    scale_min: float = Field(0.9, gt=0, le=10)
    scale_max: float = Field(1.1, gt=0, le=10)
    translate: float = Field(0.05, ge=0, le=0.5)
    brightness: float = Field(0.2, ge=0, le=10)
    contrast: float = Field(0.2, ge=0, le=10)
    saturation: float = Field(0.2, ge=0, le=10)
    hue: float = Field(0.02, ge=0, le=0.5)
    # Also keep the resized original of each train image among its copies.
    keep_original: bool = True
    workers: int = Field(2, ge=1, le=256)
    # Colour constancy on every resized image (train copies before their random transforms; val /
    # test when scored, through the export): none | shades_of_gray (Finlayson & Trezzi 2004).
    # Recorded in augmented/meta.json, best.pt and the export's config.json, so inference always
    # applies what training saw.
    color_constancy: Literal["none", "shades_of_gray"] = "none"
    # Minkowski norm p of Shades of Gray (6 = the ISIC-challenge standard; 1 = grey world).
    sog_power: float = Field(6.0, ge=1, le=32)

    @model_validator(mode="after")
    def _ranges(self) -> "AugmentConfig":
        if self.scale_min > self.scale_max:
            raise ValueError("scale_min must be <= scale_max")
        if self.max_copies < self.copies:
            raise ValueError("max_copies must be >= copies")
        if self.balance_sites and not self.balance:
            raise ValueError("balance_sites shares the class balancing's copies among sites: it needs balance: true")
        return self


class PairsConfig(_Section):
    # Pair-manifest epochs (the train stage uses one pair epoch per training epoch, cycling).
    epochs: int = Field(12, ge=1, le=10_000)
    batch_size: int = Field(32, ge=2, le=1_000_000)
    # Target share of positive (same-class) pairs in each epoch.
    positive_fraction: float = Field(0.5, ge=0, le=1)
    tolerance: float = Field(0.02, ge=0, le=0.5)
    # What to do with fixed points of the patent permutation: drop them or re-pair randomly.
    fixed_points: Literal["drop", "repair"] = "repair"


def _stage_rows(rows: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    for i, (t, c, n, st) in enumerate(rows):
        if not (1 <= t <= 64 and 1 <= c <= 16384 and 1 <= n <= 64):
            raise ValueError(
                f"row {i} {[t, c, n, st]}: expansion must be in [1, 64], out_channels in [1, 16384], "
                "repeats in [1, 64]"
            )
        if st not in (1, 2):
            raise ValueError(f"row {i} {[t, c, n, st]}: stride must be 1 or 2")
    return rows


BACKBONES: tuple[str, ...] = ("efficientnet_lite0",)  # pretrained extractors (pipeline.core.backbone)
BACKBONE_HEAD_CHANNELS = 1280  # efficientnet_lite0's pretrained 1x1 head conv


class ModelConfig(_Section):
    stem_channels: int = Field(16, ge=4, le=4096)
    # Shared feature extractor: stage rows (expansion, out_channels, repeats, stride) of the
    # from-scratch family, or the name of a pretrained backbone ("efficientnet_lite0": the ImageNet
    # EfficientNet-Lite0 trunk shipped by a locked dependency, pipeline.core.backbone).
    extractor: list[tuple[int, int, int, int]] | Literal["efficientnet_lite0"] = [
        (1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2)
    ]  # fmt: skip
    # Each branch (own weights): stage rows continuing from the extractor's output (from scratch);
    # null with a backbone, whose branches are each their own copy of its remaining stages.
    branch: list[tuple[int, int, int, int]] | None = [(4, 64, 2, 2), (4, 96, 2, 2)]
    # Backbone only (null from scratch): how many of its 7 stages the shared extractor holds (1..6) ...
    split: int | None = Field(None, ge=1, le=6)
    # ... and its output stride: 32 (ImageNet's network) or 16 (the last stride-2 stage at stride 1,
    # dilated: a CAM map twice as fine, with the same weights).
    output_stride: Literal[16, 32] | None = None

    @field_validator("extractor", "branch")
    @classmethod
    def _rows(cls, v: Any) -> Any:
        return _stage_rows(v) if isinstance(v, list) else v

    # 1x1 conv before GAP; this is the feature map used for CAM (a backbone's own: 1280).
    head_channels: int = Field(256, ge=8, le=16384)
    discriminator_hidden: int = Field(128, ge=4, le=16384)
    dropout: float = Field(0.1, ge=0, lt=1)

    @property
    def backbone(self) -> str | None:
        """The pretrained backbone's name, or ``None`` for the from-scratch family."""
        return self.extractor if isinstance(self.extractor, str) else None

    @model_validator(mode="after")
    def _family(self) -> "ModelConfig":
        if self.backbone is None:
            if self.branch is None:
                raise ValueError("branch: stage rows are required with extractor rows (null only with a backbone)")
            for key in ("split", "output_stride"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key}: only with a pretrained backbone (extractor: {BACKBONES[0]}); set it to null")
            return self
        if self.branch is not None:
            raise ValueError(f"branch: must be null with extractor: {self.backbone} (each branch copies its remaining stages)")
        if self.split is None or self.output_stride is None:
            raise ValueError(f"split and output_stride: required with extractor: {self.backbone}")
        if self.head_channels != BACKBONE_HEAD_CHANNELS:
            raise ValueError(f"head_channels: {self.backbone}'s pretrained head has {BACKBONE_HEAD_CHANNELS}, "
                             f"got {self.head_channels}")  # fmt: skip
        return self

    def recorded(self) -> dict[str, Any]:
        """The section as checkpoints, training digests and export ``config.json`` record it."""
        return self.model_dump(mode="json")


class LossConfig(_Section):
    A: float = Field(1.0, ge=0, le=1000)
    B: float = Field(1.0, ge=0, le=1000)
    C: float = Field(0.5, ge=0, le=1000)
    gamma: float = Field(2.0, ge=0, le=100)
    # Per-class focal alpha: null, "balanced" (inverse frequency, mean 1) or a list of 7 floats.
    alpha: None | Literal["balanced"] | list[float] = None

    @field_validator("alpha")
    @classmethod
    def _alpha_len(cls, v: Any) -> Any:
        if isinstance(v, list) and len(v) != len(CLASSES):
            raise ValueError(f"alpha needs {len(CLASSES)} values, got {len(v)}")
        if isinstance(v, list) and any(not 0 <= a <= 1000 for a in v):
            raise ValueError("alpha values must be within [0, 1000]")
        return v


class TrainConfig(_Section):
    epochs: int = Field(12, ge=1, le=10_000)
    batch_size: int = Field(32, ge=1, le=1_000_000)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(3e-3, gt=0, le=10)
    weight_decay: float = Field(1e-4, ge=0, le=1)
    # sgd only (required there, refused with adamw).
    momentum: float | None = Field(None, ge=0, lt=1)
    schedule: Literal["cosine", "constant", "onecycle"] = "cosine"
    # Linear warm-up before cosine / constant (onecycle has its own; refused there).
    warmup_epochs: int = Field(0, ge=0, le=10_000)
    # Learning rate of a pretrained backbone's weights (model.extractor names one); the new layers
    # (classifiers, discriminator) train at lr. null = lr for every weight.
    pretrained_lr: float | None = Field(None, gt=0, le=10)
    # "auto" picks CUDA when present, else CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Mixed precision on CUDA (bf16 where supported, else fp16 with a grad scaler).
    amp: bool = True
    # Channels-last memory format for training, on CPU and CUDA (faster for this model on both).
    channels_last: bool = True
    num_workers: int = Field(0, ge=0, le=256)
    # Light online augmentation on cached tensors (random flips).
    online_flip: bool = True
    # Probability of each flip (horizontal, vertical) when online_flip.
    flip_prob: float = Field(0.5, ge=0, le=1)
    # Threads for CPU training; 0 lets torch decide.
    cpu_threads: int = Field(0, ge=0, le=1024)
    # Threads decoding images into the image cache.
    cache_workers: int = Field(4, ge=1, le=256)
    progress: bool = True
    # Stochastic weight averaging (SWA): from the end of this epoch (1-based) on, the uniform mean of
    # the weights and batch-norm buffers at the end of each epoch; from then on that mean is what is
    # validated (and so the lowest-loss state and the exported branch). null = off.
    swa_start: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _optimizer_knobs(self) -> "TrainConfig":
        if self.optimizer == "sgd" and self.momentum is None:
            raise ValueError("momentum: required with optimizer=sgd")
        if self.optimizer != "sgd" and self.momentum is not None:
            raise ValueError(f"momentum: only used with optimizer=sgd, not {self.optimizer} (set it to null)")
        if self.schedule == "onecycle" and self.warmup_epochs:
            raise ValueError("warmup_epochs: onecycle has its own warm-up; set warmup_epochs to 0")
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs: must be < epochs ({self.epochs}), got {self.warmup_epochs}")
        if self.swa_start is not None and self.swa_start > self.epochs:
            raise ValueError(f"swa_start: must be <= epochs ({self.epochs}), got {self.swa_start}")
        return self


class EvaluateConfig(_Section):
    # CAM sample images written per class (correct and wrong each).
    cam_per_class: int = Field(2, ge=0, le=10_000)
    batch_size: int = Field(64, ge=1, le=1_000_000)
    # Threads decoding test images into the image cache.
    cache_workers: int = Field(4, ge=1, le=256)
    # Confidence intervals of balanced accuracy, accuracy and macro AUC in metrics.json: this many
    # class-stratified bootstrap resamples of the test set (pipeline.core.metrics), seeded by `seed`;
    # 0 = none.
    bootstrap_samples: int = Field(1000, ge=0, le=100_000)
    ci_level: float = Field(0.95, gt=0, lt=1)


class SelectConfig(_Section):
    # Decision rule fitted on the validation split and stored in the export (config.json
    # "decision"): balanced = per-class log-probability offsets maximising validation balanced
    # accuracy (pipeline.core.decision); prior = the model's own class prior on val divided out to
    # the power tau fitted on val (one parameter); none = plain arg-max.
    decision_rule: Literal["balanced", "prior", "none"] = "none"
    # balanced: the offsets stay within [-offset_limit, offset_limit], searched in steps of offset_step.
    offset_limit: float = Field(2.0, ge=0, le=10)
    offset_step: float = Field(0.1, gt=0, le=1)
    # prior: tau searched on 0, prior_power_step, ..., prior_power_max.
    prior_power_max: float = Field(2.0, ge=0, le=10)
    prior_power_step: float = Field(0.25, gt=0, le=10)
    # Test-time augmentation recorded in the export (config.json "tta") and applied by predict,
    # the pyfunc, evaluate and the gate alike: none | flips (mean of the 8 flip/transpose views).
    # The decision rule is fitted on the probabilities this produces.
    tta: Literal["none", "flips"] = "none"
    # Calibration of the reported probabilities, fitted on val by maximum likelihood and stored in
    # the export (config.json "calibration"; pipeline.core.calibration): none | temperature
    # (softmax(log p / T)) | temperature_bias (softmax(log p / T + b), one bias per class). The
    # decision rule is fitted after it, on the calibrated val probabilities.
    calibration: Literal["none", "temperature", "temperature_bias"] = "none"
    # Images per forward pass and decoding threads when scoring the val split for the rule.
    batch_size: int = Field(64, ge=1, le=1_000_000)
    cache_workers: int = Field(4, ge=1, le=256)


class PredictConfig(_Section):
    # Images per forward pass in `predict` and the MLflow pyfunc model.
    batch_size: int = Field(64, ge=1, le=1_000_000)
    # Label of the predict stage: rule = the export's decision rule (what the pyfunc, evaluate and
    # the gate use; arg-max for exports without one) | argmax = plain arg-max of the probabilities.
    decision: Literal["rule", "argmax"] = "rule"
    # Torch threads of the process that predicts: the predict stage, and the MLflow pyfunc model
    # (recorded in its data/export/serving.json, set when a server loads it). 0 = torch's default
    # (every core). Several serving workers on one machine want cores / workers each, so they do
    # not oversubscribe the cores; a batch-1 server often answers faster with 1.
    cpu_threads: int = Field(0, ge=0, le=1024)


class CamConfig(_Section):
    # Opacity of the CAM heat map over the image in overlays (evaluate samples, predict --cam-dir).
    alpha: float = Field(0.5, ge=0, le=1)


class MlflowConfig(_Section):
    # MLFLOW_TRACKING_URI wins over this. Relative sqlite paths (and artifact_root) are resolved
    # against the params file's folder at load time (pipeline.app.params); folders are created.
    tracking_uri: str = Field("sqlite:///mlflow/mlflow.db", min_length=1)
    artifact_root: str = Field("mlflow/artifacts", min_length=1)
    experiment: str = Field("skin-twin", min_length=1)
    # Every HTTP call to an MLflow server: seconds before it times out, and retries after the first
    # try (exponential backoff). An unreachable server fails the stage within about
    # http_timeout_s * (http_retries + 1) seconds, with a clear message.
    http_timeout_s: float = Field(20.0, gt=0, le=3600)
    http_retries: int = Field(2, ge=0, le=20)


class RegistryConfig(_Section):
    model_name: str = Field("skin-twin", min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    # Challenger must beat champion's balanced accuracy by at least this much.
    margin: float = Field(0.0, ge=0, le=1)
    # And clear this absolute balanced-accuracy floor.
    floor: float = Field(0.2, ge=0, le=1)
    # The lock the champion gate holds across processes and hosts: null = derived from the store
    # (sqlite: a file lock beside the database; postgresql: an advisory lock in it); an MLflow
    # server needs one every worker reaches: redis://host:port/db, postgresql://... or file:///path.
    # SKIN_TWIN_REGISTRY_LOCK_URL wins over this.
    lock_url: str | None = None
    # Seconds to wait for the lock before the register stage fails (the environment is retried).
    lock_timeout_s: float = Field(600.0, gt=0, le=86400)


class AirflowConfig(_Section):
    # Cron schedule; null with schedule_on_asset=true triggers on the raw-data Asset instead.
    schedule: str | None = None
    schedule_on_asset: bool = False
    gpu_queue: str = "gpu"
    gpu_pool: str = "gpu"
    gpu_pool_slots: int = Field(1, ge=1, le=1024)
    retries: int = Field(2, ge=0, le=100)
    retry_delay_s: int = Field(30, ge=0, le=86400)
    max_active_runs: int = Field(1, ge=1, le=1024)
    # Per-run work directories are created below this folder.
    runs_dir: str = "runs"


class Config(_Section):
    # One seed for everything; numpy, torch and the split hashes all take it (31 bits).
    seed: int = Field(42, ge=0, le=2**31 - 1)
    paths: PathsConfig = PathsConfig()
    data: DataConfig = DataConfig()
    synthetic: SyntheticConfig = SyntheticConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    augment: AugmentConfig = AugmentConfig()
    pairs: PairsConfig = PairsConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    select: SelectConfig = SelectConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    predict: PredictConfig = PredictConfig()
    cam: CamConfig = CamConfig()
    mlflow: MlflowConfig = MlflowConfig()
    registry: RegistryConfig = RegistryConfig()
    airflow: AirflowConfig = AirflowConfig()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)

    @model_validator(mode="after")
    def _sections_agree(self) -> "Config":
        if self.train.pretrained_lr is not None and self.model.backbone is None:
            raise ValueError("train.pretrained_lr: only with a pretrained backbone (model.extractor); set it to null")
        return self

    @property
    def validate_cfg(self) -> ValidateConfig:
        return self.validate_

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, for MLflow params and lineage."""
        return flatten(self.to_dict())

    def digest(self) -> str:
        """Content hash of the whole config (sha256 of canonical JSON)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def with_overrides(self, overrides: dict[str, Any]) -> "Config":
        raw = self.to_dict()
        for key, value in overrides.items():
            _set_dotted(raw, key, value)
        return _validate(raw, source="<overrides>")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = {}
            node[part] = child
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: is a value, cannot set {dotted}")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.epochs=3"`` -> ``("train.epochs", 3)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected dotted.key=value")
    key, _, value = text.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value is not valid YAML: {exc}") from exc
    return key, parsed


def _validate(raw: Any, source: str) -> Config:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(raw).__name__}")
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
            loc = loc.replace("validate_", "validate")
            msg = str(err["msg"]).removeprefix("Value error, ")
            got = f" (got {err.get('input')!r})"
            # A cross-field rule names its key first ("momentum: required with ..."): show it dotted.
            key, sep, rest = msg.partition(": ")
            if sep and key.isidentifier() and isinstance(err.get("input"), dict) and key in err["input"]:
                loc, msg = f"{loc}.{key}" if loc else key, rest
                got = f" (got {err['input'][key]!r})"
            elif not loc and sep and "." in key:  # a rule across sections names its dotted key
                loc, msg, got = key, rest, ""
            lines.append(f"  {loc or '<root>'}: {msg}{got}")
        raise ConfigError(f"{source}: invalid parameters\n" + "\n".join(lines)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses a key written twice in one mapping (YAML would keep the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {key!r} (first on line {seen[key].line + 1})", key_node.start_mark,
                )  # fmt: skip
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path = "params.yaml", overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Read ``params.yaml``, apply overrides, validate. Raises :class:`ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the params file: {exc}") from exc
    raw = copy.deepcopy(raw) if raw is not None else {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides or [])
    for key, value in items:
        _set_dotted(raw, key, value)
    return _validate(raw, source=str(path))
