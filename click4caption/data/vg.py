"""Visual Genome v1.2 region descriptions.

Layout (``build_info.storage``)::

    VisualGenome/
        image_data.json            [{"image_id", "url", "width", "height", ...}, ...]
        region_descriptions.json   [{"id": image_id, "regions": [{"x", "y", "width", "height", "phrase", ...}]}]
        VG_100K/<id>.jpg, VG_100K_2/<id>.jpg

The image path is taken from the last two parts of the image URL, as upstream. A
region is valid when its phrase is not empty and its box has positive size and lies
inside the image; each item draws ``num_regions`` valid regions with replacement.
Phrases are stripped, capitalised and ended with ".". The transform is the eval one
(resize, no crop) so boxes scaled by ``S/W``, ``S/H`` stay valid.

Held-out ids (``held_out_ids``, ``held_out_ids_file``) are VG ``image_id`` values.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from click4caption.config import DatasetConfig
from click4caption.data.files import check_storage, load_held_out_ids, parse_xywh, read_json
from click4caption.data.regions import RegionCaptionSource, RegionIndex
from click4caption.data.sources import DatasetKind, build_box_safe_vis_processor
from click4caption.errors import DataError

logger = logging.getLogger(__name__)


def normalise_phrase(phrase: str) -> str:
    """``"a red car "`` -> ``"A red car."`` (upstream's VG caption rule)."""
    cap = phrase.strip()
    if not cap:
        return cap
    if cap[0].islower():
        cap = cap[0].upper() + cap[1:]
    if cap[-1] != ".":
        cap += "."
    return cap


def inside_image(boxes: np.ndarray, img_w: float, img_h: float) -> np.ndarray:
    """Mask of ``Mx4`` xywh boxes with positive size lying inside ``[0, W] x [0, H]``."""
    x, y, w, h = boxes.T
    return (w > 0) & (h > 0) & (x >= 0) & (y >= 0) & (x + w <= img_w) & (y + h <= img_h)


class VisualGenomeDataset(RegionCaptionSource):
    """Visual Genome regions; see the module docstring."""

    def valid_mask(self, boxes: np.ndarray, captions: list[str], img_w: int, img_h: int) -> np.ndarray:
        nonempty = np.array([bool(c.strip()) for c in captions], dtype=bool)
        return nonempty & inside_image(boxes, img_w, img_h)

    def normalise(self, caption: str) -> str:
        return normalise_phrase(caption)


def image_path_from_url(root: Path, url: str) -> Path:
    """``https://.../VG_100K_2/1.jpg`` -> ``root/VG_100K_2/1.jpg``."""
    parts = url.rstrip("/").split("/")
    if len(parts) < 2:
        raise ValueError(f"bad image url {url!r}")
    return root / parts[-2] / parts[-1]


def build_visual_genome(cfg: DatasetConfig, name: str, batch_size: int, image_size: int) -> VisualGenomeDataset:
    """Read the annotation files and build the dataset.

    Args:
        cfg: the ``datasets.<name>`` section.
        batch_size: images per batch (``special_batch_size`` or run.batch_size_train).
        image_size: the model input side, the default transform size.
    Raises:
        ConfigError / DataError with a one-line message.
    """
    root = check_storage(cfg.build_info.storage, name, "the Visual Genome folder")
    vis_processor, size = build_box_safe_vis_processor(cfg, name, image_size)
    held_out = load_held_out_ids(cfg, name)
    image_data = read_json(root / "image_data.json", name)
    regions_json = read_json(root / "region_descriptions.json", name)
    if not isinstance(image_data, list) or not isinstance(regions_json, list):
        raise DataError(f"datasets.{name}: image_data.json and region_descriptions.json must hold JSON lists")

    meta: dict[str, tuple[Path, float | None, float | None]] = {}
    for entry in image_data:
        try:
            iid = str(entry.get("image_id", entry.get("id")))
            meta[iid] = (image_path_from_url(root, entry["url"]), entry.get("width"), entry.get("height"))
        except (AttributeError, KeyError, TypeError, ValueError):
            continue

    index = RegionIndex()
    for entry in regions_json:
        if not isinstance(entry, dict):
            index.drop_image("malformed")
            continue
        iid = str(entry.get("id", entry.get("image_id")))
        if iid in held_out:
            index.drop_image("held_out")
            continue
        if iid not in meta:
            index.drop_image("not_in_image_data")
            continue
        path, width, height = meta[iid]
        boxes: list[tuple[float, float, float, float]] = []
        phrases: list[str] = []
        for region in entry.get("regions") or []:
            index.total_regions += 1
            try:
                phrase = str(region.get("phrase") or "").strip()
                box = parse_xywh((region["x"], region["y"], region["width"], region["height"]))
            except (AttributeError, KeyError, TypeError):
                index.drop_region("malformed")
                continue
            if not phrase:
                index.drop_region("empty_phrase")
            elif box is None:
                index.drop_region("bad_box")
            elif width and height and not inside_image(np.array([box]), width, height)[0]:
                index.drop_region("box_outside_image")
            else:
                boxes.append(box)
                phrases.append(phrase)
        if not boxes:
            index.drop_image("no_valid_region")
            continue
        index.add_image(iid, str(path), boxes, phrases)
    return index.build(VisualGenomeDataset, name, cfg, len(regions_json), vis_processor, size, batch_size)


DATASET = DatasetKind(build_visual_genome, unused_keys={
    "text_processor": "phrases are capitalised and end with '.', upstream's VG rule",
    "shuffle_buffer": "a LAION setting", "records_per_image": "a region-instruction setting"})
