"""TextOCR 0.1 words as region captions.

Layout (``build_info.storage``)::

    TextOCR/
        TextOCR_0.1_train.json   {"imgs": {id: {"file_name", "width", "height", ...}},
                                  "anns": {ann_id: {"bbox": [x, y, w, h], "utf8_string", ...}},
                                  "imgToAnns": {id: [ann_id, ...]}}
        train_images/<name>.jpg  (the base name of ``file_name``)

A word is a valid region unless it is ``"."`` (illegible) or empty, or its box is
under 5 px wide or high once scaled to the model input. Images with fewer than
``num_regions // 2`` valid words are never drawn (upstream replaced them with a random
other image, which has the same effect). Words are used as they are (stripped);
corners are clipped to ``[0, S]``.

Held-out ids are TextOCR image ids (the keys of ``imgs``).
"""
from __future__ import annotations

import logging
import os
from collections import Counter

import numpy as np

from click4caption.config import DatasetConfig
from click4caption.data.base import (
    DataError, RegionCaptionSource, StringTable, build_box_safe_vis_processor, check_storage,
    load_held_out_ids, log_filtered, parse_xywh, read_json,
)

logger = logging.getLogger(__name__)

ANNOTATION_FILE = "TextOCR_0.1_train.json"
IMAGE_DIR = "train_images"
ILLEGIBLE = "."
#: words narrower or lower than this many model-input pixels are skipped
MIN_WORD_PX = 5.0


def small_word_mask(boxes: np.ndarray, img_w: float, img_h: float, size: int) -> np.ndarray:
    """Mask of ``Mx4`` xywh boxes at least ``MIN_WORD_PX`` wide and high at ``size`` scale."""
    return (boxes[:, 2] * size / img_w >= MIN_WORD_PX) & (boxes[:, 3] * size / img_h >= MIN_WORD_PX)


class TextOCRDataset(RegionCaptionSource):
    """TextOCR words; see the module docstring."""

    clip_boxes = True
    too_few_reason = "too_few_words"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.min_valid = max(1, self.num_regions // 2)

    def valid_mask(self, boxes: np.ndarray, captions: list[str], img_w: int, img_h: int) -> np.ndarray:
        return small_word_mask(boxes, img_w, img_h, self.image_size)

    def normalise(self, caption: str) -> str:
        return caption.strip()


def build_textocr(cfg: DatasetConfig, name: str, batch_size: int, image_size: int) -> TextOCRDataset:
    """Read ``TextOCR_0.1_train.json`` and build the dataset (see :func:`build_visual_genome`)."""
    root = check_storage(cfg.build_info.storage, name, "the TextOCR folder")
    vis_processor, size = build_box_safe_vis_processor(cfg, name, image_size)
    held_out = load_held_out_ids(cfg, name)
    ann = read_json(root / ANNOTATION_FILE, name)
    try:
        imgs, anns, img_to_anns = ann["imgs"], ann["anns"], ann["imgToAnns"]
    except (KeyError, TypeError):
        raise DataError(f"datasets.{name}: {root / ANNOTATION_FILE} lacks 'imgs', 'anns' or 'imgToAnns'") from None
    min_valid = max(1, cfg.num_regions // 2)

    image_ids: list[str] = []
    image_paths: list[str] = []
    offsets = [0]
    boxes: list[tuple[float, float, float, float]] = []
    words: list[str] = []
    dropped_images: Counter = Counter()
    dropped_words: Counter = Counter()
    total_words = 0
    for iid, info in imgs.items():
        iid = str(iid)
        if iid in held_out:
            dropped_images["held_out"] += 1
            continue
        try:
            path = root / IMAGE_DIR / os.path.basename(str(info["file_name"]))
        except (KeyError, TypeError):
            dropped_images["malformed"] += 1
            continue
        width, height = info.get("width"), info.get("height")
        image_boxes: list[tuple[float, float, float, float]] = []
        image_words: list[str] = []
        for ann_id in img_to_anns.get(iid) or []:
            total_words += 1
            region = anns.get(ann_id)
            if not isinstance(region, dict):
                dropped_words["malformed"] += 1
                continue
            word = str(region.get("utf8_string") or "").strip()
            box = parse_xywh(region.get("bbox"))
            if not word:
                dropped_words["empty_word"] += 1
            elif word == ILLEGIBLE:
                dropped_words["illegible"] += 1
            elif box is None:
                dropped_words["bad_box"] += 1
            elif width and height and not small_word_mask(np.array([box]), width, height, size)[0]:
                dropped_words["small_word"] += 1
            else:
                image_boxes.append(box)
                image_words.append(word)
        if len(image_boxes) < min_valid:
            dropped_images["too_few_words"] += 1
            continue
        image_ids.append(iid)
        image_paths.append(str(path))
        boxes.extend(image_boxes)
        words.extend(image_words)
        offsets.append(offsets[-1] + len(image_boxes))
    log_filtered(name, len(image_ids), len(imgs), "images", dropped_images)
    log_filtered(name, len(boxes), total_words, "words", dropped_words)
    return TextOCRDataset(
        name, image_ids, image_paths, np.asarray(offsets, dtype=np.int64),
        np.asarray(boxes, dtype=np.float32).reshape(-1, 4), StringTable(words),
        vis_processor, size, cfg.num_regions, batch_size, cfg.sample_ratio,
    )
