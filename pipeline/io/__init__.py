"""The IO edge: data readers, image files and cache, checkpoints, the model store, MLflow.

Imports ``core`` and the base modules, never ``stages`` or ``app``.
"""
