"""skin-twin: an MLOps pipeline for a lightweight twin (Siamese) CNN on dermoscopy images."""

__version__ = "0.2.0"  # the release; CHANGELOG.md has what each one changed
