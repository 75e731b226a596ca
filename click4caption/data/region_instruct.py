"""Region instructions: LLaVA-style conversations about boxed regions.

``build_info.storage`` is the JSON file (or a folder holding ``instruct.json``), a
list of records::

    {"id": "7_0",
     "image": "images/7.jpg",                 # relative to the JSON file's folder
     "boxes": [[x1, y1, x2, y2], ...],        # original-image pixels, one per [IMG],
                                              # in order of appearance across human turns
     "conversations": [{"from": "human", "value": "image[IMG] What color is it?"},
                       {"from": "gpt", "value": "Red."}, ...],
     "objects": [[x1, y1, x2, y2], ...]}      # optional: every object in the image
                                              # (box-attention aid, objects mode)

Records are checked once when the file is read (roles, one box per ``[IMG]``, boxes
with x2 > x1 and y2 > y1, a non-empty reply); bad ones are left out and counted. At
load time a box is clipped to the image and skipped if nothing is left. The image
transform is the eval one (resize only), boxes are scaled to the model input, and the
model turns each conversation into the Vicuna v0 prompt that Chat uses at inference,
with the loss on the replies.

Held-out ids match a record's ``id``, its image path (as written) or the image's file
stem (``7`` for ``images/7.jpg``).
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from click4caption.boxes import scale_boxes
from click4caption.config import DatasetConfig
from click4caption.data.files import StringTable, check_storage, load_held_out_ids, log_filtered, read_json
from click4caption.data.sources import (
    NO_OBJECTS, DatasetKind, MapSource, SkipSample, at_least_one, box_list, build_box_safe_vis_processor,
    object_corners, pad_boxes, stack_images,
)
from click4caption.errors import DataError, InputError
from click4caption.prompts import GPT_ROLES, HUMAN_ROLES, IMG_TOKEN
from click4caption.images import load_image

logger = logging.getLogger(__name__)

DEFAULT_FILE = "instruct.json"


def check_record(rec: Any) -> str | None:
    """Why a record is unusable, or None if it is fine."""
    if not isinstance(rec, dict):
        return "malformed"
    if not isinstance(rec.get("image"), str) or not rec["image"]:
        return "no_image"
    turns = rec.get("conversations")
    if not isinstance(turns, list) or not turns:
        return "no_conversation"
    n_img, replies = 0, 0
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            return "malformed"
        if turn.get("from") in HUMAN_ROLES:
            n_img += turn["value"].count(IMG_TOKEN)
        elif turn.get("from") in GPT_ROLES:
            if not turn["value"].strip():
                return "empty_reply"
            replies += 1
        else:
            return "unknown_role"
    if replies == 0:
        return "no_reply"
    boxes = rec.get("boxes", [])
    if not isinstance(boxes, list) or len(boxes) != n_img:
        return "box_count_mismatch"
    for box in boxes:
        try:
            x1, y1, x2, y2 = (float(v) for v in box)
        except (TypeError, ValueError):
            return "bad_box"
        if not np.all(np.isfinite((x1, y1, x2, y2))) or x2 <= x1 or y2 <= y1:
            return "bad_box"
    if "objects" in rec and box_list(rec["objects"]) is None:
        return "bad_objects"
    return None


class RegionInstructDataset(MapSource):
    """Region-instruction records; see the module docstring."""

    def __init__(self, name: str, root: Path, records: list[dict[str, Any]], vis_processor: Any, image_size: int,
                 batch_size: int, sample_ratio: float, records_per_image: int = 1) -> None:
        if not records:
            raise DataError(f"datasets.{name}: no usable record")
        super().__init__(name, batch_size, sample_ratio, vis_processor, image_size)
        self.root = str(root)
        self.ids = StringTable(str(r.get("id", i)) for i, r in enumerate(records))
        self.images = StringTable(r["image"] for r in records)
        self.records_per_image = at_least_one(records_per_image, name, "records_per_image")
        # record -> its image's number (records of one image share it)
        self.image_numbers = np.unique([r["image"] for r in records], return_inverse=True)[1].astype(np.int64)
        self._last_image: tuple[str, Any] | None = None  # the last image read, for the next record of it
        self.box_offsets = np.cumsum([0] + [len(r["boxes"]) for r in records]).astype(np.int64)
        self.boxes = np.asarray([b for r in records for b in r["boxes"]], dtype=np.float32).reshape(-1, 4)
        # optional object boxes (records without the key: -1 objects, none given to the batch)
        objects = [r.get("objects") for r in records]
        self.object_counts = np.asarray([-1 if o is None else len(o) for o in objects], dtype=np.int64)
        self.object_offsets = np.cumsum([0] + [max(int(c), 0) for c in self.object_counts]).astype(np.int64)
        self.objects = np.asarray([b for o in objects if o for b in o], dtype=np.float32).reshape(-1, 4)
        # conversations are kept as JSON-able lists; they are small next to the images
        self.conversations = [[{"from": t["from"], "value": t["value"]} for t in r["conversations"]] for r in records]

    def __len__(self) -> int:
        return len(self.conversations)

    def describe(self) -> str:
        grouped = f", up to {self.records_per_image} records of an image together" if self.records_per_image > 1 else ""
        return f"{super().describe()} records; {len(self)} records, {len(self.boxes)} boxes{grouped}"

    def epoch_order(self, rng: np.random.Generator) -> np.ndarray:
        """A permutation of the records in which the records of one image come in runs of
        up to ``records_per_image`` (drawn at random among the image's records); the runs
        are in random order. With 1, a plain permutation. With several ranks each takes
        every ``world_size``-th entry, so the runs are only kept together on one rank."""
        shuffled = rng.permutation(len(self))
        k = self.records_per_image
        if k == 1:
            return shuffled
        by_image = shuffled[np.argsort(self.image_numbers[shuffled], kind="stable")]
        image = self.image_numbers[by_image]
        first = np.r_[True, image[1:] != image[:-1]]  # each image's first record in by_image
        starts = np.flatnonzero(first)
        within = np.arange(len(by_image)) - np.repeat(starts, np.diff(np.r_[starts, len(by_image)]))
        run = np.cumsum(within % k == 0) - 1  # run number of every record
        run_rank = rng.permutation(int(run[-1]) + 1)
        return by_image[np.lexsort((within, run_rank[run]))]

    def load_item(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        """Item: ``image`` ``3xSxS``, ``bbox`` ``Kx2x2`` (model pixels), ``conversations``."""
        path = self.images[index]
        if self._last_image is not None and self._last_image[0] == path:  # the transform is resize-only
            (img_w, img_h), pixels = self._last_image[1]
        else:
            try:
                image = load_image(Path(self.root) / path, exif_transpose=False)
            except InputError as err:
                raise SkipSample("unreadable_image", str(err)) from None
            (img_w, img_h), pixels = image.size, self.vis_processor(image)
            self._last_image = (path, ((img_w, img_h), pixels))
        boxes = self.boxes[self.box_offsets[index]:self.box_offsets[index + 1]].copy()
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, img_w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, img_h)
        if np.any(boxes[:, 2] <= boxes[:, 0]) or np.any(boxes[:, 3] <= boxes[:, 1]):
            raise SkipSample("bad_box", f"record {self.ids[index]}: box outside the {img_w}x{img_h} image")
        corners = torch.from_numpy(scale_boxes(boxes, img_w, img_h, self.image_size).astype(np.float32))
        item = {"image": pixels, "bbox": corners, "conversations": self.conversations[index],
                "image_key": self.images[index]}
        if self.object_counts[index] >= 0:
            objects = self.objects[self.object_offsets[index]:self.object_offsets[index + 1]]
            item["objects"] = object_corners(objects, img_w, img_h, self.image_size)
        return item

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """-> ``image`` ``Ux3xSxS`` (the U distinct images), ``image_index`` (B ints: record
        b's image), ``bbox`` ``BxKx2x2`` zero-padded, ``num_boxes`` (B ints),
        ``conversations`` (B lists of turns); with object boxes in any record, ``objects``
        ``BxMx2x2`` zero-padded and ``num_objects`` (B ints). Records of one image share
        one ViT pass."""
        bbox, counts = pad_boxes([it["bbox"] for it in items])
        slot: dict[str, int] = {}
        distinct: list[dict[str, Any]] = []
        for it in items:
            if it["image_key"] not in slot:
                slot[it["image_key"]] = len(distinct)
                distinct.append(it)
        batch = {
            "image": stack_images(distinct),
            "image_index": [slot[it["image_key"]] for it in items],
            "bbox": bbox,
            "num_boxes": counts,
            "conversations": [it["conversations"] for it in items],
        }
        if any("objects" in it for it in items):
            batch["objects"], batch["num_objects"] = pad_boxes([it.get("objects", NO_OBJECTS) for it in items])
        return batch


def build_region_instruct(cfg: DatasetConfig, name: str, batch_size: int, image_size: int) -> RegionInstructDataset:
    """Read and check the records and build the dataset.

    Raises:
        ConfigError / DataError with a one-line message.
    """
    path = check_storage(cfg.build_info.storage, name, "the region-instruction JSON file")
    if path.is_dir():
        path = path / DEFAULT_FILE
    vis_processor, size = build_box_safe_vis_processor(cfg, name, image_size)
    held_out = load_held_out_ids(cfg, name)
    raw = read_json(path, name)
    if not isinstance(raw, list):
        raise DataError(f"datasets.{name}: {path} must hold a JSON list of records")
    records: list[dict[str, Any]] = []
    dropped: Counter = Counter()
    for rec in raw:
        why = check_record(rec)
        if why is None and held_out and ({str(rec.get("id")), rec["image"], Path(rec["image"]).stem} & held_out):
            why = "held_out"
        if why:
            dropped[why] += 1
        else:
            records.append(rec)
    log_filtered(name, len(records), len(raw), "records", dropped)
    return RegionInstructDataset(name, path.parent, records, vis_processor, size, batch_size, cfg.sample_ratio,
                                 cfg.records_per_image)


DATASET = DatasetKind(build_region_instruct, unused_keys={
    "text_processor": "conversations are used as written", "num_regions": "each record has its own boxes",
    "shuffle_buffer": "a LAION setting"})
