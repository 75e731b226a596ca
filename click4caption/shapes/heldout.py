"""A second, independent generator of the shapes world, for a held-out check.

design/shapes_world.md is a contract: scenes drawn by any program that follows it must
be described as well as our own. This module is such a program, written from the page
and sharing none of :mod:`click4caption.shapes.world`'s sampling or drawing code (only
its vocabulary and its language, which the page fixes): other layouts, other drawing,
other statistics, so that a model that learned our generator's quirks shows it here.

What differs from ``world``:

- layouts: objects on a jittered grid, pushed into the corners, packed in a cluster
  around one point, or in a row (each a quarter of the scenes), instead of uniform
  random positions; the count requested is uniform in 2-5 and the layout is retried
  whole when an object does not fit;
- sizes: large with probability 0.4 (not 0.5);
- drawing: every shape rasterised from its geometry with 4 x 4 supersampling, so edges
  are anti-aliased (PIL's polygons in ``world`` are not); stars with an inner radius of
  0.38-0.5 of the outer one; triangles equilateral or filling the box (half each);
  cross arms 0.28-0.38 of the side;
- noise: independent per channel, and over the objects too (``world`` shares one value
  across channels and draws the objects over it).

``make_heldout_items`` returns items in the format of
:func:`click4caption.shapes.scoring.make_eval_items`, so :func:`score` and
:func:`format_table` apply; ``evaluate.py shapes --generator heldout`` uses it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from click4caption.shapes.scoring import scene_items
from click4caption.shapes.world import COLORS, SHAPES, Scene, ShapeObject

HELDOUT_STREAM = 2000
LAYOUTS: tuple[str, ...] = ("grid", "corners", "cluster", "row")
P_LARGE = 0.4
SUPERSAMPLE = 4
GAP = 4  # px between boxes (the spec's minimum)
MARGIN = 2  # px from the border
TRIES = 200


# ----------------------------------------------------------------------------- layout
def _sides(rng: np.random.Generator, count: int, m: int) -> list[tuple[str, int]]:
    out = []
    for _ in range(count):
        size = "large" if rng.random() < P_LARGE else "small"
        lo, hi = (0.34, 0.46) if size == "large" else (0.18, 0.26)
        out.append((size, int(rng.integers(math.ceil(lo * m), math.floor(hi * m) + 1))))
    return out


def _apart(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    (ax, ay, aside), (bx, by, bside) = a, b
    return ax + aside + GAP <= bx or bx + bside + GAP <= ax or ay + aside + GAP <= by or by + bside + GAP <= ay


def _position(rng: np.random.Generator, layout: str, k: int, n: int, side: int, w: int, h: int,
              anchor: tuple[float, float]) -> tuple[int, int]:
    """Top-left corner for object ``k`` of ``n`` under ``layout`` (may collide; checked by the caller)."""
    free_w, free_h = w - 2 * MARGIN - side, h - 2 * MARGIN - side
    if layout == "grid":
        cols = int(math.ceil(math.sqrt(n)))
        rows = int(math.ceil(n / cols))
        cell = int(rng.integers(rows * cols))
        r, c = divmod(cell, cols)
        fx = (c + rng.uniform(0.1, 0.9)) / cols
        fy = (r + rng.uniform(0.1, 0.9)) / rows
    elif layout == "corners":
        fx, fy = rng.beta(0.35, 0.35), rng.beta(0.35, 0.35)
    elif layout == "cluster":
        fx = float(np.clip(anchor[0] + rng.normal(0, 0.22), 0, 1))
        fy = float(np.clip(anchor[1] + rng.normal(0, 0.22), 0, 1))
    elif layout == "row":
        along = (k + rng.uniform(0.0, 1.0)) / n
        across = float(np.clip(anchor[1] + rng.normal(0, 0.08), 0, 1))
        fx, fy = (along, across) if anchor[0] < 0.5 else (across, along)
    else:
        raise ValueError(f"unknown layout {layout!r}")
    return MARGIN + int(round(fx * free_w)), MARGIN + int(round(fy * free_h))


def sample_heldout_scene(rng: np.random.Generator, layout: str | None = None) -> tuple[Scene, dict[str, Any]]:
    """A scene per the spec with this module's statistics; returns it and its drawing style."""
    w, h = (int(v) for v in rng.integers(192, 321, size=2))
    layout = layout or LAYOUTS[int(rng.integers(len(LAYOUTS)))]
    wanted = int(rng.integers(2, 6))
    colour_names = list(COLORS)
    best: list[ShapeObject] = []
    for count in range(wanted, 0, -1):  # retry the whole layout, then ask for one object fewer
        for _ in range(TRIES // 10):
            sides = sorted(_sides(rng, count, min(w, h)), key=lambda s: -s[1])
            anchor = (float(rng.uniform(0.2, 0.8)), float(rng.uniform(0.2, 0.8)))
            placed: list[tuple[int, int, int]] = []
            for k, (_, side) in enumerate(sides):
                for _ in range(TRIES):
                    x, y = _position(rng, layout, k, count, side, w, h, anchor)
                    if all(_apart((x, y, side), p) for p in placed):
                        placed.append((x, y, side))
                        break
                else:
                    break
            if len(placed) == count:
                best = []
                for (size, side), (x, y, _) in zip(sides, placed, strict=True):
                    shape = SHAPES[int(rng.integers(len(SHAPES)))]
                    colour = colour_names[int(rng.integers(len(colour_names)))]
                    rgb = tuple(int(v) for v in np.clip(np.array(COLORS[colour]) + rng.integers(-15, 16, 3), 0, 255))
                    best.append(ShapeObject(shape, colour, size, (x, y, side, side), rgb))  # type: ignore[arg-type]
                break
        if best:
            break
    style = {
        "layout": layout,
        "star_inner": float(rng.uniform(0.38, 0.5)),
        "equilateral": bool(rng.random() < 0.5),
        "cross_arm": float(rng.uniform(0.28, 0.38)),
    }
    scene = Scene(w, h, int(rng.integers(100, 161)), float(rng.uniform(0.0, 8.0)), best)
    return scene, style


# ----------------------------------------------------------------------------- drawing
def _inside(shape: str, u: np.ndarray, v: np.ndarray, style: dict[str, Any]) -> np.ndarray:
    """Coverage test in box coordinates ``u, v`` in [0, 1] (v down)."""
    if shape == "square":
        return np.ones_like(u, dtype=bool)
    if shape == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    if shape == "cross":
        a = style["cross_arm"] / 2
        return (np.abs(u - 0.5) <= a) | (np.abs(v - 0.5) <= a)
    if shape == "triangle":
        if style["equilateral"]:
            height = math.sqrt(3) / 2
            top = (1 - height) / 2
            vv = (v - top) / height
        else:
            vv = v
        return (vv >= 0) & (vv <= 1) & (np.abs(u - 0.5) <= vv / 2)
    if shape == "star":
        angle = np.arctan2(u - 0.5, -(v - 0.5))  # 0 at the top, clockwise
        radius = np.hypot(u - 0.5, v - 0.5) / 0.5
        inner = style["star_inner"]
        sector = np.mod(angle, 2 * math.pi / 5) / (2 * math.pi / 5)  # 0 at a point, 0.5 between points
        t = np.abs(sector - 0.5) * 2  # 1 at a point, 0 between
        # the edge runs straight from an inner vertex to an outer one: radius along it
        phi = (1 - t) * math.pi / 5
        outer_pt = np.array([1.0, 0.0])
        inner_pt = np.array([inner * math.cos(math.pi / 5), inner * math.sin(math.pi / 5)])
        d = inner_pt - outer_pt
        # intersection of the ray at angle phi with the segment outer_pt -> inner_pt
        denom = np.cos(phi) * d[1] - np.sin(phi) * d[0]
        s = (outer_pt[0] * d[1] - outer_pt[1] * d[0]) / denom
        return radius <= s
    raise ValueError(f"unknown shape {shape!r}")


def render_heldout_scene(scene: Scene, style: dict[str, Any], rng: np.random.Generator) -> Image.Image:
    """Anti-aliased shapes on a gray canvas, then per-channel noise over everything."""
    canvas = np.full((scene.height, scene.width, 3), float(scene.background))
    for obj in scene.objects:
        x, y, side, _ = obj.box
        n = side * SUPERSAMPLE
        grid = (np.arange(n) + 0.5) / n
        u, v = np.meshgrid(grid, grid)
        cover = _inside(obj.shape, u, v, style).reshape(side, SUPERSAMPLE, side, SUPERSAMPLE).mean(axis=(1, 3))
        patch = canvas[y : y + side, x : x + side]
        patch[:] = patch * (1 - cover[..., None]) + np.array(obj.rgb, dtype=float) * cover[..., None]
    canvas += rng.normal(0.0, scene.noise_std, size=canvas.shape)
    return Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), mode="RGB")


def draw_heldout_scene(rng: np.random.Generator, layout: str | None = None) -> tuple[Image.Image, Scene]:
    scene, style = sample_heldout_scene(rng, layout)
    return render_heldout_scene(scene, style, rng), scene


# ----------------------------------------------------------------------------- items
def make_heldout_items(seed: int, num_scenes: int, image_dir: Path | str) -> list[dict[str, Any]]:
    """Items like :func:`click4caption.shapes.scoring.make_eval_items` (same kinds, Yes/No
    alternating over scenes for pairs) on this module's scenes, the layouts in turn."""
    def draw(rng: np.random.Generator, index: int | None) -> tuple[Image.Image, Scene]:
        return draw_heldout_scene(rng, None if index is None else LAYOUTS[index % len(LAYOUTS)])

    return scene_items(np.random.default_rng([seed, HELDOUT_STREAM]), num_scenes, image_dir, draw,
                       prefix="h", tries=TRIES * 5)
