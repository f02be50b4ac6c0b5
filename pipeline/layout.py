"""Where every artifact of one pipeline run lives, derived from ``paths.work_dir``.

One place for the file layout so that the CLI, the generated ``dvc.yaml`` and the Airflow DAG
(which gives each DAG run its own work directory) agree; the stage table
(:mod:`pipeline.app.table`) names its inputs and outputs by these property names. With the default ``work_dir: .`` the layout is the
conventional DVC one: ``data/``, ``models/``, ``reports/`` at the project root.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Config


@dataclass(frozen=True)
class Layout:
    work_dir: Path

    @classmethod
    def from_config(cls, cfg: Config) -> "Layout":
        return cls(Path(cfg.paths.work_dir))

    # --- data ---
    @property
    def synthetic_dir(self) -> Path:
        return self.work_dir / "data" / "synthetic"

    @property
    def manifest(self) -> Path:
        """Ingested manifest (all splits), before validation."""
        return self.work_dir / "data" / "manifest.parquet"

    @property
    def validated_manifest(self) -> Path:
        """Manifest plus per-image facts; exists only when validation passed."""
        return self.work_dir / "data" / "validated.parquet"

    @property
    def augmented_dir(self) -> Path:
        """Augmented train images and resized val/test images, with manifest.parquet inside."""
        return self.work_dir / "data" / "augmented"

    @property
    def augmented_manifest(self) -> Path:
        return self.augmented_dir / "manifest.parquet"

    @property
    def pairs(self) -> Path:
        return self.work_dir / "data" / "pairs.parquet"

    # --- models ---
    @property
    def train_dir(self) -> Path:
        """Checkpoints, best state, history of the twin training."""
        return self.work_dir / "models" / "train"

    @property
    def cache_dir(self) -> Path:
        """Decoded uint8 image tensors (memory-mapped) used by training/evaluation."""
        return self.work_dir / "data" / "cache"

    @property
    def export_dir(self) -> Path:
        """The inference model: extractor + selected branch."""
        return self.work_dir / "models" / "export"

    # --- reports ---
    @property
    def reports_dir(self) -> Path:
        return self.work_dir / "reports"

    @property
    def validation_dir(self) -> Path:
        return self.reports_dir / "validation"

    @property
    def ingest_summary(self) -> Path:
        """What ingest read and how it split it (rows per split/site, near-duplicate joins)."""
        return self.reports_dir / "ingest_summary.json"

    @property
    def pairs_summary(self) -> Path:
        return self.reports_dir / "pairs_summary.json"

    @property
    def metrics(self) -> Path:
        return self.reports_dir / "metrics.json"

    @property
    def metrics_detail(self) -> Path:
        """Per-source metrics and confusion matrices of the evaluate stage."""
        return self.reports_dir / "metrics_detail.json"

    @property
    def plots_dir(self) -> Path:
        return self.reports_dir / "plots"

    @property
    def predictions(self) -> Path:
        """Per-image test predictions of the evaluate stage."""
        return self.reports_dir / "predictions_test.csv"

    @property
    def cam_dir(self) -> Path:
        return self.reports_dir / "cam"

    @property
    def tracking_record(self) -> Path:
        """MLflow run id, model version and gate decision of this pipeline run."""
        return self.reports_dir / "mlflow.json"
