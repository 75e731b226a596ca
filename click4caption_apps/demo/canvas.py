"""What the demo draws and how clicks become boxes: pure functions of PIL images and
points, with no gradio and no torch, so that they are tested without a browser.

The canvas shows every image with its longer side :data:`DISPLAY_SIDE` (clicks arrive
in canvas pixels and are mapped back to image pixels); boxes are always kept in the
original image's pixels, as the library takes them.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from PIL import Image, ImageDraw, ImageFont

from click4caption.boxes import Box
from click4caption.errors import InputError

Point = tuple[int, int]

DISPLAY_SIDE = 512  # the canvas shows images with this longer side
THUMB_SIDE = 96  # region thumbnails (the QA gallery and the chat)
STRIP_GAP = 6  # px between thumbnails in the chat's strip of regions

# colours drawn on the canvas
SELECTION_COLOR = (255, 0, 0)
REGION_COLOR = (0, 200, 255)
MARK_COLOR = (255, 0, 0)  # the first clicked corner, outlined in MARK_OUTLINE to show on any colour
MARK_OUTLINE = (255, 255, 255)
LABEL_FILL, LABEL_TEXT = (0, 0, 0), (255, 255, 255)  # number badges on thumbnails
STRIP_BACKGROUND = (255, 255, 255)


# ============================================================================ clicks -> boxes
def as_point(index: Any) -> Point:
    """``gr.SelectData.index`` of an image (``[x, y]`` in canvas pixels) -> ``(x, y)``.

    Raises:
        InputError: no coordinates (a click outside the picture).
    """
    if not isinstance(index, (list, tuple)) or len(index) != 2:
        raise InputError("click inside the picture")
    try:
        x, y = (int(round(float(v))) for v in index)
    except (TypeError, ValueError):
        raise InputError("click inside the picture") from None
    return x, y


def display_scale(width: int, height: int, side: int = DISPLAY_SIDE) -> float:
    """Factor from image pixels to canvas pixels: the canvas shows every image with
    its longer side ``side`` (small images are enlarged so that boxes on them are easy
    to click, large ones are sent smaller)."""
    return side / max(width, height)


def to_image_point(point: Point, scale: float, width: int, height: int) -> Point:
    """A canvas click (canvas pixels) -> image pixels, inside ``[0, W] x [0, H]``."""
    x = min(max(int(round(point[0] / scale)), 0), width)
    y = min(max(int(round(point[1] / scale)), 0), height)
    return x, y


def box_from_clicks(a: Point, b: Point) -> Box:
    """Two clicked corners, in any order -> the box ``(x1, y1, x2, y2)`` spanning both."""
    x1, x2 = sorted((a[0], b[0]))
    y1, y2 = sorted((a[1], b[1]))
    return float(x1), float(y1), float(x2), float(y2)


def corner_name(point: Point, other: Point) -> str:
    """Which corner of the box spanned by ``point`` and ``other`` is ``point``:
    ``"top-left"``, ``"top-right"``, ``"bottom-left"`` or ``"bottom-right"`` (image y
    grows downwards). Two points on one row or column span no box (the selection is
    refused as empty), so ties need no name of their own."""
    vertical = "top" if point[1] <= other[1] else "bottom"
    horizontal = "left" if point[0] <= other[0] else "right"
    return f"{vertical}-{horizontal}"


def click_order(first: Point, second: Point) -> str:
    """How the two corners were clicked, e.g. ``"top-right then bottom-left"`` (told to
    the user, so that the status says what actually happened)."""
    return f"{corner_name(first, second)} then {corner_name(second, first)}"


# ============================================================================ drawing
def pixel_box(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
    """A float box -> integer pixel bounds, at least 1 px wide and high, inside the image."""
    x1 = min(max(int(math.floor(box[0])), 0), width - 1)
    y1 = min(max(int(math.floor(box[1])), 0), height - 1)
    x2 = min(max(int(math.ceil(box[2])), x1 + 1), width)
    y2 = min(max(int(math.ceil(box[3])), y1 + 1), height)
    return x1, y1, x2, y2


def crop_thumbnail(image: Image.Image, box: Box, max_side: int = THUMB_SIDE) -> Image.Image:
    """The region ``box`` of ``image`` as an RGB thumbnail no larger than ``max_side``
    (never enlarged)."""
    crop = image.convert("RGB").crop(pixel_box(box, image.width, image.height))
    crop.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return crop


def line_width(image: Image.Image) -> int:
    """Outline width that stays visible on small and large images (upstream's rule)."""
    return max(2, (image.width + image.height) // 224)


def mark_radius(image: Image.Image) -> int:
    """Half the span of the first-corner mark: about 5% of the canvas, so that it is
    seen at a glance on the 512 px canvas (about 24 px)."""
    return max(8, (image.width + image.height) // 40)


def display_image(image: Image.Image, scale: float) -> Image.Image:
    """``image`` resized by ``scale`` for the canvas (RGB, a new image)."""
    if scale == 1.0:
        return image.convert("RGB").copy()
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.convert("RGB").resize(size, Image.Resampling.BICUBIC)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _draw_mark(draw: ImageDraw.ImageDraw, x: int, y: int, r: int, lw: int) -> None:
    """A crosshair with a ring: red, outlined in white so that it shows on red shapes too."""
    for colour, width in ((MARK_OUTLINE, lw + 4), (MARK_COLOR, lw)):
        draw.line((x - r, y, x + r, y), fill=colour, width=width)
        draw.line((x, y - r, x, y + r), fill=colour, width=width)
        ring = r // 2
        draw.ellipse((x - ring, y - ring, x + ring, y + ring), outline=colour, width=width)


def draw_selection(image: Image.Image, first: Point | None = None, box: Box | None = None,
                   regions: Sequence[tuple[int, Box]] = (), scale: float = 1.0) -> Image.Image:
    """A copy of ``image`` with the added ``regions`` (numbered), the selected ``box``
    and the ``first`` clicked corner drawn on it. Coordinates are in original-image
    pixels, ``scale`` times smaller than ``image`` (the canvas, see :func:`display_image`)."""
    vis = image.convert("RGB").copy()

    def scaled(b: Box) -> Box:
        return (b[0] * scale, b[1] * scale, b[2] * scale, b[3] * scale)

    draw = ImageDraw.Draw(vis)
    lw = line_width(vis)
    font = _font(max(12, 6 * lw)) if regions else None
    for number, rbox in regions:
        x1, y1, x2, y2 = pixel_box(scaled(rbox), vis.width, vis.height)
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), outline=REGION_COLOR, width=max(1, lw - 1))
        draw.text((x1 + lw + 2, y1 + lw), str(number), fill=REGION_COLOR, font=font, stroke_width=1,
                  stroke_fill=(0, 0, 0))
    if box is not None:
        x1, y1, x2, y2 = pixel_box(scaled(box), vis.width, vis.height)
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), outline=SELECTION_COLOR, width=lw)
    if first is not None:
        _draw_mark(draw, round(first[0] * scale), round(first[1] * scale), mark_radius(vis), lw)
    return vis


def numbered(thumb: Image.Image, number: int) -> Image.Image:
    """A copy of ``thumb`` with ``number`` in a black badge at its top-left corner (the
    region's number in the question)."""
    out = thumb.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    font = _font(14)
    text = str(number)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = 3
    draw.rectangle((0, 0, right - left + 2 * pad, bottom - top + 2 * pad), fill=LABEL_FILL)
    draw.text((pad - left, pad - top), text, fill=LABEL_TEXT, font=font)
    return out


def region_strip(thumbs: Sequence[tuple[int | None, Image.Image]], gap: int = STRIP_GAP) -> Image.Image:
    """The regions of one question side by side, each numbered (``None``: no number),
    as ONE picture: one chat bubble holds every region of the question, so the first
    region does not scroll out of the chat behind the others."""
    if not thumbs:
        raise ValueError("region_strip needs at least one thumbnail")
    pictures = [numbered(t, n) if n is not None else t.convert("RGB") for n, t in thumbs]
    height = max(p.height for p in pictures)
    width = sum(p.width for p in pictures) + gap * (len(pictures) - 1)
    strip = Image.new("RGB", (width, height), STRIP_BACKGROUND)
    x = 0
    for p in pictures:
        strip.paste(p, (x, (height - p.height) // 2))
        x += p.width + gap
    return strip


def format_box(box: Box) -> str:
    """``(x1, y1, x2, y2)`` without trailing zeros, as the status line shows boxes."""
    return "(" + ", ".join(f"{v:g}" for v in box) + ")"
