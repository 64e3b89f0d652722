"""Data-parallel training under ``torchrun``: process group set-up, DDP wrapping, reductions.

``torchrun --nproc_per_node=N -m hybridattn.train ...`` starts N processes with ``RANK``/``WORLD_SIZE``/
``LOCAL_RANK`` in their environment; :func:`init_distributed` joins them into a process group (NCCL when the
process has a GPU, gloo otherwise) and picks this process's device. Without ``torchrun`` it returns a world
of one, and every helper here is a no-op, so the trainer has a single code path.

How a global batch is split: every rank generates the same global batch (tasks are seeded and cheap) and
keeps its contiguous slice, so N processes together see exactly the batch a single process sees. The loss
of a rank is its sum over scored tokens divided by the *global* number of scored tokens, times N; DDP
averages gradients over ranks, which cancels the N, so the gradient equals the single-process one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None  # set by init_distributed for multi-process runs

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device=None) -> DistInfo:
    """Join the ``torchrun`` process group when there is one.

    Args:
        device: the device to train on; None = this process's GPU (``cuda:LOCAL_RANK``) when there is one,
            else the CPU.

    Returns:
        A :class:`DistInfo`; ``world_size == 1`` without ``torchrun``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=torch.device(device) if device is not None else None)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def wrap_model(model: nn.Module, info: DistInfo) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel for multi-process runs, else unchanged."""
    if not info.enabled:
        return model
    device_ids = [info.device.index] if info.device is not None and info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or ``model`` itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_reduce_sum(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum of ``x`` over ranks (a copy; ``x`` itself on a single process)."""
    if not info.enabled:
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def local_slice(global_batch: int, info: DistInfo) -> slice:
    """This rank's contiguous part of a global batch.

    Raises:
        ValueError: the global batch does not divide by the number of processes.
    """
    if global_batch % info.world_size:
        raise ValueError(f"batch_size: expected a multiple of the {info.world_size} processes, "
                         f"received {global_batch}")
    per = global_batch // info.world_size
    return slice(info.rank * per, (info.rank + 1) * per)
