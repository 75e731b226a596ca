"""Region-captioning benchmark files -> one record per region, and what was left out.

Two layouts are read, both COCO-style JSON objects ``{"images": [...], "annotations": [...]}``
with boxes as ``[x, y, w, h]`` in original-image pixels:

``region-per-image``
    One region per image entry: GLaMM's ``test_caption.json`` (Visual Genome v1.2) and
    ``finetune_refcocog_val_captions.json`` (RefCOCOg val), as GLaMM, ControlCap,
    DynRefer and Osprey evaluate them. The same picture appears under several image
    entries, one per region, and an annotation's ``id`` equals its image entry's ``id``.
``densecap``
    Several regions per image: GRiT's dense-captioning ``test.json`` (Visual Genome), the
    set GRiT and GPT4RoI report on.

Field names, as the peers' evaluation code reads them (read for the facts only):

- image entries ``id``, ``file_name``, ``height``, ``width``: mbzuai-oryx/groundingLMM
  ``eval/ddp.py`` (``RegionCapDDP``: ``coco.imgs[i]['file_name']``) and
  ``dataset/region_datasets/RefCOCO_VG_Region_ds.py`` (``info['height']``, ``info['width']``);
  callsys/ControlCap ``controlcap/common/data/vg_processor.py`` (``parse_anns_reg`` reads
  GLaMM's ``test_caption.json``: ``img["file_name"]``, ``gt.imgToAnns[img_id]``).
- annotations ``id``, ``image_id``, ``bbox`` ([x, y, w, h]), ``caption``: groundingLMM
  ``eval/ddp.py`` (``ann_dict[image_id]['bbox']`` and ``['caption']``, so annotation ids
  equal image ids in that layout) and ``eval/utils.py`` (``bbox_to_x1y1x2y2``: ``x1, y1, w, h``);
  ControlCap ``vg_processor.py`` (``ann["id"]``, ``ann["caption"]``, ``x, y, w, h = bbox``);
  callsys/DynRefer ``dynrefer/tasks/task.py`` (``report_metrics_reg`` keys predictions by
  annotation ``id`` and scores with ``COCOEvalCap``).
- GRiT ``test.json``: ``images`` with ``id``, ``file_name``, ``height``, ``width`` and
  ``annotations`` with ``image_id``, ``bbox`` (``BoxMode.XYWH_ABS``), ``caption``, unique
  ``id``: GRiT's ``grit/data/datasets/vg.py`` (``load_vg_json``; the copy read is in
  Wykay/Relformer), files listed in JialianW/GRiT ``datasets/DATASETS.md``.
- A caption on the image entry instead of the annotation (MDETR's RefCOCOg files, as
  Osprey's ``finetune_refcocog_val_with_mask.json``): CircleRadon/Osprey
  ``osprey/eval/refcocog_eval.py`` (``inputs['caption']``). Read as a fallback.

Every region gets the annotation ``id`` as its prediction id (one id per region, as the
peers do; for GLaMM's files this is also the image entry id).
"""
from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from click4caption.errors import InputError

logger = logging.getLogger(__name__)

Box = tuple[float, float, float, float]

LAYOUTS = {
    "region-per-image": "one region per image entry, as GLaMM's test_caption.json (VG) and "
                        "finetune_refcocog_val_captions.json (RefCOCOg)",
    "densecap": "several regions per image, as GRiT's dense-captioning test.json (VG)",
}
LAYOUT_HELP = ("a COCO-style JSON object {\"images\": [{\"id\", \"file_name\", ...}], \"annotations\": "
               "[{\"id\", \"image_id\", \"bbox\": [x, y, w, h], \"caption\"}]}: " + "; or ".join(LAYOUTS.values()))

# why a region is not captioned (counted and listed in the scores)
NO_ID = "no_id"
DUPLICATE_ID = "duplicate_id"
NO_IMAGE_ENTRY = "no_image_entry"
IMAGE_WITHOUT_ANNOTATION = "image_without_annotation"  # lists image entry ids, not region ids
NO_FILE_NAME = "no_file_name"
NO_BOX = "no_box"
BAD_BOX = "bad_box"
ZERO_SIZE_BOX = "zero_size_box"
BOX_OUTSIDE_IMAGE = "box_outside_image"
NO_CAPTION = "no_caption"
IMAGE_NOT_FOUND = "image_not_found"
UNREADABLE_IMAGE = "unreadable_image"


@dataclass(frozen=True)
class RegionRecord:
    """One ground-truth region.

    Attributes:
        region_id: the annotation ``id`` as in the file (int or str): the prediction id.
        image_id: the id of its image entry.
        file_name: the image path relative to the image folder.
        box: ``(x1, y1, x2, y2)`` in original-image pixels (from ``[x, y, w, h]``), not clipped.
        captions: the reference caption(s).
        image_size: ``(width, height)`` declared by the image entry, or ``None``.
    """

    region_id: Any
    image_id: Any
    file_name: str
    box: Box
    captions: tuple[str, ...]
    image_size: tuple[int, int] | None = None

    @property
    def key(self) -> str:
        """The id as a string (the key of the prediction files)."""
        return str(self.region_id)


@dataclass
class Benchmark:
    """A benchmark file read by :func:`load_benchmark`.

    Attributes:
        path: the annotation file.
        layout: ``"region-per-image"`` or ``"densecap"`` (see :data:`LAYOUTS`).
        regions: valid regions, grouped by image (first appearance), file order within one.
        skipped: ``{reason: [region ids]}`` for annotations left out while reading.
        image_file_names: every image entry's ``file_name`` (for the held-out list).
        total: number of annotations in the file.
    """

    path: Path
    layout: str
    regions: list[RegionRecord]
    skipped: dict[str, list[Any]] = field(default_factory=dict)
    image_file_names: list[str] = field(default_factory=list)
    total: int = 0


def xywh_to_xyxy(bbox: Sequence[float]) -> Box:
    """``[x, y, w, h]`` -> ``(x1, y1, x2, y2)``."""
    x, y, w, h = (float(v) for v in bbox)
    return (x, y, x + w, y + h)


def clip_box(box: Box, width: int, height: int) -> Box | None:
    """``box`` clipped to a ``width`` x ``height`` image; ``None`` when less than one
    pixel of width or height lies inside (the box is outside the image)."""
    x1, y1, x2, y2 = box
    cx1, cy1 = min(max(x1, 0.0), float(width)), min(max(y1, 0.0), float(height))
    cx2, cy2 = min(max(x2, 0.0), float(width)), min(max(y2, 0.0), float(height))
    if cx2 - cx1 < 1 or cy2 - cy1 < 1:
        return None
    return (cx1, cy1, cx2, cy2)


def _captions(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        return ()
    return tuple(c.strip() for c in value if isinstance(c, str) and c.strip())


def _box_problem(bbox: Any) -> str | None:
    if bbox is None:
        return NO_BOX
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return BAD_BOX
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox):
        return BAD_BOX
    if bbox[2] <= 0 or bbox[3] <= 0:
        return ZERO_SIZE_BOX
    return None


def _size(entry: dict[str, Any]) -> tuple[int, int] | None:
    try:
        w, h = int(entry["width"]), int(entry["height"])
    except (KeyError, TypeError, ValueError):
        return None
    return (w, h) if w > 0 and h > 0 else None


def read_annotation_json(path: str | Path) -> dict[str, Any]:
    """The JSON object of an annotation file, checked for the COCO-style layout.

    Raises:
        InputError: missing or unreadable file, bad JSON, or another layout (the message
            names the layouts that are read).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"annotation file not found: {path}")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read annotation file {path}: {err}") from None
    except json.JSONDecodeError as err:
        raise InputError(f"annotation file {path} is not valid JSON ({err.msg}, line {err.lineno})") from None
    if not (isinstance(doc, dict) and isinstance(doc.get("images"), list) and isinstance(doc.get("annotations"), list)):
        found = (f"an object with keys {sorted(doc)[:6]}" if isinstance(doc, dict) else f"a JSON {type(doc).__name__}")
        raise InputError(f"annotation file {path} has an unknown layout ({found}); expected {LAYOUT_HELP}")
    return doc


def load_benchmark(path: str | Path) -> Benchmark:
    """Read a benchmark annotation file (either layout) into region records.

    Annotations that cannot be captioned or scored are left out and listed by reason
    (:data:`NO_ID`, :data:`DUPLICATE_ID`, :data:`NO_IMAGE_ENTRY`, :data:`NO_FILE_NAME`,
    :data:`NO_BOX`, :data:`BAD_BOX`, :data:`ZERO_SIZE_BOX`, :data:`BOX_OUTSIDE_IMAGE` (against
    the declared image size), :data:`NO_CAPTION`), and image entries that no annotation
    refers to under :data:`IMAGE_WITHOUT_ANNOTATION` (by image id: in GLaMM's layout, a
    region whose annotation is missing). The image files are not opened here.

    Raises:
        InputError: see :func:`read_annotation_json`.
    """
    path = Path(path)
    doc = read_annotation_json(path)
    images: dict[str, dict[str, Any]] = {}
    for entry in doc["images"]:
        if isinstance(entry, dict) and "id" in entry:
            images.setdefault(str(entry["id"]), entry)
    per_image = Counter(str(a.get("image_id")) for a in doc["annotations"] if isinstance(a, dict))
    layout = "densecap" if any(n > 1 for n in per_image.values()) else "region-per-image"

    skipped: dict[str, list[Any]] = {}
    seen: set[str] = set()
    by_file: dict[str, list[RegionRecord]] = {}
    for n, ann in enumerate(doc["annotations"]):
        if not isinstance(ann, dict) or "id" not in ann:
            skipped.setdefault(NO_ID, []).append(f"annotation #{n}")
            continue
        rid = ann["id"]
        if str(rid) in seen:
            skipped.setdefault(DUPLICATE_ID, []).append(rid)
            continue
        seen.add(str(rid))
        image = images.get(str(ann.get("image_id")))
        reason = None
        if image is None:
            reason = NO_IMAGE_ENTRY
        elif not isinstance(image.get("file_name"), str) or not image["file_name"]:
            reason = NO_FILE_NAME
        else:
            reason = _box_problem(ann.get("bbox"))
        captions: tuple[str, ...] = ()
        size = None
        if reason is None:
            size = _size(image)
            box = xywh_to_xyxy(ann["bbox"])
            if size is not None and clip_box(box, *size) is None:
                reason = BOX_OUTSIDE_IMAGE
            else:
                captions = _captions(ann["caption"]) if "caption" in ann else _captions(image.get("caption"))
                if not captions:
                    reason = NO_CAPTION
        if reason is not None:
            skipped.setdefault(reason, []).append(rid)
            continue
        record = RegionRecord(region_id=rid, image_id=image["id"], file_name=image["file_name"], box=box,
                              captions=captions, image_size=size)
        by_file.setdefault(record.file_name, []).append(record)
    missing = [e["id"] for e in images.values() if str(e["id"]) not in per_image]
    if missing:
        skipped[IMAGE_WITHOUT_ANNOTATION] = missing
    regions = [r for group in by_file.values() for r in group]
    file_names = [e["file_name"] for e in doc["images"] if isinstance(e, dict) and isinstance(e.get("file_name"), str)]
    bench = Benchmark(path=path, layout=layout, regions=regions, skipped=skipped, image_file_names=file_names,
                      total=len(doc["annotations"]))
    left_out = sum(len(v) for v in skipped.values())
    logger.info("%s: %s layout, %d regions on %d images%s", path, layout, len(regions), len(by_file),
                f"; {left_out} left out ({', '.join(f'{k} {len(v)}' for k, v in skipped.items())})" if left_out else "")
    return bench


def vg_image_ids(file_names: Sequence[str]) -> list[str]:
    """Visual Genome image ids of image file names (VG names its images ``<image_id>.jpg``),
    unique, in numeric order: the ids the trainer's ``datasets.vg.held_out_ids_file`` takes.

    Raises:
        InputError: a file name whose stem is not a number (not a VG image).
    """
    ids: set[int] = set()
    for name in file_names:
        stem = Path(name).stem
        if not stem.isdigit():
            raise InputError(f"image file name {name!r} is not a Visual Genome name (<image_id>.jpg)")
        ids.add(int(stem))
    return [str(i) for i in sorted(ids)]


def resolve_image(file_name: str, roots: Sequence[Path]) -> Path | None:
    """The first of ``root / file_name`` (then ``root / basename``) that exists, over ``roots``
    (e.g. VG's ``VG_100K`` and ``VG_100K_2``); ``None`` when none does."""
    for root in roots:
        for candidate in (root / file_name, root / Path(file_name).name):
            if candidate.is_file():
                return candidate
    return None
