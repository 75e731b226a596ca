"""Optimiser and learning-rate schedule of the recipe.

AdamW with betas ``(0.9, beta2)``; weight decay on every trainable tensor except 1-d
ones, biases and normalisation weights. The learning rate is set per iteration
(global step, counted across epochs): linear from ``warmup_lr`` to ``init_lr`` over
``warmup_steps``, then cosine from ``init_lr`` to ``min_lr`` over the remaining
``max_epoch * iters_per_epoch - warmup_steps`` steps (upstream's
``linear_warmup_cosine_lr``), or over the length a time budget fitted
(:mod:`click4caption.training.budget`).
"""
from __future__ import annotations

import logging
import math

import torch
from torch import nn

from click4caption.config import RunConfig
from click4caption.errors import ConfigError

logger = logging.getLogger(__name__)

SCHEDULES = ("linear_warmup_cosine_lr",)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)) or \
        "norm" in type(module).__name__.lower()


def param_groups(model: nn.Module, weight_decay: float) -> tuple[list[dict], list[list[str]]]:
    """Trainable parameters split into ``[decayed, not decayed]`` optimiser groups.

    Returns:
        ``(groups, names)``; ``names[g]`` lists group ``g``'s parameter names in order
        (stored in checkpoints to check that a resumed optimiser matches).
    """
    norm_params = {id(p) for m in model.modules() if _is_norm(m) for p in m.parameters(recurse=False)}
    decay, no_decay = [], []
    decay_names, no_decay_names = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name.endswith("bias") or id(p) in norm_params:
            no_decay.append(p)
            no_decay_names.append(name)
        else:
            decay.append(p)
            decay_names.append(name)
    groups = [{"params": decay, "weight_decay": float(weight_decay)}, {"params": no_decay, "weight_decay": 0.0}]
    return groups, [decay_names, no_decay_names]


def build_optimizer(model: nn.Module, run: RunConfig) -> tuple[torch.optim.AdamW, list[list[str]]]:
    """AdamW over the trainable parameters (see :func:`param_groups`).

    Raises:
        ConfigError: nothing is trainable.
    """
    groups, names = param_groups(model, run.weight_decay)
    count = sum(p.numel() for g in groups for p in g["params"])
    if count == 0:
        raise ConfigError("no trainable parameter: every part is frozen (model.freeze_*)")
    logger.info("trainable parameters: %s (%d tensors with weight decay %g, %d without)",
                f"{count:,}", len(names[0]), run.weight_decay, len(names[1]))
    opt = torch.optim.AdamW(groups, lr=lr_at(0, run), betas=(0.9, float(run.beta2)),
                            weight_decay=float(run.weight_decay))
    return opt, names


def total_steps(run: RunConfig) -> int:
    """Iterations of the whole run: ``max_epoch * iters_per_epoch``."""
    return int(run.max_epoch) * int(run.iters_per_epoch)


def check_schedule(run: RunConfig) -> None:
    """Raises ConfigError for schedule settings the trainer cannot run."""
    if run.lr_sched not in SCHEDULES:
        raise ConfigError(f"run.lr_sched '{run.lr_sched}' is not supported (known: {', '.join(SCHEDULES)})")
    if run.max_epoch < 1 or run.iters_per_epoch < 1:
        raise ConfigError(f"run.max_epoch ({run.max_epoch}) and run.iters_per_epoch ({run.iters_per_epoch}) must be >= 1")
    if run.warmup_steps < 0:
        raise ConfigError(f"run.warmup_steps must be >= 0, got {run.warmup_steps}")
    if run.time_budget_s is not None and not run.time_budget_s > 0:
        raise ConfigError(f"run.time_budget_s must be > 0 seconds (or null: no budget), got {run.time_budget_s}")
    if run.accum_grad_iters < 1:
        raise ConfigError(f"run.accum_grad_iters must be >= 1, got {run.accum_grad_iters}")


def lr_at(step: int, run: RunConfig, total: int | None = None) -> float:
    """Learning rate of global iteration ``step`` (0-based) in a run of ``total``
    iterations (default :func:`total_steps`)."""
    warmup_start = run.warmup_lr if run.warmup_lr >= 0 else run.init_lr
    if step < run.warmup_steps:
        return min(run.init_lr, warmup_start + (run.init_lr - warmup_start) * step / max(run.warmup_steps, 1))
    decay_steps = max((total_steps(run) if total is None else total) - run.warmup_steps, 1)
    progress = min((step - run.warmup_steps) / decay_steps, 1.0)
    return run.min_lr + (run.init_lr - run.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
