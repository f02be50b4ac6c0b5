"""skin-twin: an MLOps pipeline for a lightweight twin (Siamese) CNN on dermoscopy images."""

__version__ = "0.1.0"
