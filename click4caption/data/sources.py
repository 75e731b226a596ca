"""Training datasets as *batch sources*, and what they share.

Every training dataset is a batch source: given a step-seeded random generator and the
position of its next batch, it returns one collated batch. Sources are random-access by
step (see :mod:`click4caption.data.mixing`), which is what makes a resumed run draw
exactly the batches the uninterrupted run would have drawn.

A sample that cannot be used (unreadable image, no valid region, empty caption, bad
box) raises :class:`SkipSample` with a short reason; the source draws a replacement
and counts the reason, and the trainer logs the counts. A run never crashes on a
broken sample, only when nearly every sample of a dataset is broken
(:class:`~click4caption.errors.DataError`).

Each dataset module declares itself as a :class:`DatasetKind` (its build function and
the keys of its ``datasets.<name>`` section it does not read), which the registry names.
"""
from __future__ import annotations

import logging
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from click4caption.boxes import scale_boxes
from click4caption.config import DatasetConfig, ProcessorConfig
from click4caption.errors import ConfigError, DataError
from click4caption.processors import build_processor

logger = logging.getLogger(__name__)

#: replacements tried per wanted sample before a dataset is declared broken
MAX_ATTEMPTS_PER_SAMPLE = 20
#: keys of a collated batch that are bookkeeping, not model input
META_KEYS = ("_source", "_skipped", "_step")
# processors that resize without cropping, so boxes scaled by S/W, S/H stay valid
BOX_SAFE_PROCESSORS = ("blip2_image_eval",)


class SkipSample(Exception):
    """This sample cannot be used; ``reason`` is a short counter name."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class BatchPosition:
    """Where a batch sits in a source's own stream on one rank.

    ``occurrence`` counts the earlier batches this rank drew from the same source;
    sources with epochs use it to address a without-replacement permutation.
    """

    step: int
    occurrence: int
    rank: int
    world_size: int
    seed: int


class BatchSource:
    """A named training dataset that yields whole collated batches.

    Args:
        name: its ``datasets:`` name.
        batch_size: items per batch.
        sample_ratio: how often the mixer draws from it, relative to the others.
        vis_processor: PIL image -> ``3xSxS`` tensor.
        image_size: S, the side of the images it makes (checked against the model's).

    Subclasses implement :meth:`draw_batch`.
    """

    def __init__(self, name: str, batch_size: int, sample_ratio: float, vis_processor: Any = None,
                 image_size: int | None = None) -> None:
        self.name = name
        self.batch_size = batch_size
        self.sample_ratio = sample_ratio
        self.vis_processor = vis_processor
        self.image_size = image_size

    def draw_batch(self, rng: np.random.Generator, pos: BatchPosition) -> tuple[dict[str, Any], Counter]:
        """Return ``(collated batch, skipped-sample counts by reason)``."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line for the log."""
        return f"{self.name}: ratio {self.sample_ratio:g}, batch {self.batch_size}"


class MapSource(BatchSource):
    """A source of indexable items with DistributedSampler-like epochs.

    Batch ``k`` of this source on rank ``r`` takes positions ``k*B .. k*B+B-1`` of the
    rank's stream: epoch ``e`` is a permutation of all items seeded by
    ``(seed, e)``, and rank ``r`` owns every ``world_size``-th entry of it, so ranks
    see disjoint items and each epoch visits every item once. A broken item is
    replaced by a uniformly random other one (drawn from the step's generator).
    """

    def __len__(self) -> int:
        raise NotImplementedError

    def load_item(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        """Load and transform item ``index``; raise :class:`SkipSample` if unusable."""
        raise NotImplementedError

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        raise NotImplementedError

    # the permutation of the last epoch used, per process
    _perm_cache: tuple[int, np.ndarray] | None = None

    def _permutation(self, seed: int, epoch: int) -> np.ndarray:
        cached = self._perm_cache
        if cached is not None and cached[0] == epoch:
            return cached[1]
        perm = self.epoch_order(np.random.default_rng([seed, _stable_id(self.name), epoch]))
        self._perm_cache = (epoch, perm)
        return perm

    def epoch_order(self, rng: np.random.Generator) -> np.ndarray:
        """One epoch's order of all item indices (a permutation), drawn from ``rng``."""
        return rng.permutation(len(self))

    def index_at(self, position: int, rank: int, world_size: int, seed: int) -> int:
        """Item index at ``position`` of rank ``rank``'s stream."""
        n = len(self)
        per_rank = len(range(rank, n, world_size)) if n > rank else 0
        if per_rank == 0:  # fewer items than ranks: this rank shares them
            per_rank, rank, world_size = n, 0, 1
        epoch, offset = divmod(position, per_rank)
        return int(self._permutation(seed, epoch)[rank + offset * world_size])

    def draw_batch(self, rng: np.random.Generator, pos: BatchPosition) -> tuple[dict[str, Any], Counter]:
        skipped: Counter = Counter()
        items: list[dict[str, Any]] = []
        start = pos.occurrence * self.batch_size
        for j in range(self.batch_size):
            index = self.index_at(start + j, pos.rank, pos.world_size, pos.seed)
            items.append(self._load_with_replacements(index, rng, skipped))
        return self.collate(items), skipped

    def _load_with_replacements(self, index: int, rng: np.random.Generator, skipped: Counter) -> dict[str, Any]:
        last: SkipSample | None = None
        for _ in range(MAX_ATTEMPTS_PER_SAMPLE):
            try:
                return self.load_item(index, rng)
            except SkipSample as err:
                last = err
            except Exception as err:  # a sample must never stop the run
                last = SkipSample("error", f"{type(err).__name__}: {err}")
            skipped[last.reason] += 1
            if skipped[last.reason] <= 1:
                logger.debug("%s: skipped item %d (%s)", self.name, index, last)
            index = int(rng.integers(len(self)))
        raise DataError(f"datasets.{self.name}: {MAX_ATTEMPTS_PER_SAMPLE} samples in a row were unusable "
                        f"(last: {last}); check the dataset files")


def at_least_one(value: int, name: str, key: str) -> int:
    """``value`` when it is >= 1.

    Raises:
        ConfigError: naming ``datasets.<name>.<key>``.
    """
    if value < 1:
        raise ConfigError(f"datasets.{name}.{key} must be >= 1, got {value}")
    return value


@dataclass(frozen=True)
class DatasetKind:
    """A training dataset as the registry knows it.

    Attributes:
        build: ``(cfg, name, batch_size, image_size) -> BatchSource``.
        unused_keys: keys of ``datasets.<name>`` this data does not read, with why
            (reported by name when a config sets them).
    """

    build: Callable[[DatasetConfig, str, int, int], BatchSource]
    unused_keys: dict[str, str] = field(default_factory=dict)


def _stable_id(name: str) -> int:
    """A process-independent integer for a name (``hash()`` is salted per process)."""
    return zlib.crc32(name.encode("utf-8"))



def processor_config(cfg: DatasetConfig, kind: str, default_name: str, image_size: int) -> ProcessorConfig:
    """The ``train`` processor config of ``kind`` ('vis_processor' or 'text_processor'),
    or the recipe's default when the section is absent."""
    splits = getattr(cfg, kind)
    proc = splits.train if splits is not None else None
    if proc is None:
        proc = ProcessorConfig(name=default_name, image_size=image_size)
    return proc


def build_box_safe_vis_processor(cfg: DatasetConfig, name: str, image_size: int) -> tuple[Any, int]:
    """The image transform of a region dataset: it must resize without cropping.

    Returns:
        (processor, S) where S is the side the boxes are scaled to.
    Raises:
        ConfigError: a cropping transform was configured for region data.
    """
    proc_cfg = processor_config(cfg, "vis_processor", "blip2_image_eval", image_size)
    if proc_cfg.name not in BOX_SAFE_PROCESSORS:
        raise ConfigError(f"datasets.{name}.vis_processor.train.name is '{proc_cfg.name}': region boxes need a "
                          f"resize-only transform ({', '.join(BOX_SAFE_PROCESSORS)})")
    return build_processor(proc_cfg), proc_cfg.image_size


def seeded_transform(processor: Any, image: Any, rng: np.random.Generator) -> torch.Tensor:
    """Apply ``processor`` with torch's global RNG seeded from ``rng`` and restored
    afterwards, so random crops are reproducible per step and nothing else changes."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(rng.integers(2**62)))
        return processor(image)


def stack_images(items: Sequence[dict[str, Any]]) -> torch.Tensor:
    """``B`` tensors ``3xSxS`` -> ``Bx3xSxS``."""
    return torch.stack([it["image"] for it in items])


#: an item's object boxes when its record lists none
NO_OBJECTS = torch.zeros(0, 2, 2)


def pad_boxes(rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """``B`` tensors ``Kx2x2`` (K may differ, may be 0) -> ``(BxKmaxx2x2`` zero-padded, the B counts)."""
    counts = [int(r.shape[0]) for r in rows]
    out = torch.zeros(len(rows), max(counts + [1]), 2, 2)
    for b, r in enumerate(rows):
        out[b, : counts[b]] = r
    return out, counts


def box_list(value: Any) -> np.ndarray | None:
    """A JSON list of ``[x1, y1, x2, y2]`` boxes -> ``Mx4`` float32, or None if malformed
    (not a list, a box without 4 finite numbers, or one with ``x2 <= x1`` / ``y2 <= y1``)."""
    if not isinstance(value, list):
        return None
    try:
        boxes = np.asarray(value, dtype=np.float32).reshape(-1, 4)
    except (TypeError, ValueError):
        return None
    if len(boxes) != len(value) or not np.all(np.isfinite(boxes)):
        return None
    if np.any(boxes[:, 2] <= boxes[:, 0]) or np.any(boxes[:, 3] <= boxes[:, 1]):
        return None
    return boxes


def object_corners(objects: np.ndarray, img_w: int, img_h: int, image_size: int) -> torch.Tensor:
    """``Mx4`` object boxes (original pixels, ``x1, y1, x2, y2``) -> ``Mx2x2`` model pixels,
    clipped to the image."""
    boxes = objects.copy()
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, img_w)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, img_h)
    return torch.from_numpy(scale_boxes(boxes, img_w, img_h, image_size).astype(np.float32))
