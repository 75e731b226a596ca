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

import numpy as np

from click4caption.config import DatasetConfig
from click4caption.data.files import check_storage, load_held_out_ids, parse_xywh, read_json
from click4caption.data.regions import RegionCaptionSource, RegionIndex
from click4caption.data.sources import DatasetKind, build_box_safe_vis_processor
from click4caption.errors import DataError

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

    index = RegionIndex()
    for iid, info in imgs.items():
        iid = str(iid)
        if iid in held_out:
            index.drop_image("held_out")
            continue
        try:
            path = root / IMAGE_DIR / os.path.basename(str(info["file_name"]))
        except (KeyError, TypeError):
            index.drop_image("malformed")
            continue
        width, height = info.get("width"), info.get("height")
        boxes: list[tuple[float, float, float, float]] = []
        words: list[str] = []
        for ann_id in img_to_anns.get(iid) or []:
            index.total_regions += 1
            region = anns.get(ann_id)
            if not isinstance(region, dict):
                index.drop_region("malformed")
                continue
            word = str(region.get("utf8_string") or "").strip()
            box = parse_xywh(region.get("bbox"))
            if not word:
                index.drop_region("empty_word")
            elif word == ILLEGIBLE:
                index.drop_region("illegible")
            elif box is None:
                index.drop_region("bad_box")
            elif width and height and not small_word_mask(np.array([box]), width, height, size)[0]:
                index.drop_region("small_word")
            else:
                boxes.append(box)
                words.append(word)
        if len(boxes) < min_valid:
            index.drop_image("too_few_words")
            continue
        index.add_image(iid, str(path), boxes, words)
    return index.build(TextOCRDataset, name, cfg, len(imgs), vis_processor, size, batch_size, region_word="words")


DATASET = DatasetKind(build_textocr, unused_keys={"text_processor": "words are used as written, as upstream",
                                                  "shuffle_buffer": "a LAION setting",
                                                  "records_per_image": "a region-instruction setting"})
