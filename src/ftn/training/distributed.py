"""Distributed training with ``torchrun`` (PyTorch's own ``torch.distributed``).

Under ``torchrun --nproc_per_node N ftn train ...`` every process runs the same command; this
module reads the environment torchrun sets, starts the process group (NCCL on GPUs, gloo on CPU)
and offers the few collective steps the engine needs:

- data: each global batch of ``data.batch_size`` samples is split into N equal contiguous chunks,
  one per rank, so the global batch and the sample order equal a single-process run;
- gradients: averaged over ranks after every backward (what DistributedDataParallel does; done
  with one flat ``all_reduce`` because a task's parameters are a small, known set inside a
  shared model that DDP would have to scan for unused parameters every step);
- BatchNorm running statistics: averaged over ranks at every epoch end and after recalibration
  (batch statistics inside a step stay per rank, as with DDP without SyncBatchNorm);
- metrics: correct/total counts summed over ranks;
- only rank 0 writes logs, checkpoints, adapters and results.

``train.distributed=tasks`` instead gives each rank its own tasks (they are independent):
rank r trains ``tasks[r::N]`` with no communication during training.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["DistInfo", "init_distributed", "current", "device", "all_reduce_gradients", "all_reduce_sum",
           "average_tensors", "barrier", "all_gather_object"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_INFO = DistInfo()


def current() -> DistInfo:
    return _INFO


def init_distributed() -> DistInfo:
    """Start the process group when launched by torchrun with more than one process."""
    global _INFO
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        _INFO = DistInfo()
        return _INFO
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    _INFO = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return _INFO


def _active() -> bool:
    return _INFO.enabled and dist.is_initialized()


def device() -> torch.device:
    """Where tensors for collectives live: the rank's GPU under NCCL, else the CPU."""
    if _active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_gradients(params: Iterable[torch.nn.Parameter], local_n: int, global_n: int) -> None:
    """Turn per-rank mean-loss gradients into the gradient of the global-batch mean loss:
    Σ_ranks (n_rank · grad_rank) / n_global (a missing gradient counts as zero)."""
    if not _active():
        return
    params = list(params)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads]) * local_n
    dist.all_reduce(flat)
    flat /= global_n
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def all_reduce_sum(values: Tensor) -> Tensor:
    if _active():
        dist.all_reduce(values)
    return values


def all_reduce_min(values: Tensor) -> Tensor:
    if _active():
        dist.all_reduce(values, op=dist.ReduceOp.MIN)
    return values


@torch.no_grad()
def average_tensors(tensors: Iterable[Tensor]) -> None:
    """Average floating-point tensors (e.g. BatchNorm running statistics) in place over ranks."""
    if not _active():
        return
    for t in tensors:
        if t.is_floating_point():
            dist.all_reduce(t)
            t /= _INFO.world_size


def barrier() -> None:
    if _active():
        dist.barrier()


def all_gather_object(obj):
    if not _active():
        return [obj]
    out = [None] * _INFO.world_size
    dist.all_gather_object(out, obj)
    return out
