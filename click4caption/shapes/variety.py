"""Drawing variety for training data: the spec's freedom, not our generator's habits.

design/shapes_world.md fixes the canvas, the object count, sizes, colours, gaps and the
language, but leaves free how a program lays the objects out and draws them (how deep
a star's notches are, whether a triangle fills its box, anti-aliased edges, noise per
channel or over the objects too). A model trained only on :mod:`click4caption.shapes.world`
learns its habits; scenes drawn by another program that follows the page must be
described as well. :func:`draw_varied_scene` draws a scene as ``world`` does (same
attributes and sizes, same language), then may lay the objects out differently
(packed together, or along the borders) and draws them in a style drawn per scene.
Every scene still obeys the page (``tests/test_shapes_world.py`` checks it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

from click4caption.shapes.world import (
    BORDER_MARGIN,
    MIN_GAP,
    PLACEMENT_TRIES,
    Scene,
    ShapeObject,
    render_scene,
    sample_scene,
)

#: layout -> probability; "world" keeps world's uniform random placement
LAYOUTS: dict[str, float] = {"world": 0.4, "packed": 0.3, "borders": 0.3}


@dataclass(frozen=True)
class Style:
    """How one scene's shapes are drawn."""

    star_inner: float = 0.4  # inner / outer radius
    equilateral: bool = False  # triangle: equilateral (centred) instead of filling its box
    cross_arm: float = 1 / 3  # arm width / side
    supersample: int = 1  # draw k times larger, then shrink (anti-aliased edges)
    channel_noise: bool = False  # independent noise per channel (else one gray value)
    noise_over_objects: bool = False  # noise on the objects too (else on the background only)


def draw_style(rng: np.random.Generator) -> Style:
    return Style(
        star_inner=float(rng.uniform(0.35, 0.55)),
        equilateral=bool(rng.random() < 0.5),
        cross_arm=float(rng.uniform(0.26, 0.40)),
        supersample=int(rng.choice([1, 2, 3])),
        channel_noise=bool(rng.random() < 0.5),
        noise_over_objects=bool(rng.random() < 0.5),
    )


# ----------------------------------------------------------------------------- layouts
def _apart(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    (ax, ay, aside), (bx, by, bside) = a, b
    return ax + aside + MIN_GAP <= bx or bx + bside + MIN_GAP <= ax or ay + aside + MIN_GAP <= by or by + bside + MIN_GAP <= ay


def _candidate(rng: np.random.Generator, layout: str, side: int, width: int, height: int,
               placed: list[tuple[int, int, int]]) -> tuple[int, int]:
    hi_x, hi_y = width - BORDER_MARGIN - side, height - BORDER_MARGIN - side
    if layout == "packed" and placed:  # next to an object already placed, a few px away
        x0, y0, s0 = placed[int(rng.integers(len(placed)))]
        gap = MIN_GAP + int(rng.integers(0, 9))
        side_of = int(rng.integers(4))
        offset = int(rng.integers(-side + 1, s0))
        x, y = [(x0 - side - gap, y0 + offset), (x0 + s0 + gap, y0 + offset),
                (x0 + offset, y0 - side - gap), (x0 + offset, y0 + s0 + gap)][side_of]
    elif layout == "borders":
        x = BORDER_MARGIN + round(float(rng.beta(0.4, 0.4)) * (hi_x - BORDER_MARGIN))
        y = BORDER_MARGIN + round(float(rng.beta(0.4, 0.4)) * (hi_y - BORDER_MARGIN))
    else:
        x, y = int(rng.integers(BORDER_MARGIN, hi_x + 1)), int(rng.integers(BORDER_MARGIN, hi_y + 1))
    return int(x), int(y)


def relayout(scene: Scene, rng: np.random.Generator, layout: str) -> Scene:
    """The same objects placed by ``layout``; the scene as it was when they do not all fit."""
    if layout == "world":
        return scene
    objects = sorted(scene.objects, key=lambda o: -o.box[2])
    placed: list[tuple[int, int, int]] = []
    for obj in objects:
        side = obj.box[2]
        for _ in range(PLACEMENT_TRIES):
            x, y = _candidate(rng, layout, side, scene.width, scene.height, placed)
            inside = (BORDER_MARGIN <= x <= scene.width - BORDER_MARGIN - side
                      and BORDER_MARGIN <= y <= scene.height - BORDER_MARGIN - side)
            if inside and all(_apart((x, y, side), p) for p in placed):
                placed.append((x, y, side))
                break
        else:
            return scene
    moved = [replace(o, box=(x, y, side, side)) for o, (x, y, side) in zip(objects, placed, strict=True)]
    return replace(scene, objects=moved)


# ----------------------------------------------------------------------------- drawing
def _star(cx: float, cy: float, outer: float, inner_ratio: float) -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        radius = outer if k % 2 == 0 else outer * inner_ratio
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def _draw(draw: ImageDraw.ImageDraw, obj: ShapeObject, style: Style, k: int, fill: int | tuple[int, ...]) -> None:
    x, y, side, _ = obj.box
    x, y, s = x * k, y * k, side * k
    x2, y2 = x + s - 1, y + s - 1
    if obj.shape == "circle":
        draw.ellipse((x, y, x2, y2), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x, y, x2, y2), fill=fill)
    elif obj.shape == "triangle":
        if style.equilateral:
            h = (s - 1) * math.sqrt(3) / 2
            top = y + (s - 1 - h) / 2
            draw.polygon([(x + (s - 1) / 2, top), (x2, top + h), (x, top + h)], fill=fill)
        else:
            draw.polygon([(x + (s - 1) / 2, y), (x2, y2), (x, y2)], fill=fill)
    elif obj.shape == "star":
        draw.polygon(_star(x + (s - 1) / 2, y + (s - 1) / 2, (s - 1) / 2, style.star_inner), fill=fill)
    elif obj.shape == "cross":
        arm = max(1, round(s * style.cross_arm))
        a0 = (s - arm) // 2
        draw.rectangle((x + a0, y, x + a0 + arm - 1, y2), fill=fill)
        draw.rectangle((x, y + a0, x2, y + a0 + arm - 1), fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def render_styled(scene: Scene, style: Style, rng: np.random.Generator) -> Image.Image:
    """Draw ``scene`` in ``style``: shapes (maybe supersampled), then the noise."""
    k = style.supersample
    size = (scene.width * k, scene.height * k)
    image = Image.new("RGB", size, (scene.background,) * 3)
    mask = Image.new("L", size, 0)
    draw, draw_mask = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    for obj in scene.objects:
        _draw(draw, obj, style, k, obj.rgb)
        _draw(draw_mask, obj, style, k, 255)
    if k > 1:
        image = image.resize((scene.width, scene.height), Image.Resampling.BOX)
        mask = mask.resize((scene.width, scene.height), Image.Resampling.BOX)
    pixels = np.asarray(image).astype(np.float64)
    channels = 3 if style.channel_noise else 1
    noise = rng.normal(0.0, scene.noise_std, size=(scene.height, scene.width, channels))
    if not style.noise_over_objects:
        noise = noise * (1.0 - np.asarray(mask, dtype=np.float64)[..., None] / 255.0)
    return Image.fromarray(np.clip(np.rint(pixels + noise), 0, 255).astype(np.uint8), mode="RGB")


def draw_varied_scene(rng: np.random.Generator, num_objects: int | None = None,
                      variety: float = 1.0) -> tuple[Image.Image, Scene]:
    """A scene as :func:`click4caption.shapes.world.draw_scene` samples it; with probability
    ``variety`` laid out and drawn in a style drawn for it, else drawn as ``world`` draws."""
    scene = sample_scene(rng, num_objects)
    if rng.random() >= variety:
        return render_scene(scene, rng), scene
    names = list(LAYOUTS)
    layout = names[int(rng.choice(len(names), p=list(LAYOUTS.values())))]
    scene = relayout(scene, rng, layout)
    return render_styled(scene, draw_style(rng), rng), scene
