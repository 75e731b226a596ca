"""Boxes given by users: corner order, ``-1`` = image border, clipping, scaling."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from click4caption.errors import InputError

Box = tuple[float, float, float, float]

#: training draws whole-image boxes with each corner up to this many model pixels inside
#: the border (upstream's ``7 * rand``: half a ViT patch)
NEAR_FULL_BOX_JITTER = 7.0


def normalize_box(box: Sequence[float], width: int, height: int) -> tuple[Box, list[str]]:
    """A user box ``(x1, y1, x2, y2)`` in original-image pixels -> a valid box + warnings.

    ``-1`` for a top-left coordinate means 0 and for a bottom-right one the image
    border (upstream CLI semantics); corners given bottom-right first are swapped;
    boxes reaching outside the image are clipped.

    Raises:
        InputError: not four numbers, or empty after clipping.
    """
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise InputError(f"a box must be four numbers [x1, y1, x2, y2], got {box!r}")
    try:
        x1, y1, x2, y2 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise InputError(f"a box must be four numbers [x1, y1, x2, y2], got {box!r}") from None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise InputError(f"box coordinates must be finite numbers, got {box!r}")
    warnings: list[str] = []
    x1 = 0.0 if x1 == -1 else x1
    y1 = 0.0 if y1 == -1 else y1
    x2 = float(width) if x2 == -1 else x2
    y2 = float(height) if y2 == -1 else y2
    if x1 > x2 or y1 > y2:
        warnings.append(f"corners were not top-left then bottom-right; using box "
                        f"({min(x1, x2):g}, {min(y1, y2):g}, {max(x1, x2):g}, {max(y1, y2):g})")
        x1, x2 = min(x1, x2), max(x1, x2)
        y1, y2 = min(y1, y2), max(y1, y2)
    cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
    cx2, cy2 = min(max(x2, 0.0), width), min(max(y2, 0.0), height)
    if (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2):
        warnings.append(f"box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) reaches outside the {width}x{height} image; "
                        f"clipped to ({cx1:g}, {cy1:g}, {cx2:g}, {cy2:g})")
    if cx2 - cx1 < 1 or cy2 - cy1 < 1:
        raise InputError(f"empty box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) in a {width}x{height} image: "
                         "it needs at least 1 pixel of width and height inside the image")
    return (cx1, cy1, cx2, cy2), warnings


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """``Nx4`` boxes ``(x, y, w, h)`` (Visual Genome's, COCO's) -> ``Nx4`` ``(x1, y1, x2, y2)``."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)


def scale_boxes(boxes: np.ndarray, width: int, height: int, image_size: int) -> np.ndarray:
    """``Nx4`` boxes ``(x1, y1, x2, y2)`` in original pixels -> ``Nx2x2`` corners in the
    pixels of the ``SxS`` model input: x scales by ``S/W``, y by ``S/H`` (the resize keeps
    no aspect ratio), in float64."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return (boxes * np.array([image_size / width, image_size / height] * 2)).reshape(-1, 2, 2)


def to_model_pixels(box: Box, width: int, height: int, image_size: int) -> list[list[float]]:
    """One original-image box -> corners ``[[x1, y1], [x2, y2]]`` in model-input pixels."""
    return scale_boxes(np.array([box]), width, height, image_size)[0].tolist()
