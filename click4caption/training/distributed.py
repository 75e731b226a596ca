"""Process-group setup for torchrun (DDP), and rank helpers.

Under ``torchrun`` (``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` in the environment) the
process group is started with NCCL when the run uses GPUs and gloo on CPUs, from
``run.dist_url`` (``env://``: torchrun's ``MASTER_ADDR``/``MASTER_PORT``, so several
nodes work with torchrun's usual ``--nnodes``/``--node-rank``/``--rdzv-*``
arguments). Without torchrun the trainer runs as one process without a group.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from click4caption.config import RunConfig
from click4caption.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise ConfigError(f"environment variable {name} must be an integer, got {os.environ[name]!r}") from None


def pick_device(run: RunConfig, local_rank: int) -> torch.device:
    """``run.device`` for this process: ``cuda`` -> ``cuda:<local rank>``; falls back to
    the CPU (with a warning) when no GPU is visible."""
    kind = torch.device(run.device).type
    if kind == "cuda":
        if not torch.cuda.is_available():
            logger.warning("run.device is 'cuda' but no GPU is visible: training on the CPU")
            return torch.device("cpu")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"local rank {local_rank} but only {torch.cuda.device_count()} GPUs are visible")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if kind != "cpu":
        raise ConfigError(f"run.device '{run.device}' is not supported (cuda or cpu)")
    return torch.device("cpu")


def init_distributed(run: RunConfig) -> DistInfo:
    """Start the process group when launched by torchrun with more than one process."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    device = pick_device(run, local_rank)
    if world_size <= 1:
        return DistInfo(rank=0, local_rank=local_rank, world_size=1, device=device)
    if not run.distributed:
        logger.warning("run.distributed is False but %d processes were launched: using DDP anyway", world_size)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method=run.dist_url, world_size=world_size, rank=rank,
                                timeout=timedelta(minutes=30),
                                device_id=device if device.type == "cuda" else None)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device, backend=backend)


def cleanup() -> None:
    """Destroy the process group if there is one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        if info.backend == "nccl":
            dist.barrier(device_ids=[info.local_rank])
        else:
            dist.barrier()


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Sum a few numbers over all ranks (every rank must call it)."""
    if not info.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj`` (small picklable objects only; every rank must call it)."""
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out
