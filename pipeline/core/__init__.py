"""The domain: pure, typed functions (pairs, model, losses, CAM, metrics, splits, synthetic recipes).

No file or network IO here; imports only :mod:`pipeline.config`, :mod:`pipeline.errors` and other
``core`` modules.
"""
