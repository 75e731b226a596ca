"""Mixing several datasets into one step-indexed stream of batches.

Data-position semantics (what makes resuming exact):

- Which dataset step ``t`` draws from on rank ``r`` comes from one generator seeded
  with ``(seed, r)``: each step picks a dataset with probability proportional to its
  ``sample_ratio`` (as upstream's MultiIterLoader, seeded per rank).
- Everything random inside the batch of step ``t`` (regions, crops, replacements of
  broken samples, LAION shard and window) comes from a generator seeded with
  ``(seed, r, t)``.
- Map-style datasets walk DistributedSampler-like epochs: the ``k``-th batch a rank
  draws from a dataset takes positions ``k*B ..`` of that rank's share of a per-epoch
  permutation seeded by ``(seed, dataset, epoch)``.

So batch ``t`` is a pure function of ``(config, seed, rank, world_size, t)``: a run
resumed at step ``t`` draws exactly the batches the uninterrupted run would have drawn,
with no reader state to save. Changing ``world_size``, the seed or the datasets between
runs changes the stream from then on (the trainer warns).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from click4caption.config import Config, DatasetConfig, report_unused
from click4caption.data.sources import META_KEYS, BatchPosition, BatchSource, DatasetKind
from click4caption.errors import ConfigError

logger = logging.getLogger(__name__)

MIX_STREAM = 0   # generator stream: which dataset each step draws from
STEP_STREAM = 1  # generator stream: randomness inside one step's batch


class MixedBatches(Dataset):
    """``batches[t]`` is the collated batch of step ``t`` on this rank.

    A batch holds the model inputs of its dataset (see each dataset's ``collate``) plus
    ``_source`` (dataset name), ``_skipped`` ({reason: count} of samples replaced) and
    ``_step``.
    """

    def __init__(self, sources: Sequence[BatchSource], seed: int, rank: int, world_size: int, total_steps: int) -> None:
        if not sources:
            raise ConfigError("no training dataset configured (the datasets: section is empty)")
        ratios = np.array([float(s.sample_ratio) for s in sources])
        if np.any(ratios < 0) or not np.any(ratios > 0):
            raise ConfigError("datasets.*.sample_ratio must be >= 0 with at least one > 0, got "
                              + ", ".join(f"{s.name}={s.sample_ratio:g}" for s in sources))
        self.sources = list(sources)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.total_steps = int(total_steps)
        rng = np.random.default_rng([self.seed, self.rank, MIX_STREAM])
        self.choice = rng.choice(len(sources), size=self.total_steps, p=ratios / ratios.sum()).astype(np.int32)
        self.occurrence = np.zeros(self.total_steps, dtype=np.int64)
        for d in range(len(sources)):
            mask = self.choice == d
            self.occurrence[mask] = np.arange(int(mask.sum()))

    def __len__(self) -> int:
        return self.total_steps

    def source_at(self, step: int) -> BatchSource:
        return self.sources[int(self.choice[step])]

    def __getitem__(self, step: int) -> dict[str, Any]:
        source = self.source_at(step)
        rng = np.random.default_rng([self.seed, self.rank, int(step), STEP_STREAM])
        pos = BatchPosition(int(step), int(self.occurrence[step]), self.rank, self.world_size, self.seed)
        batch, skipped = source.draw_batch(rng, pos)
        batch["_source"] = source.name
        batch["_skipped"] = dict(skipped)
        batch["_step"] = int(step)
        return batch


def split_meta(batch: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(model inputs, bookkeeping)`` of a batch from :class:`MixedBatches`."""
    samples = {k: v for k, v in batch.items() if k not in META_KEYS}
    meta = {k: batch[k] for k in META_KEYS if k in batch}
    return samples, meta


def _as_collated(batch: Any) -> Any:
    """The loader's collate: a source's batch is collated already."""
    return batch


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def make_loader(batches: MixedBatches, start_step: int, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """A loader yielding ``batches[start_step]``, ``batches[start_step + 1]``, ... in order,
    built ahead by ``num_workers`` processes."""
    return DataLoader(
        batches,
        batch_size=None,
        sampler=range(int(start_step), len(batches)),
        num_workers=num_workers,
        collate_fn=_as_collated,
        pin_memory=pin_memory,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        prefetch_factor=2 if num_workers > 0 else None,
    )


def build_sources(cfg: Config, image_size: int) -> list[BatchSource]:
    """One source per ``datasets:`` entry, built by the registered builder of its name."""
    from click4caption import registry

    sources = []
    for name, dcfg in cfg.datasets.items():
        kind: DatasetKind = registry.get("dataset", name)
        batch_size = dcfg.special_batch_size or cfg.run.batch_size_train
        if batch_size < 1:
            raise ConfigError(f"datasets.{name}: batch size must be >= 1, got {batch_size}")
        sources.append(kind.build(dcfg, name, batch_size, image_size))
        report_unused(cfg.given, {f"datasets.{name}.{k}": why for k, why in kind.unused_keys.items()},
                      cfg.path or "config")
    return sources


def _eval_only(cfg: DatasetConfig, name: str, batch_size: int, image_size: int) -> BatchSource:
    raise ConfigError(f"datasets.{name} is only used for its vis_processor (eval configs); training on it is not "
                      "supported: use vg, textocr, laion or region_instruct")


#: ``cc_sbu_align``: upstream's eval configs name it only for its image processor
CC_SBU_ALIGN = DatasetKind(_eval_only)


@dataclass(frozen=True)
class Task:
    """A training task named by ``run.task``."""

    name: str
    description: str


IMAGE_TEXT_PRETRAIN = Task(
    "image_text_pretrain",
    "captioning loss on region captions, whole-image captions and region instructions, "
    "datasets mixed by sample_ratio",
)
