"""LAION-style webdataset shards: ``<key>.jpg`` + ``<key>.json`` (with ``caption``).

``build_info.storage`` is a shard pattern as upstream (``.../{00000..42756}.tar``,
several joined with ``::``), a glob, a folder of ``*.tar`` files, or one tar file.

How batches are drawn (the recipe's resampled shards + a 1000-sample shuffle buffer,
made addressable by step so a resumed run repeats them): each batch picks one shard
uniformly at random, with replacement across batches, then a window of
``shuffle_buffer`` consecutive samples in it at a random place, and draws its images
from that window without replacement. A shard is indexed (member offsets read from
the tar headers) on first use and kept in a small per-process cache, so an image is
read with one seek. Only uncompressed ``.tar`` shards are supported.

Captions go through the text processor (``blip_caption``: lower-case, ``.!"()*#:;~``
to spaces, at most 50 words); an empty caption, an unreadable image or a sample
without both ``jpg`` and ``json`` is skipped. The image transform is the train one
(``blip2_image_train``: RandomResizedCrop 0.5-1.0, bicubic), seeded per step. Batches
carry no ``bbox``: the model gives each image a random near-full box. A json may list
``objects`` (``[[x1, y1, x2, y2], ...]``, original pixels: every object in the image) for
the box-attention aid; they are passed on when the transform resizes without cropping.

Held-out ids are sample keys (the member name without extension, e.g. ``000012345``).
"""
from __future__ import annotations

import glob
import io
import json
import logging
import os
import re
import tarfile
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from braceexpand import braceexpand
from PIL import Image

from click4caption.config import DatasetConfig
from click4caption.data.files import load_held_out_ids
from click4caption.data.sources import (
    BOX_SAFE_PROCESSORS, MAX_ATTEMPTS_PER_SAMPLE, NO_OBJECTS, BatchPosition, BatchSource, DatasetKind, SkipSample,
    at_least_one, box_list, object_corners, pad_boxes, processor_config, seeded_transform, stack_images,
)
from click4caption.errors import ConfigError, DataError
from click4caption.images import to_rgb
from click4caption.processors import build_processor

logger = logging.getLogger(__name__)

IMAGE_EXT = "jpg"
META_EXT = "json"
#: shard indexes kept per process
SHARD_CACHE_SIZE = 32
_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's key/extension split


@dataclass
class ShardIndex:
    """Complete samples of one shard, in file order."""

    keys: list[str]
    image: np.ndarray  # Nx2 (offset, size) of the jpg member
    meta: np.ndarray   # Nx2 (offset, size) of the json member

    def __len__(self) -> int:
        return len(self.keys)


def expand_shards(storage: str) -> list[str]:
    """Shard paths named by ``storage`` (brace pattern, ``::`` list, glob, folder, file)."""
    paths: list[str] = []
    for part in storage.split("::"):
        part = os.path.expanduser(part.strip())
        if not part:
            continue
        for item in braceexpand(part):
            if os.path.isdir(item):
                paths.extend(sorted(glob.glob(os.path.join(item, "*.tar"))))
            elif any(c in item for c in "*?["):
                paths.extend(sorted(glob.glob(item)))
            else:
                paths.append(item)
    return paths


def index_shard(path: str, held_out: frozenset[str] = frozenset()) -> tuple[ShardIndex, Counter]:
    """Read a tar's headers: ``(index of complete samples, counts of left-out ones)``.

    A truncated or damaged tar keeps the samples read before the damage.

    Raises:
        SkipSample('unreadable_shard'): the file cannot be opened as a tar.
    """
    members: dict[str, dict[str, tuple[int, int]]] = {}
    order: list[str] = []
    skipped: Counter = Counter()
    try:
        tar = tarfile.open(path, mode="r:")
    except (OSError, tarfile.TarError) as err:
        raise SkipSample("unreadable_shard", f"{path}: {err}") from None
    with tar:
        try:
            for member in tar:
                if not member.isfile():
                    continue
                match = _KEY_RE.match(member.name)
                if not match:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                if key not in members:
                    members[key] = {}
                    order.append(key)
                members[key][ext] = (member.offset_data, member.size)
        except (OSError, tarfile.TarError) as err:
            skipped["damaged_shard"] += 1
            logger.warning("shard %s is damaged after %d samples (%s); using those", path, len(order), err)
    keys, image, meta = [], [], []
    for key in order:
        parts = members[key]
        if os.path.basename(key) in held_out:
            skipped["held_out"] += 1
        elif IMAGE_EXT not in parts or META_EXT not in parts:
            skipped["incomplete_sample"] += 1
        else:
            keys.append(key)
            image.append(parts[IMAGE_EXT])
            meta.append(parts[META_EXT])
    return ShardIndex(keys, np.asarray(image, np.int64).reshape(-1, 2), np.asarray(meta, np.int64).reshape(-1, 2)), skipped


def _read(path: str, span: np.ndarray) -> bytes:
    with open(path, "rb") as f:
        f.seek(int(span[0]))
        data = f.read(int(span[1]))
    if len(data) != int(span[1]):
        raise SkipSample("truncated_sample", path)
    return data


class LaionDataset(BatchSource):
    """Whole-image captions from webdataset shards; see the module docstring."""

    def __init__(
        self,
        name: str,
        shards: list[str],
        vis_processor: Any,
        text_processor: Any,
        batch_size: int,
        sample_ratio: float,
        shuffle_buffer: int,
        held_out: frozenset[str] = frozenset(),
        image_size: int | None = None,
        keep_objects: bool = False,
    ) -> None:
        if not shards:
            raise DataError(f"datasets.{name}: no shard found")
        super().__init__(name, batch_size, sample_ratio, vis_processor, image_size)
        self.shards, self.held_out = shards, held_out
        # object boxes in the json are passed on only when the transform keeps them valid
        self.keep_objects = keep_objects
        self.text_processor = text_processor
        self.shuffle_buffer = at_least_one(shuffle_buffer, name, "shuffle_buffer")
        self._cache: OrderedDict[str, tuple[ShardIndex, Counter]] = OrderedDict()

    def describe(self) -> str:
        return f"{super().describe()} images; {len(self.shards)} shards, shuffle window {self.shuffle_buffer}"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = OrderedDict()  # workers build their own
        return state

    def shard_index(self, path: str) -> ShardIndex:
        """Cached :func:`index_shard`. What a shard leaves out (incomplete or held-out
        samples, damage) is logged when the shard is first indexed in a process; those
        samples are never drawn, so they are not counted as skipped samples of a batch
        (the counts stay a function of the step, the same after a resume)."""
        if path in self._cache:
            self._cache.move_to_end(path)
            return self._cache[path][0]
        index, left_out = index_shard(path, self.held_out)
        if left_out:
            logger.debug("%s: shard %s leaves out %s", self.name, path, dict(left_out))
        self._cache[path] = (index, left_out)
        while len(self._cache) > SHARD_CACHE_SIZE:
            self._cache.popitem(last=False)
        return index

    def load_sample(self, path: str, index: ShardIndex, i: int, rng: np.random.Generator) -> dict[str, Any]:
        """Sample ``i`` of a shard -> ``{"image": 3xSxS, "caption": str}``."""
        try:
            meta = json.loads(_read(path, index.meta[i]).decode("utf-8"))
            caption = meta.get("caption") if isinstance(meta, dict) else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise SkipSample("bad_json", f"{path}:{index.keys[i]}") from None
        caption = self.text_processor(caption) if isinstance(caption, str) else ""
        if not caption.strip():
            raise SkipSample("empty_caption", f"{path}:{index.keys[i]}")
        objects = None
        if self.keep_objects and isinstance(meta, dict) and "objects" in meta:
            objects = box_list(meta["objects"])
            if objects is None:
                raise SkipSample("bad_objects", f"{path}:{index.keys[i]}")
        try:
            with Image.open(io.BytesIO(_read(path, index.image[i]))) as img:
                img.load()
                image = to_rgb(img, exif_transpose=False)
        except SkipSample:
            raise
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise SkipSample("unreadable_image", f"{path}:{index.keys[i]}: {err}") from None
        sample = {"image": seeded_transform(self.vis_processor, image, rng), "caption": caption}
        if objects is not None:
            sample["objects"] = object_corners(objects, image.width, image.height, self.image_size)
        return sample

    def draw_batch(self, rng: np.random.Generator, pos: BatchPosition) -> tuple[dict[str, Any], Counter]:
        skipped: Counter = Counter()
        items: list[dict[str, Any]] = []
        failures = 0
        while len(items) < self.batch_size:
            if failures > MAX_ATTEMPTS_PER_SAMPLE * self.batch_size:
                raise DataError(f"datasets.{self.name}: too many unusable samples in a row "
                                f"({dict(skipped)}); check the shards")
            path = self.shards[int(rng.integers(len(self.shards)))]
            try:
                index = self.shard_index(path)
            except SkipSample as err:
                skipped[err.reason] += 1
                failures += 1
                continue
            if len(index) == 0:
                skipped["empty_shard"] += 1
                failures += 1
                continue
            need = self.batch_size - len(items)
            window = min(self.shuffle_buffer, len(index))
            start = int(rng.integers(len(index) - window + 1))
            picks = start + rng.choice(window, size=need, replace=window < need)
            for i in picks:
                try:
                    items.append(self.load_sample(path, index, int(i), rng))
                except SkipSample as err:
                    skipped[err.reason] += 1
                    failures += 1
                except Exception as err:  # a sample must never stop the run
                    skipped["error"] += 1
                    failures += 1
                    logger.debug("%s: %s:%s failed: %s", self.name, path, index.keys[int(i)], err)
        return self.collate(items), skipped

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """-> ``image`` ``Bx3xSxS``, ``text_input`` (B captions); no ``bbox``. With object
        boxes in any sample's json, ``objects`` ``BxMx2x2`` and ``num_objects`` (B ints)."""
        batch = {"image": stack_images(items), "text_input": [it["caption"] for it in items]}
        if any("objects" in it for it in items):
            batch["objects"], batch["num_objects"] = pad_boxes([it.get("objects", NO_OBJECTS) for it in items])
        return batch


def build_laion(cfg: DatasetConfig, name: str, batch_size: int, image_size: int) -> LaionDataset:
    """Find the shards and build the dataset.

    Raises:
        ConfigError / DataError with a one-line message.
    """
    storage = cfg.build_info.storage
    if not storage:
        raise ConfigError(f"datasets.{name}.build_info.storage is not set (the shard pattern)")
    named = expand_shards(storage)
    shards = [p for p in named if os.path.isfile(p)]
    if len(shards) < len(named):
        logger.warning("%s: %d of %d shards named by %s do not exist (e.g. %s)", name, len(named) - len(shards),
                       len(named), storage, next(p for p in named if not os.path.isfile(p)))
    if not shards:
        raise DataError(f"datasets.{name}: no shard found at {storage}")
    compressed = [p for p in shards if not p.endswith(".tar")]
    if compressed:
        raise ConfigError(f"datasets.{name}: only uncompressed .tar shards are supported, got {Path(compressed[0]).name}")
    vis_cfg = processor_config(cfg, "vis_processor", "blip2_image_train", image_size)
    text_cfg = processor_config(cfg, "text_processor", "blip_caption", image_size)
    return LaionDataset(name, shards, build_processor(vis_cfg), build_processor(text_cfg), batch_size,
                        cfg.sample_ratio, cfg.shuffle_buffer, load_held_out_ids(cfg, name), vis_cfg.image_size,
                        keep_objects=vis_cfg.name in BOX_SAFE_PROCESSORS)


DATASET = DatasetKind(build_laion, unused_keys={
    "num_regions": "LAION images are captioned whole (one near-full box each)",
    "records_per_image": "a region-instruction setting"})
