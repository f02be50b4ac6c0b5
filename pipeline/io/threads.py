"""Torch's CPU thread count in this process: ``train.cpu_threads`` (the train stage) and
``predict.cpu_threads`` (the predict stage and a process that loads the MLflow pyfunc).

A module of its own, importing only torch, so that the pyfunc a serving process loads does not
pull in the training code."""

from __future__ import annotations

import torch


def use_cpu_threads(n: int) -> None:
    """Give torch ``n`` threads in this whole process; ``0`` leaves torch's default (every core)."""
    if n > 0:
        torch.set_num_threads(n)
