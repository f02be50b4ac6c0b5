"""The compute environment of training: which device, and the DDP process group under ``torchrun``.

* :func:`resolve_device` -- ``train.device=auto`` uses CUDA when present, with autocast (bf16 where
  supported, else fp16 with a ``GradScaler``) when ``train.amp``; otherwise CPU in float32. On both,
  ``train.channels_last`` trains in the channels-last memory format: this model is mostly depthwise
  and 1x1 convolutions, which oneDNN on CPU runs faster in that format (``bench/throughput.py``
  measures it), and which CUDA's tensor-core kernels expect.
* :func:`init_dist` -- under ``torchrun`` with ``WORLD_SIZE > 1`` the process group is initialised
  (nccl on CUDA, gloo on CPU); :class:`Dist` wraps the collectives the training loop needs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.config import TrainConfig
from pipeline.core.training import DeviceSetup
from pipeline.errors import PipelineError


def resolve_device(tc: TrainConfig, local_rank: int = 0) -> DeviceSetup:
    want = tc.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise PipelineError("train.device=cuda but CUDA is not available on this machine")
    if want == "cpu":
        return DeviceSetup(torch.device("cpu"), None, False, tc.channels_last)
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    amp_dtype = None
    if tc.amp:
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return DeviceSetup(device, amp_dtype, amp_dtype == torch.float16, tc.channels_last)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def all_reduce_sum(self, values: list[float], device: torch.device) -> list[float]:
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def gather_objects(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Same batch-norm statistics on every rank (rank 0's)."""
        if self.enabled:
            for buf in module.buffers():
                torch.distributed.broadcast(buf, 0)

    def close(self) -> None:
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def init_dist() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend=backend)
    return Dist(rank=rank, world=world, local_rank=local_rank)
