"""Pieces shared by the training datasets.

Every training dataset is a *batch source*: given a step-seeded random generator and
the position of its next batch, it returns one collated batch. Sources are
random-access by step (see :mod:`click4caption.data.mixing`), which is what makes a
resumed run draw exactly the batches the uninterrupted run would have drawn.

A sample that cannot be used (unreadable image, no valid region, empty caption, bad
box) raises :class:`SkipSample` with a short reason; the source draws a replacement
and counts the reason, and the trainer logs the counts. A run never crashes on a
broken sample, only when nearly every sample of a dataset is broken.
"""
from __future__ import annotations

import json
import logging
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from click4caption.config import DatasetConfig, ProcessorConfig
from click4caption.errors import Click4CaptionError, ConfigError, InputError
from click4caption.images import load_image
from click4caption.processors import build_processor

logger = logging.getLogger(__name__)

#: replacements tried per wanted sample before a dataset is declared broken
MAX_ATTEMPTS_PER_SAMPLE = 20
#: keys of a collated batch that are bookkeeping, not model input
META_KEYS = ("_source", "_skipped", "_step")

# processors that resize without cropping, so boxes scaled by S/W, S/H stay valid
BOX_SAFE_PROCESSORS = ("blip2_image_eval",)


class DataError(Click4CaptionError):
    """A dataset's files are missing, malformed or (nearly) all broken."""


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

    Subclasses set :attr:`name`, :attr:`sample_ratio`, :attr:`batch_size` and
    implement :meth:`draw_batch`.
    """

    name: str = "?"
    sample_ratio: float = 1.0
    batch_size: int = 1

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
        perm = np.random.default_rng([seed, _stable_id(self.name), epoch]).permutation(len(self))
        self._perm_cache = (epoch, perm)
        return perm

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


# ----------------------------------------------------------------------------- helpers
def _stable_id(name: str) -> int:
    """A process-independent integer for a name (``hash()`` is salted per process)."""
    return zlib.crc32(name.encode("utf-8"))


class StringTable:
    """Many strings stored as one UTF-8 buffer plus offsets: compact, fast to pickle
    to loader workers, and shared copy-on-write after ``fork``."""

    def __init__(self, strings: Iterable[str]) -> None:
        encoded = [s.encode("utf-8") for s in strings]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        if encoded:
            np.cumsum([len(b) for b in encoded], out=self._offsets[1:])
        self._blob = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self._blob[self._offsets[i]:self._offsets[i + 1]].tobytes().decode("utf-8")


def load_held_out_ids(cfg: DatasetConfig, name: str) -> frozenset[str]:
    """``held_out_ids`` plus the ids in ``held_out_ids_file`` (a JSON list, or one id
    per line with ``#`` comments), all as strings.

    Raises:
        ConfigError: the file is missing or unreadable.
    """
    ids = {str(i).strip() for i in cfg.held_out_ids}
    if cfg.held_out_ids_file:
        path = Path(cfg.held_out_ids_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"datasets.{name}.held_out_ids_file not found: {path}")
        text = path.read_text(encoding="utf-8")
        if text.lstrip().startswith("["):
            try:
                ids |= {str(i).strip() for i in json.loads(text)}
            except json.JSONDecodeError as err:
                raise ConfigError(f"datasets.{name}.held_out_ids_file {path}: bad JSON ({err})") from None
        else:
            for line in text.splitlines():
                line = line.split("#", 1)[0].strip()
                if line:
                    ids.add(line)
    ids.discard("")
    return frozenset(ids)


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


def scale_xywh(x: float, y: float, w: float, h: float, img_w: int, img_h: int, size: int) -> np.ndarray:
    """Box ``(x, y, w, h)`` in original pixels -> corners ``2x2`` ((x1, y1), (x2, y2)) in
    pixels of the ``size x size`` model input (x by ``size/W``, y by ``size/H``)."""
    sx, sy = size / img_w, size / img_h
    return np.array([[x * sx, y * sy], [(x + w) * sx, (y + h) * sy]], dtype=np.float32)


def seeded_transform(processor: Any, image: Any, rng: np.random.Generator) -> torch.Tensor:
    """Apply ``processor`` with torch's global RNG seeded from ``rng`` and restored
    afterwards, so random crops are reproducible per step and nothing else changes."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(rng.integers(2**62)))
        return processor(image)


def stack_images(items: Sequence[dict[str, Any]]) -> torch.Tensor:
    """``B`` tensors ``3xSxS`` -> ``Bx3xSxS``."""
    return torch.stack([it["image"] for it in items])


def check_storage(path: str | None, name: str, what: str) -> Path:
    """``build_info.storage`` as an existing path.

    Raises:
        ConfigError: unset; DataError: missing.
    """
    if not path:
        raise ConfigError(f"datasets.{name}.build_info.storage is not set ({what})")
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"datasets.{name}: storage not found: {p} ({what})")
    return p


def read_json(path: Path, name: str) -> Any:
    """Parse a JSON annotation file.

    Raises:
        DataError: missing or not JSON.
    """
    if not path.is_file():
        raise DataError(f"datasets.{name}: annotation file not found: {path}")
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"datasets.{name}: cannot read {path}: {str(err).splitlines()[0]}") from None


class RegionCaptionSource(MapSource):
    """Images with captioned boxes (Visual Genome, TextOCR): one item is one image with
    ``num_regions`` regions drawn with replacement from its valid ones.

    The index is compact (numpy arrays and a :class:`StringTable`): for image ``i``,
    regions ``offsets[i]:offsets[i+1]`` of ``boxes`` (``Nx4`` x, y, w, h in original
    pixels) and ``captions``.

    Subclasses define :meth:`valid_mask` (per-region filter, given the real image size)
    and :meth:`normalise` (caption text), and may set :attr:`min_valid` and
    :attr:`clip_boxes`.
    """

    #: an image with fewer valid regions than this is skipped (replaced)
    min_valid: int = 1
    #: clip scaled corners to [0, S]
    clip_boxes: bool = False
    #: SkipSample reason when an image has too few valid regions
    too_few_reason: str = "no_valid_region"

    def __init__(
        self,
        name: str,
        image_ids: list[str],
        image_paths: list[str],
        offsets: np.ndarray,
        boxes: np.ndarray,
        captions: StringTable,
        vis_processor: Any,
        image_size: int,
        num_regions: int,
        batch_size: int,
        sample_ratio: float,
    ) -> None:
        if not image_ids:
            raise DataError(f"datasets.{name}: no usable image (every image was filtered out or held out)")
        if num_regions < 1:
            raise ConfigError(f"datasets.{name}.num_regions must be >= 1, got {num_regions}")
        self.name = name
        self.image_ids = image_ids
        self.image_paths = StringTable(image_paths)
        self.offsets = offsets
        self.boxes = boxes
        self.captions = captions
        self.vis_processor = vis_processor
        self.image_size = image_size
        self.num_regions = num_regions
        self.batch_size = batch_size
        self.sample_ratio = sample_ratio

    def __len__(self) -> int:
        return len(self.image_ids)

    def describe(self) -> str:
        return (f"{super().describe()} images x {self.num_regions} regions; {len(self)} images, "
                f"{len(self.boxes)} regions")

    def valid_mask(self, boxes: np.ndarray, captions: list[str], img_w: int, img_h: int) -> np.ndarray:
        """Boolean mask over an image's regions (``boxes`` ``Mx4`` xywh)."""
        raise NotImplementedError

    def normalise(self, caption: str) -> str:
        return caption

    def load_item(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        """Item: ``image`` ``3xSxS``, ``captions`` (R strings), ``bbox`` ``Rx2x2`` (model pixels)."""
        try:
            image = load_image(self.image_paths[index], exif_transpose=False)
        except InputError as err:
            raise SkipSample("unreadable_image", str(err)) from None
        img_w, img_h = image.size
        lo, hi = int(self.offsets[index]), int(self.offsets[index + 1])
        boxes = self.boxes[lo:hi]
        captions = [self.captions[k] for k in range(lo, hi)]
        valid = np.flatnonzero(self.valid_mask(boxes, captions, img_w, img_h))
        if len(valid) < self.min_valid:
            raise SkipSample(self.too_few_reason, f"image {self.image_ids[index]}")
        chosen = rng.choice(valid, size=self.num_regions, replace=True)
        corners = np.stack([scale_xywh(*boxes[k], img_w, img_h, self.image_size) for k in chosen])
        if self.clip_boxes:
            corners = corners.clip(0, self.image_size)
        texts = [self.normalise(captions[k]) for k in chosen]
        if any(not t for t in texts):
            raise SkipSample("empty_caption", f"image {self.image_ids[index]}")
        return {"image": self.vis_processor(image), "captions": texts, "bbox": torch.from_numpy(corners)}

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """-> ``image`` ``Bx3xSxS``, ``text_input`` (B*R strings, image-major), ``bbox`` ``BxRx2x2``."""
        return {
            "image": stack_images(items),
            "text_input": [t for it in items for t in it["captions"]],
            "bbox": torch.stack([it["bbox"] for it in items]),
        }


def parse_xywh(raw: Any) -> tuple[float, float, float, float] | None:
    """``[x, y, w, h]`` of finite numbers with positive size, else None."""
    try:
        x, y, w, h = (float(v) for v in raw)
    except (TypeError, ValueError):
        return None
    if not all(np.isfinite((x, y, w, h))) or w <= 0 or h <= 0:
        return None
    return x, y, w, h


def log_filtered(name: str, kept: int, total: int, what: str, reasons: Counter) -> None:
    """One log line about what an index build left out."""
    if reasons:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items()))
        logger.info("%s: kept %d of %d %s (left out: %s)", name, kept, total, what, detail)
    else:
        logger.info("%s: kept all %d %s", name, total, what)
