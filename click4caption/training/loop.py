"""The training loop as one unit: setup -> train -> save -> cleanup.

:class:`Trainer` runs the recipe of ``design/architecture.md`` section 7 from a
:class:`~click4caption.config.Config`: datasets mixed by ``sample_ratio`` (one batch per
iteration, see :mod:`click4caption.data.mixing`), AdamW with the per-step warmup +
cosine schedule, gradient accumulation, autocast (bf16, or fp16 with a GradScaler; off
on the CPU), optional gradient clipping, DDP under torchrun, periodic atomic
checkpoints and exact resuming.

Reproducibility: before each iteration torch's RNG is seeded from
``(seed, rank, step)`` (dropout, the random near-full boxes of whole-image captions),
and the batch of each step is a pure function of the same numbers, so a run resumed
from a checkpoint at step ``t`` continues exactly as the uninterrupted run would have
(up to non-deterministic kernels: ``run.deterministic`` turns on torch's deterministic
algorithms, which on a CPU make two runs of one config equal bit for bit).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from click4caption import registry
from click4caption.cpu import flush_denormals, flushed_in_every_thread
from click4caption.config import Config, ModelConfig
from click4caption.data.sources import BatchPosition
from click4caption.data.mixing import MixedBatches, build_sources, make_loader, split_meta
from click4caption.errors import CheckpointError, Click4CaptionError, ConfigError
from click4caption.training import checkpointing as ckpt_io
from click4caption.training.budget import TimeBudget
from click4caption.training.distributed import (
    DistInfo, all_gather_objects, all_reduce_sum, barrier, cleanup, init_distributed,
)
from click4caption.training.freezing import frozen_parts
from click4caption.training.optim import build_optimizer, check_schedule, lr_at, set_lr, total_steps

logger = logging.getLogger(__name__)

ModelFactory = Callable[[ModelConfig, torch.device, bool], nn.Module]
AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
TORCH_SEED_STREAM = 2  # generator stream of the per-step torch seed (data uses 0 and 1)
LOG_FILE = "train.log"
TB_DIR = "tensorboard"


@dataclass
class TrainResult:
    """What a finished (or dry) run did."""

    output_dir: Path
    start_iteration: int
    end_iteration: int
    losses: list[tuple[int, float]] = field(default_factory=list)  # (iteration, loss) on this rank
    skipped: dict[str, int] = field(default_factory=dict)          # all ranks, rank 0 only
    sources: dict[str, int] = field(default_factory=dict)          # batches per dataset on this rank
    last_checkpoint: Path | None = None


def step_seed(seed: int, rank: int, step: int) -> int:
    """Torch seed of one iteration on one rank."""
    return int(np.random.SeedSequence([seed, rank, step, TORCH_SEED_STREAM]).generate_state(1, np.uint64)[0] >> 1)


def use_deterministic_algorithms(device: torch.device) -> None:
    """Make torch pick deterministic kernels for the rest of the process (``run.deterministic``).

    On a CPU, two runs were equal bit for bit on an idle machine but not on a busy one: some
    backward kernel's result (the gradient into the image tokens) followed the threads'
    timing, and 15,000 steps grew the last bits into different models. A kernel without a
    deterministic version warns instead of failing (``warn_only``); on CUDA cuBLAS needs a
    fixed workspace, set here unless the user set one.
    """
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    logger.info("deterministic algorithms on (run.deterministic)")


def _default_factory(cfg: ModelConfig, device: torch.device, for_training: bool) -> nn.Module:
    from click4caption.models.builder import build_model

    return build_model(cfg, device=device, for_training=for_training)


def _no_forward_buffer_sync() -> dict[str, bool]:
    """DDP syncs buffers once at init; no buffer changes in training, so skip the
    per-forward broadcast (the keyword was renamed in newer torch)."""
    import inspect

    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def _trainable_in_fp32(model: nn.Module) -> None:
    """Trainable fp16/bf16 tensors (e.g. an LLM loaded in fp16 and not frozen) become
    fp32 master weights; autocast still runs the compute in half precision."""
    upcast = [n for n, p in model.named_parameters() if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16)]
    for name, p in model.named_parameters():
        if name in upcast:
            p.data = p.data.float()
    if upcast:
        logger.info("keeping %d trainable half-precision tensors in fp32 (master weights)", len(upcast))


def _next_batch(batches: Iterator[dict[str, Any]]) -> dict[str, Any]:
    """The next batch; a dataset error raised in a loader worker comes back as one line."""
    try:
        return next(batches)
    except Click4CaptionError as err:
        lines = [l for l in str(err).splitlines() if l.strip()]
        last = lines[-1] if lines else type(err).__name__
        prefix = f"{type(err).__name__}: "
        raise type(err)(last[len(prefix):] if last.startswith(prefix) else last) from None


def _num_samples(samples: dict[str, Any]) -> int:
    """Images (caption data) or records (conversations) in a batch."""
    if "conversations" in samples:
        return len(samples["conversations"])
    return int(samples["image"].shape[0])


def _to_device(samples: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in samples.items()}


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


class Trainer:
    """Train Click4Caption as ``cfg`` says; outputs go to ``run.output_dir/exp_name/``.

    Args:
        cfg: the resolved configuration.
        exp_name: experiment name (the output sub-folder).
        dry_run: build everything, draw one batch per dataset, run no step.
        model_factory: ``(model_cfg, device, for_training) -> model`` (tests use it);
            default :func:`click4caption.models.builder.build_model`.
    """

    def __init__(self, cfg: Config, exp_name: str, dry_run: bool = False,
                 model_factory: ModelFactory | None = None) -> None:
        if not exp_name or "/" in exp_name or exp_name in (".", ".."):
            raise ConfigError(f"--exp_name must be a plain folder name, got {exp_name!r}")
        self.cfg = cfg
        self.run = cfg.run
        self.exp_name = exp_name
        self.dry_run = dry_run
        self.model_factory = model_factory or _default_factory
        self.out_dir = Path(self.run.output_dir).expanduser() / exp_name
        self.dist = DistInfo()
        self.start_iteration = 0
        self.total = total_steps(self.run)  # a time budget may shorten it (run.time_budget_s)
        self.clock: Callable[[], float] = time.perf_counter  # tests replace it
        self.skipped_before: Counter = Counter()  # all ranks, before this process (restored on resume)
        self.rank_skipped: Counter = Counter()    # this rank, since this process started
        self._log_handler: logging.Handler | None = None
        self._saved_level: int | None = None
        self._saved_determinism: tuple[bool, bool] | None = None
        self._tb: Any = None
        self._setup_done = False

    # ================================================================== setup
    def setup(self) -> None:
        run = self.run
        check_schedule(run)
        registry.get("task", run.task)  # unknown task names fail here
        if run.amp_dtype not in AMP_DTYPES:
            raise ConfigError(f"run.amp_dtype must be one of {', '.join(AMP_DTYPES)}, got '{run.amp_dtype}'")
        if run.save_every_iters < 1 or run.log_freq < 1:
            raise ConfigError("run.save_every_iters and run.log_freq must be >= 1")
        self.dist = init_distributed(run)
        self._setup_output()
        logger.info("experiment %s: %d process(es), device %s, backend %s", self.exp_name, self.dist.world_size,
                    self.dist.device, self.dist.backend or "none")
        if flush_denormals(self.dist.device):
            if flushed_in_every_thread():
                logger.info("CPU: denormal floats are flushed to zero (click4caption.cpu.flush_denormals)")
            else:
                logger.warning("CPU: denormal floats are flushed to zero in some of torch's threads only (its thread "
                               "pool started before); steps may slow down as training goes on. Call "
                               "click4caption.cpu.flush_denormals('cpu') before any torch computation")
        if run.deterministic:  # restored by cleanup (the setting is the process's)
            self._saved_determinism = (torch.are_deterministic_algorithms_enabled(),
                                       torch.is_deterministic_algorithms_warn_only_enabled())
            use_deterministic_algorithms(self.dist.device)
        random.seed(run.seed + self.dist.rank)
        torch.manual_seed(run.seed + self.dist.rank)
        np.random.seed((run.seed + self.dist.rank) % 2**32)

        resume_path = ckpt_io.resolve_resume_path(run.resume_ckpt_path, self.out_dir)
        checkpoint = ckpt_io.load_checkpoint(resume_path) if resume_path else None

        self.sources = build_sources(self.cfg, self.cfg.model.image_size)
        for source in self.sources:
            logger.info("dataset %s", source.describe())

        self.model = self.model_factory(self.cfg.model, self.dist.device, True)
        self.model.freeze(frozen_parts(self.cfg.model))
        self._check_image_size()
        _trainable_in_fp32(self.model)
        self.model.train()
        self.optimizer, self.group_names = build_optimizer(self.model, run)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self._setup_precision()
        if checkpoint is not None:
            self._restore(checkpoint, resume_path)
        starts = all_gather_objects(self.start_iteration, self.dist)
        if len(set(starts)) > 1:
            raise CheckpointError(f"ranks would resume at different iterations {starts}: the checkpoint must be "
                                  "readable by every process (put run.output_dir on storage all nodes share)")
        self.ddp_model: nn.Module = self.model
        if self.dist.distributed:
            self.ddp_model = DDP(
                self.model,
                device_ids=[self.dist.local_rank] if self.dist.device.type == "cuda" else None,
                find_unused_parameters=run.find_unused_parameters,
                **_no_forward_buffer_sync(),
            )
        self.batches = MixedBatches(self.sources, run.seed, self.dist.rank, self.dist.world_size, self.total)
        if self.dist.is_main and not self.dry_run:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out_dir / TB_DIR), purge_step=self.start_iteration or None)
        self._setup_done = True

    def _setup_output(self) -> None:
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            ckpt_io.remove_stale_temporaries(self.out_dir)
            handler = logging.FileHandler(self.out_dir / LOG_FILE, encoding="utf-8")
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            handler.setLevel(logging.INFO)
            logging.getLogger().addHandler(handler)
            self._log_handler = handler
            ours = logging.getLogger("click4caption")
            if ours.getEffectiveLevel() > logging.INFO:  # the log file gets our INFO lines
                self._saved_level = ours.level
                ours.setLevel(logging.INFO)
            (self.out_dir / "config.yaml").write_text(OmegaConf.to_yaml(self.cfg.to_dict()), encoding="utf-8")
        barrier(self.dist)

    def _check_image_size(self) -> None:
        size = getattr(self.model, "img_size", self.cfg.model.image_size)
        for source in self.sources:
            own = getattr(source, "image_size", None)
            if own is not None and own != size:
                raise ConfigError(f"datasets.{source.name}: images are made {own} px but the model input is "
                                  f"{size} px (set vis_processor.train.image_size: {size})")

    def _setup_precision(self) -> None:
        run = self.run
        on_gpu = self.dist.device.type == "cuda"
        self.amp_dtype = AMP_DTYPES[run.amp_dtype] if (run.amp and on_gpu) else None
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        if run.amp and not on_gpu:
            logger.info("run.amp is set but the device is the CPU: training in full precision")

    def _restore(self, ckpt: dict[str, Any], path: Path) -> None:
        """Model (trainable parts + buffers), optimizer, scaler and step from ``ckpt``."""
        ckpt_io.load_trainable_state_dict(self.model, ckpt["model"], str(path))
        names = ckpt.get("optimizer_param_names")
        if names is not None and [list(n) for n in names] != self.group_names:
            raise CheckpointError(f"{path}: its optimizer was built over other trainable parameters "
                                  "(were the freeze_* flags changed?)")
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (KeyError, ValueError) as err:
            raise CheckpointError(f"{path}: optimizer state does not fit: {err}") from None
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.start_iteration = int(ckpt.get("iteration", 0))
        fitted = ckpt.get("total_iterations")
        if self.run.time_budget_s is not None and fitted is not None:  # the schedule goes on as it was fitted
            self.total = max(self.start_iteration, min(int(fitted), self.total))
        data = ckpt.get("data_state") or {}
        self.skipped_before = Counter({str(k): int(v) for k, v in (data.get("skipped") or {}).items()})
        if data.get("world_size") not in (None, self.dist.world_size) or data.get("seed") not in (None, self.run.seed):
            logger.warning("resuming with world size %d / seed %d instead of %s / %s: the data stream differs "
                           "from the original run's from here on", self.dist.world_size, self.run.seed,
                           data.get("world_size"), data.get("seed"))
        old = _flatten(ckpt.get("config") or {})
        new = _flatten(self.cfg.to_dict())
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k != "run.resume_ckpt_path")
        if changed:
            logger.warning("config differs from the checkpoint's in: %s", ", ".join(changed))
        logger.info("resumed from %s at iteration %d", path, self.start_iteration)

    # ================================================================== train
    def train(self) -> TrainResult:
        """Run from ``start_iteration`` to ``max_epoch * iters_per_epoch``."""
        if not self._setup_done:
            self.setup()
        result = TrainResult(self.out_dir, self.start_iteration, self.start_iteration)
        if self.dry_run:
            self._dry_run_report()
            return result
        if self.start_iteration >= self.total:
            logger.info("nothing to do: the checkpoint is at iteration %d of %d", self.start_iteration, self.total)
            return result
        run = self.run
        accum = run.accum_grad_iters
        loader = make_loader(self.batches, self.start_iteration, run.num_workers,
                             pin_memory=self.dist.device.type == "cuda")
        window = _Window()
        pending_save, pending_epoch = False, None
        bar = tqdm(total=self.total, initial=self.start_iteration, desc=self.exp_name, unit="it",
                   disable=not self.dist.is_main, dynamic_ncols=True,
                   mininterval=1.0 if sys.stderr.isatty() else 30.0)
        logger.info("training iterations %d..%d (%d per epoch, %d epochs), accumulating %d", self.start_iteration,
                    self.total, run.iters_per_epoch, run.max_epoch, accum)
        budget = (TimeBudget(run.time_budget_s, self.start_iteration, total_steps(run), clock=self.clock)
                  if run.time_budget_s is not None else None)
        if budget is not None:
            logger.info("time budget: %.0f s of training; the iterations are fitted to the measured rate",
                        run.time_budget_s)
        self.optimizer.zero_grad(set_to_none=True)
        batches: Iterator[dict[str, Any]] = iter(loader)
        it = self.start_iteration
        with logging_redirect_tqdm():  # log lines do not break the bar
            while it < self.total:
                batch = _next_batch(batches)
                samples, meta = split_meta(batch)
                if meta.get("_step") != it:
                    raise RuntimeError(f"data loader out of order: got step {meta.get('_step')} at iteration {it}")
                lr = lr_at(it, run, self.total)
                set_lr(self.optimizer, lr)
                seed = step_seed(run.seed, self.dist.rank, it)
                torch.manual_seed(seed)
                random.seed(seed)  # e.g. the training prompt a caption batch draws
                sync = (it + 1) % accum == 0 or it + 1 == self.total
                loss, extras = self._forward_backward(_to_device(samples, self.dist.device), sync, accum)
                if sync:
                    self._optimizer_step()
                result.sources[meta["_source"]] = result.sources.get(meta["_source"], 0) + 1
                skipped = meta.get("_skipped", {})
                self.rank_skipped.update(skipped)
                window.add(it, loss, _num_samples(samples), skipped, extras)  # no device sync here
                bar.update(1)

                done = it + 1
                it = done
                if budget is not None and sync and done % run.log_freq == 0:
                    self._fit_to_budget(budget, done, bar)
                epoch_end = done % run.iters_per_epoch == 0
                if epoch_end:
                    pending_epoch = (done - 1) // run.iters_per_epoch
                if done % run.log_freq == 0 or done == self.total:
                    result.losses.extend(self._log(done, lr, window, bar))
                    window = _Window()
                pending_save = pending_save or done % run.save_every_iters == 0 or epoch_end or done == self.total
                if pending_save and sync:  # saves wait for the end of an accumulation
                    result.last_checkpoint = self.save(done, epoch_end=pending_epoch)
                    pending_save, pending_epoch = False, None
        bar.close()
        if budget is not None:
            logger.info("time budget: %d of %d iterations in %.0f s (budget %.0f s)", self.total - self.start_iteration,
                        total_steps(run) - self.start_iteration, budget.elapsed(), run.time_budget_s)
        result.end_iteration = self.total
        result.skipped = dict(self.total_skipped())
        return result

    def _fit_to_budget(self, budget: TimeBudget, done: int, bar: tqdm) -> None:
        """Refit ``self.total`` to the time left (rank 0 decides, every rank follows)."""
        fitted = budget.refit(done, self.total)
        fitted = int(all_reduce_sum([float(fitted) if self.dist.is_main else 0.0], self.dist)[0])
        if fitted == self.total:
            return
        if self.total == total_steps(self.run) or fitted == done:
            logger.info("time budget: %d iterations fit (of %d configured; %.0f s of %.0f s used at iteration %d)",
                        fitted, total_steps(self.run), budget.elapsed(), budget.budget_s, done)
        self.total = fitted
        bar.total = fitted
        bar.refresh()

    def _forward_backward(self, samples: dict[str, Any], sync: bool, accum: int
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one batch and its backward pass (gradients synced across ranks only
        when ``sync``). Returns the loss and any other scalars the model reported."""
        no_sync = self.ddp_model.no_sync() if (isinstance(self.ddp_model, DDP) and not sync) else contextlib.nullcontext()
        with no_sync:
            autocast = (torch.autocast(device_type=self.dist.device.type, dtype=self.amp_dtype)
                        if self.amp_dtype is not None else contextlib.nullcontext())
            with autocast:
                out = self.ddp_model(samples)
            loss = out["loss"]
            scaled = loss.float() / accum
            if self.scaler is not None:
                self.scaler.scale(scaled).backward()
            else:
                scaled.backward()
        extras = {k: v.detach() for k, v in out.items()
                  if k != "loss" and isinstance(v, torch.Tensor) and v.numel() == 1}
        return loss.detach(), extras

    def _optimizer_step(self) -> None:
        """Unscale, clip, step (skipped when gradients are not finite), zero grads."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.run.grad_clip if self.run.grad_clip else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the step itself on inf/nan
            self.scaler.update()
        elif torch.isfinite(grad_norm):
            self.optimizer.step()
        else:
            logger.warning("non-finite gradient norm: optimizer step skipped")
        self.optimizer.zero_grad(set_to_none=True)

    def total_skipped(self) -> Counter:
        """Skipped samples of all ranks since the run began (every rank must call it)."""
        total = Counter(self.skipped_before)
        for part in all_gather_objects(dict(self.rank_skipped), self.dist):
            total.update(part)
        return total

    def _log(self, done: int, lr: float, window: "_Window", bar: tqdm) -> list[tuple[int, float]]:
        """Reduce the window's numbers over ranks; rank 0 logs them (every rank calls this).
        Returns this rank's ``(iteration, loss)`` of the window (one device sync per log line)."""
        losses = window.values()
        finite = [v for _, v in losses if math.isfinite(v)]
        loss_sum, iters, images = all_reduce_sum([sum(finite), len(finite), window.images], self.dist)
        extras_here = {k: (float(torch.stack(v).float().sum()), len(v)) for k, v in window.extras.items()}
        parts = all_gather_objects((dict(window.skipped), extras_here), self.dist)
        total_skipped = self.total_skipped()
        if not self.dist.is_main:
            return losses
        extras: dict[str, list[float]] = {}
        for _, ex in parts:
            for k, (total, n) in ex.items():
                extras.setdefault(k, [0.0, 0])
                extras[k][0] += total
                extras[k][1] += n
        extra_means = {k: t / n for k, (t, n) in sorted(extras.items()) if n}
        elapsed = max(time.perf_counter() - window.t0, 1e-9)
        loss = loss_sum / max(iters, 1)
        rate = images / elapsed
        skipped_now = sum(sum(p[0].values()) for p in parts)
        detail = ", ".join(f"{k} {v}" for k, v in sorted(total_skipped.items()))
        epoch = (done - 1) // self.run.iters_per_epoch
        logger.info("iter %d/%d epoch %d | loss %.4f%s | lr %.3e | samples/s %.1f | skipped %d (total %d%s)",
                    done, self.total, epoch, loss, "".join(f" | {k} {v:.4f}" for k, v in extra_means.items()),
                    lr, rate, skipped_now, sum(total_skipped.values()), f": {detail}" if detail else "")
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        if self._tb is not None:
            self._tb.add_scalar("train/loss", loss, done)
            self._tb.add_scalar("train/lr", lr, done)
            self._tb.add_scalar("train/samples_per_s", rate, done)
            self._tb.add_scalar("train/skipped_samples", sum(total_skipped.values()), done)
            for k, v in extra_means.items():
                self._tb.add_scalar(f"train/{k}", v, done)
            self._tb.flush()
        return losses

    # ================================================================== save
    def checkpoint_state(self, iteration: int, skipped: Counter) -> dict[str, Any]:
        """The checkpoint dict after ``iteration`` finished iterations (``skipped``: all
        ranks' skipped samples since the run began)."""
        return {
            "model": ckpt_io.trainable_state_dict(self.model),
            "optimizer": self.optimizer.state_dict(),
            "optimizer_param_names": self.group_names,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": max(iteration - 1, 0) // self.run.iters_per_epoch,
            "iteration": iteration,
            "total_iterations": self.total,  # less than the config's when a time budget cut the run
            "config": self.cfg.to_dict(),
            "data_state": {"scheme": "step-indexed", "seed": self.run.seed, "world_size": self.dist.world_size,
                           "next_step": iteration, "skipped": dict(skipped)},
            "version": ckpt_io.FORMAT_VERSION,
        }

    def save(self, iteration: int, epoch_end: int | None = None) -> Path | None:
        """Rank 0 writes the checkpoint (atomically); other ranks return None (every rank
        calls this: the skipped-sample counts are gathered)."""
        skipped = self.total_skipped()
        if not self.dist.is_main:
            return None
        path = ckpt_io.write_checkpoint(self.checkpoint_state(iteration, skipped), self.out_dir, iteration,
                                        self.run.keep_last_ckpts, epoch_end)
        logger.info("saved %s%s", path, f" (end of epoch {epoch_end})" if epoch_end is not None else "")
        return path

    # ================================================================== cleanup
    def cleanup(self, ok: bool = True) -> None:
        """Close the outputs and the process group. After an error no barrier is
        entered (the other ranks may be blocked elsewhere; torchrun stops them)."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self.dist.distributed:
            try:
                if ok:
                    barrier(self.dist)
            finally:
                cleanup(self.dist)
        if self._log_handler is not None:
            logging.getLogger().removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None
        if self._saved_level is not None:
            logging.getLogger("click4caption").setLevel(self._saved_level)
            self._saved_level = None
        if self._saved_determinism is not None:
            enabled, warn_only = self._saved_determinism
            torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
            self._saved_determinism = None

    # ================================================================== dry run
    def _dry_run_report(self) -> None:
        run = self.run
        n_train = sum(p.numel() for p in self.params)
        logger.info("dry run: %d iterations (%d epochs x %d), lr %.2e -> %.2e at step %d -> %.2e at the end",
                    self.total, run.max_epoch, run.iters_per_epoch, lr_at(0, run),
                    lr_at(min(run.warmup_steps, self.total - 1), run), run.warmup_steps, lr_at(self.total - 1, run))
        logger.info("dry run: %s trainable parameters; outputs in %s; starting at iteration %d",
                    f"{n_train:,}", self.out_dir, self.start_iteration)
        for source in self.sources:
            rng = np.random.default_rng([run.seed, self.dist.rank, 0])
            batch, skipped = source.draw_batch(rng, BatchPosition(0, 0, self.dist.rank, self.dist.world_size, run.seed))
            shapes = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else len(v) for k, v in batch.items()}
            logger.info("dry run: %s batch %s%s", source.name, shapes, f", skipped {dict(skipped)}" if skipped else "")


class _Window:
    """Numbers gathered between two log lines on one rank, kept on the device until then."""

    def __init__(self) -> None:
        self.iterations: list[int] = []
        self.losses: list[torch.Tensor] = []
        self.images = 0
        self.skipped: Counter = Counter()
        self.extras: dict[str, list[torch.Tensor]] = {}
        self.t0 = time.perf_counter()

    def add(self, iteration: int, loss: torch.Tensor, images: int, skipped: dict[str, int],
            extras: dict[str, torch.Tensor]) -> None:
        self.iterations.append(iteration)
        self.losses.append(loss.detach())
        self.images += images
        self.skipped.update(skipped)
        for k, v in extras.items():
            self.extras.setdefault(k, []).append(v)

    def values(self) -> list[tuple[int, float]]:
        """``(iteration, loss)`` of the window, read from the device at once."""
        if not self.losses:
            return []
        return list(zip(self.iterations, torch.stack(self.losses).float().cpu().tolist()))


def run_training(cfg: Config, exp_name: str, dry_run: bool = False,
                 model_factory: ModelFactory | None = None) -> TrainResult:
    """setup -> train -> save -> cleanup (cleanup also runs after an error)."""
    trainer = Trainer(cfg, exp_name, dry_run=dry_run, model_factory=model_factory)
    ok = False
    try:
        trainer.setup()
        result = trainer.train()
        ok = True
        return result
    finally:
        trainer.cleanup(ok)
