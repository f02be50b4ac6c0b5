"""The stages: thin functions ``run_<stage>(cfg)`` that read inputs, call the domain, write outputs.

Each is declared once in the stage table (:mod:`pipeline.app.table`). A stage imports ``core``,
``io`` and the base modules, never another stage.
"""
