"""Images with captioned boxes (Visual Genome, TextOCR): the shared dataset and the
index both build from their annotation files."""
from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Sequence

import numpy as np
import torch

from click4caption.boxes import scale_boxes, xywh_to_xyxy
from click4caption.config import DatasetConfig
from click4caption.errors import DataError, InputError
from click4caption.images import load_image
from click4caption.data.files import StringTable, log_filtered
from click4caption.data.sources import MapSource, SkipSample, at_least_one, stack_images

logger = logging.getLogger(__name__)


class RegionIndex:
    """What an annotation reader keeps: images with their valid regions, compactly, and
    the counts of what it left out (images and regions, by reason)."""

    def __init__(self) -> None:
        self.image_ids: list[str] = []
        self.image_paths: list[str] = []
        self.offsets = [0]
        self.boxes: list[tuple[float, float, float, float]] = []
        self.captions: list[str] = []
        self.dropped_images: Counter = Counter()
        self.dropped_regions: Counter = Counter()
        self.total_regions = 0

    def add_image(self, image_id: str, path: str, boxes: Sequence[tuple[float, float, float, float]],
                  captions: Sequence[str]) -> None:
        """An image and its valid regions (``x, y, w, h`` in original pixels)."""
        self.image_ids.append(image_id)
        self.image_paths.append(path)
        self.boxes.extend(boxes)
        self.captions.extend(captions)
        self.offsets.append(self.offsets[-1] + len(boxes))

    def drop_image(self, reason: str) -> None:
        self.dropped_images[reason] += 1

    def drop_region(self, reason: str) -> None:
        self.dropped_regions[reason] += 1

    def build(self, cls: type["RegionCaptionSource"], name: str, cfg: DatasetConfig, images_read: int,
              vis_processor: Any, image_size: int, batch_size: int, region_word: str = "regions"
              ) -> "RegionCaptionSource":
        """Log what was left out and make the dataset."""
        log_filtered(name, len(self.image_ids), images_read, "images", self.dropped_images)
        log_filtered(name, len(self.boxes), self.total_regions, region_word, self.dropped_regions)
        return cls(name, self.image_ids, self.image_paths, np.asarray(self.offsets, dtype=np.int64),
                   np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4), StringTable(self.captions),
                   vis_processor, image_size, cfg.num_regions, batch_size, cfg.sample_ratio)


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
        super().__init__(name, batch_size, sample_ratio, vis_processor, image_size)
        self.num_regions = at_least_one(num_regions, name, "num_regions")
        self.image_ids, self.image_paths = image_ids, StringTable(image_paths)
        self.offsets, self.boxes, self.captions = offsets, boxes, captions

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
        corners = scale_boxes(xywh_to_xyxy(boxes[chosen]), img_w, img_h, self.image_size).astype(np.float32)
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
