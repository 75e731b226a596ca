"""Process groups for training under torchrun (DDP), and rank helpers.

Under ``torchrun`` (``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` in the environment) the
process group is started with NCCL when the run uses GPUs and gloo on CPUs, from
``run.dist_url`` (``env://``: torchrun's ``MASTER_ADDR``/``MASTER_PORT``, so several
nodes work with torchrun's usual ``--nnodes``/``--node-rank``/``--rdzv-*``
arguments). Without torchrun the trainer runs as one process without a group. The
environment and the group are :mod:`click4caption.parallel`'s; this module adds the
training device and the collectives the trainer uses.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from click4caption import parallel
from click4caption.config import RunConfig
from click4caption.errors import ConfigError

logger = logging.getLogger(__name__)

#: how long a rank waits for the others (a checkpoint write may hold rank 0 for a while)
GROUP_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class DistInfo(parallel.DistContext):
    """Where this training process sits, and its device."""

    device: torch.device = torch.device("cpu")


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
    ctx = parallel.dist_context()
    device = pick_device(run, ctx.local_rank)
    if ctx.world_size > 1 and not run.distributed:
        logger.warning("run.distributed is False but %d processes were launched: using DDP anyway", ctx.world_size)
    ctx = parallel.init(ctx, device, init_method=run.dist_url, timeout=GROUP_TIMEOUT)
    return DistInfo(**asdict(ctx), device=device)


barrier = parallel.barrier
cleanup = parallel.cleanup


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
