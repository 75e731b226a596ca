"""The resumable, data-parallel captioning loop over benchmark regions.

Each process (see :mod:`click4caption.parallel`) takes its contiguous share of the regions,
skips those already in the output or partial files, and captions the rest in chunks of
``batch_size`` regions (the regions of several images per ``describe_regions`` call). Each
chunk's records are appended to the process's partial file as soon as it is done, so a
crash loses at most one chunk; rank 0 then merges everything in input order.

A record is ``{"id": region_id, "caption": str}`` (plus ``"clipped": true`` when the box
reached outside the image and was clipped to it), or ``{"id": region_id, "skipped": reason,
"detail": message}`` for a region whose image is missing or unreadable or whose box lies
outside the image.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

from click4caption.errors import Click4CaptionError, InputError
from click4caption.evaluation.annotations import (
    BOX_OUTSIDE_IMAGE, IMAGE_NOT_FOUND, UNREADABLE_IMAGE, RegionRecord, clip_box, resolve_image,
)
from click4caption.parallel import DistContext, PartialWriter, barrier, load_done, merge, partial_path, shard

if TYPE_CHECKING:
    from PIL import Image

    from click4caption.captioner import Region
    from click4caption.generation import GenerationSettings

logger = logging.getLogger(__name__)

# regions per describe_regions call (the regions of several images)
DEFAULT_BATCH_SIZE = 64
KEY_FIELD = "id"


class RegionDescriber(Protocol):
    """What the loop needs of a captioner (``click4caption.captioner.Captioner`` has it)."""

    def describe_regions(self, regions: Sequence[Region], settings: GenerationSettings | None = None) -> list[str]:
        ...


def _open_image(file_name: str, roots: Sequence[Path]) -> Image.Image | tuple[str, str]:
    """The image, or ``(reason, message)`` when it is missing or unreadable."""
    from click4caption.images import load_image

    path = resolve_image(file_name, roots)
    if path is None:
        return IMAGE_NOT_FOUND, f"{file_name} not found under {', '.join(str(r) for r in roots)}"
    try:
        return load_image(path, exif_transpose=False)  # benchmark boxes were drawn on the stored pixels
    except InputError as err:
        return UNREADABLE_IMAGE, str(err)


def caption_regions(get_captioner: Callable[[], RegionDescriber], regions: Sequence[RegionRecord],
                    image_roots: Sequence[Path], output: Path, settings: GenerationSettings | None = None,
                    batch_size: int = DEFAULT_BATCH_SIZE, ctx: DistContext | None = None,
                    ) -> dict[str, dict[str, Any]] | None:
    """Caption every region not yet in ``output``; merge all records into ``output``.

    Args:
        get_captioner: builds the captioner; called only when this process has work left
            (a resumed run that is already complete loads no model).
        regions: the regions, in input order (all processes get the same list).
        image_roots: folders holding the images (searched in order).
        output: the merged JSON-lines file of records (partial files go beside it).
        settings: generation settings for ``describe_regions``.
        batch_size: regions per ``describe_regions`` call.
        ctx: this process's place; one process when ``None``.

    Returns:
        On rank 0, ``{str(region_id): record}`` for every region known (this run's and
        earlier ones'); ``None`` on other ranks.
    """
    from tqdm import tqdm

    from click4caption.captioner import Captioner

    ctx = ctx or DistContext()
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    done = load_done(output, KEY_FIELD)
    mine = [regions[i] for i in shard(len(regions), ctx.rank, ctx.world_size)]
    todo = [r for r in mine if r.key not in done]
    barrier(ctx)  # every process has read what is done before any of them appends
    if len(todo) < len(mine):
        logger.info("rank %d: %d of its %d regions already done, %d to caption", ctx.rank, len(mine) - len(todo),
                    len(mine), len(todo))
    if todo:
        captioner = get_captioner()
        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc="regions", unit="region",
                   disable=None if ctx.is_main else True)
        with PartialWriter(partial_path(output, ctx.rank)) as writer, bar:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start:start + batch_size]
                writer.write_many(_caption_chunk(captioner, chunk, image_roots, settings, Captioner.region))
                bar.update(len(chunk))
    return merge(output, [r.key for r in regions], KEY_FIELD, ctx)


def _caption_chunk(captioner: RegionDescriber, chunk: Sequence[RegionRecord], image_roots: Sequence[Path],
                   settings: GenerationSettings | None, make_region: Callable[..., Region]) -> list[dict[str, Any]]:
    """Records for one chunk, in chunk order: one ``describe_regions`` call for its valid regions."""
    images: dict[str, Any] = {}
    records: list[dict[str, Any]] = []
    pending: list[tuple[dict[str, Any], Region]] = []
    for rec in chunk:
        if rec.file_name not in images:
            images[rec.file_name] = _open_image(rec.file_name, image_roots)
        image = images[rec.file_name]
        record: dict[str, Any] = {KEY_FIELD: rec.region_id}
        records.append(record)
        if isinstance(image, tuple):
            record["skipped"], record["detail"] = image
            continue
        box = clip_box(rec.box, image.width, image.height)
        if box is None:
            record["skipped"] = BOX_OUTSIDE_IMAGE
            record["detail"] = f"box {list(rec.box)} lies outside the {image.width}x{image.height} image"
            continue
        if box != rec.box:
            record["clipped"] = True
        pending.append((record, make_region(image, box)))
    if pending:
        captions = captioner.describe_regions([region for _, region in pending], settings)
        if len(captions) != len(pending):
            raise Click4CaptionError(f"describe_regions returned {len(captions)} captions for {len(pending)} regions")
        for (record, _), caption in zip(pending, captions):
            record["caption"] = caption
    for record in records:
        if "skipped" in record:
            logger.warning("region %s skipped (%s): %s", record[KEY_FIELD], record["skipped"], record["detail"])
    return records
