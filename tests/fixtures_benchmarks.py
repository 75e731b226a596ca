"""Tiny region-captioning benchmark files in the two layouts the evaluator reads, with
every kind of bad input, and a fake captioner.

Field names as in the real files (see click4caption/evaluation/annotations.py for where
each was confirmed): image entries ``id``, ``file_name``, ``height``, ``width``;
annotations ``id``, ``image_id``, ``bbox`` = [x, y, w, h], ``caption``. In GLaMM's layout
each region has its own image entry and the annotation id equals the image entry id.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

A_SIZE = (64, 48)  # img_a.png, width x height
B_SIZE = (40, 40)  # img_b.jpg

# region id -> (image file, [x, y, w, h] or None, reference caption, predicted caption or None)
GLAMM_REGIONS: dict[int, tuple[str, Any, str, str | None]] = {
    1: ("img_a.png", [2, 3, 20, 15], "a red car parked on the street", "a red car parked on a road"),
    2: ("img_a.png", [30, 10, 30, 30], "a man wearing a blue shirt", "a man wearing a blue jacket"),
    3: ("img_b.jpg", [5, 5, 20, 20], "white clouds in the blue sky", "white clouds in the sky"),
    4: ("img_b.jpg", [30, 30, 20, 20], "green grass on the ground", "green grass"),  # reaches outside: clipped
    5: ("img_a.png", None, "a tree", None),  # no box
    6: ("img_a.png", [10, 10, 0, 5], "a thin pole", None),  # zero width
    7: ("img_a.png", [100, 100, 10, 10], "a bird", None),  # outside the declared 64x48
    8: ("missing.png", [1, 1, 10, 10], "a cat", None),  # image file missing
    9: ("broken.png", [1, 1, 10, 10], "a dog", None),  # image file unreadable
    10: ("img_b.jpg", [1, 1, 10, 10], "", None),  # empty caption
    11: ("img_b.jpg", [100, 100, 10, 10], "a wooden bench", None),  # outside the real 40x40 (declared 400x400)
    12: ("img_a.png", [40, 20, 15, 20], "the dog's black tail.", "a black dog tail"),
}
GLAMM_NO_ANNOTATION = 13  # an image entry (a region in this layout) whose annotation is missing
GLAMM_EXPECTED_SKIPS = {"no_box": [5], "zero_size_box": [6], "box_outside_image": [7, 11], "image_not_found": [8],
                        "unreadable_image": [9], "no_caption": [10], "image_without_annotation": [13]}
GLAMM_SCORED = [1, 2, 3, 4, 12]

# GRiT densecap layout: image id -> file, annotation id -> (image id, box, reference, prediction)
GRIT_IMAGES = {2417: "img_a.png", 2418: "img_b.jpg"}
GRIT_REGIONS: dict[int, tuple[int, Any, str, str | None]] = {
    101: (2417, [2, 3, 20, 15], "red car", "red car"),
    102: (2417, [30, 10, 30, 30], "man in blue shirt", "a man with a shirt"),
    103: (2417, [40, 20, 15, 20], "black tail of a dog", "the black tail of a cat"),
    104: (2418, [5, 5, 20, 20], "clouds in sky", "white clouds in the sky"),
    105: (2418, [0, 0, 0, 0], "nothing", None),  # zero size
    106: (2418, [20, 2, 15, 30], "a tall lamp post on the left", "a tall lamp post on a street"),
    107: (9999, [1, 1, 5, 5], "a ghost", None),  # its image entry is missing
}
GRIT_EXPECTED_SKIPS = {"zero_size_box": [105], "no_image_entry": [107]}


def write_images(folder: Path) -> None:
    """``img_a.png`` (64x48), ``img_b.jpg`` (40x40) and an unreadable ``broken.png``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (A_SIZE[1], A_SIZE[0], 3), dtype=np.uint8)).save(folder / "img_a.png")
    Image.fromarray(rng.integers(0, 255, (B_SIZE[1], B_SIZE[0], 3), dtype=np.uint8)).save(folder / "img_b.jpg")
    data = (folder / "img_a.png").read_bytes()
    (folder / "broken.png").write_bytes(data[: len(data) // 3])


def _size_of(file_name: str) -> tuple[int, int]:
    return B_SIZE if file_name == "img_b.jpg" else A_SIZE


def write_glamm_layout(path: Path) -> Path:
    """GLaMM's ``test_caption.json`` layout: one image entry per region, ids equal."""
    images, annotations = [], []
    for rid, (file_name, bbox, reference, _) in GLAMM_REGIONS.items():
        width, height = (400, 400) if rid == 11 else _size_of(file_name)
        images.append({"id": rid, "file_name": file_name, "height": height, "width": width})
        ann: dict[str, Any] = {"id": rid, "image_id": rid, "caption": reference}
        if bbox is not None:
            ann["bbox"] = bbox
            ann["area"] = bbox[2] * bbox[3]
        annotations.append(ann)
    images.append({"id": GLAMM_NO_ANNOTATION, "file_name": "img_a.png", "height": A_SIZE[1], "width": A_SIZE[0]})
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


def write_grit_layout(path: Path) -> Path:
    """GRiT's dense-captioning ``test.json`` layout: several regions per image entry."""
    images = [{"id": iid, "file_name": name, "height": _size_of(name)[1], "width": _size_of(name)[0]}
              for iid, name in GRIT_IMAGES.items()]
    annotations = [{"id": rid, "image_id": iid, "bbox": bbox, "caption": ref, "category_id": 1}
                   for rid, (iid, bbox, ref, _) in GRIT_REGIONS.items()]
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "object"}]}))
    return path


def clipped_xyxy(bbox: Sequence[float], size: tuple[int, int]) -> tuple[int, int, int, int]:
    x, y, w, h = bbox
    return (max(0, x), max(0, y), min(size[0], x + w), min(size[1], y + h))


class FakeCaptioner:
    """Answers from a table keyed by the (clipped) box; counts the regions it captions
    and can fail on a given call, to simulate a crash."""

    def __init__(self, captions_by_box: dict[tuple[int, int, int, int], str], fail_on_call: int | None = None) -> None:
        self.captions_by_box = captions_by_box
        self.fail_on_call = fail_on_call
        self.calls = 0
        self.captioned: list[tuple[int, int, int, int]] = []

    def describe_regions(self, regions: Sequence[Any], settings: Any = None) -> list[str]:
        self.calls += 1
        if self.fail_on_call is not None and self.calls == self.fail_on_call:
            raise RuntimeError("simulated crash")
        out = []
        for region in regions:
            key = tuple(int(round(v)) for v in region.box)
            self.captioned.append(key)
            out.append(self.captions_by_box[key])
        return out


def glamm_fake() -> FakeCaptioner:
    return FakeCaptioner({clipped_xyxy(bbox, _size_of(f)): pred for f, bbox, _, pred in GLAMM_REGIONS.values()
                          if pred is not None})


def grit_fake() -> FakeCaptioner:
    return FakeCaptioner({clipped_xyxy(bbox, _size_of(GRIT_IMAGES[iid])): pred
                          for iid, bbox, _, pred in GRIT_REGIONS.values() if pred is not None})
