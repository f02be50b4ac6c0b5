"""The project's own import graph (code deps for ``dvc.yaml``, the architecture tests).

The reader lives in :mod:`pipeline.io.imports`, one layer down, because the MLflow flavour
(:mod:`pipeline.io.pyfunc`) also needs it: the code bundle of a logged model is the import closure
of the pyfunc module, computed exactly like a stage's code dependencies.
"""

from __future__ import annotations

from pipeline.io.imports import PACKAGE, PACKAGE_DIR, closure, cycles, import_graph, module_files

__all__ = ["PACKAGE", "PACKAGE_DIR", "closure", "cycles", "import_graph", "module_files"]
