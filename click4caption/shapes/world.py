"""The shapes world: a pure scene generator and its language (design/shapes_world.md).

Everything here is a function of a ``numpy.random.Generator``; nothing touches the
disk. Boxes are in original-image pixels, ``(x, y, w, h)`` as Visual Genome writes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from click4caption.prompts import DESCRIBE_QUESTION, IMG_TOKEN

# ----------------------------------------------------------------------------- constants
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
#: Box side as a fraction of min(W, H), inclusive range per size word.
SIZES: dict[str, tuple[float, float]] = {"small": (0.18, 0.26), "large": (0.34, 0.46)}
#: The spec's count words start at "two"; "one" covers forced single-object scenes.
COUNT_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}

CANVAS_RANGE = (192, 320)  # width and height, each uniform, inclusive
GRAY_RANGE = (100, 160)  # background gray level, inclusive
MAX_NOISE_STD = 8.0  # background noise std is uniform in [0, MAX_NOISE_STD]
COLOR_JITTER = 15  # per channel, uniform integer in [-15, 15]
OBJECT_COUNT_RANGE = (2, 5)  # inclusive
MIN_GAP = 4  # px between two object boxes
BORDER_MARGIN = 2  # px between a box and the canvas border
PLACEMENT_TRIES = 100  # random positions tried per object before giving it up
LAYOUT_TRIES = 10  # whole layouts tried when some object finds no spot
CROSS_ARM_FRACTION = 1 / 3
STAR_INNER_RATIO = 0.4  # inner / outer radius of the 5-pointed star

# ----------------------------------------------------------------------------- questions
QUESTION_COLOR = "What color is it?"
QUESTION_SHAPE = "What shape is it?"
QUESTION_SIZE = "Is it large or small?"
QUESTION_DESCRIBE = DESCRIBE_QUESTION  # the demo's Describe question
QUESTION_SAME_COLOR = "Are they the same color?"
QUESTION_SAME_SHAPE = "Are they the same shape?"
IMG_PLACEHOLDER = IMG_TOKEN

#: Question kind -> question text, for one box and for two boxes.
SINGLE_QUESTIONS: dict[str, str] = {
    "describe": QUESTION_DESCRIBE,
    "color": QUESTION_COLOR,
    "shape": QUESTION_SHAPE,
    "size": QUESTION_SIZE,
}
PAIR_QUESTIONS: dict[str, str] = {"same_color": QUESTION_SAME_COLOR, "same_shape": QUESTION_SAME_SHAPE}


# ----------------------------------------------------------------------------- scene types
@dataclass(frozen=True)
class ShapeObject:
    """One filled shape. ``box`` is ``(x, y, w, h)`` in original pixels, with ``w == h``."""

    shape: str
    color: str
    size: str
    box: tuple[int, int, int, int]
    rgb: tuple[int, int, int]  # the jittered colour actually drawn

    @property
    def box_xyxy(self) -> list[int]:
        """``[x1, y1, x2, y2]`` in original pixels (x2 = x + w)."""
        x, y, w, h = self.box
        return [x, y, x + w, y + h]

    @property
    def center(self) -> tuple[float, float]:
        x, y, w, h = self.box
        return (x + w / 2, y + h / 2)


@dataclass
class Scene:
    """A canvas of one gray level (plus noise) holding non-overlapping shapes."""

    width: int
    height: int
    background: int
    noise_std: float = 0.0
    objects: list[ShapeObject] = field(default_factory=list)

    @property
    def whole_box(self) -> list[int]:
        """The whole-image box ``[0, 0, W, H]``."""
        return [0, 0, self.width, self.height]


# ----------------------------------------------------------------------------- sampling
def _side_range(size: str, width: int, height: int) -> tuple[int, int]:
    """Integer box sides allowed for ``size`` (inclusive), so rounding never leaves the range."""
    lo, hi = SIZES[size]
    m = min(width, height)
    return math.ceil(lo * m), math.floor(hi * m)


def _fits(box: tuple[int, int, int, int], placed: list[ShapeObject]) -> bool:
    """True if ``box`` keeps at least MIN_GAP px from every placed box."""
    x, y, w, h = box
    for other in placed:
        ox, oy, ow, oh = other.box
        apart = x + w + MIN_GAP <= ox or ox + ow + MIN_GAP <= x or y + h + MIN_GAP <= oy or oy + oh + MIN_GAP <= y
        if not apart:
            return False
    return True


#: An object drawn but not yet placed: (side, shape, color, size, rgb).
_Drawn = tuple[int, str, str, str, tuple[int, int, int]]


def _place(rng: np.random.Generator, width: int, height: int, drawn: list[_Drawn]) -> list[ShapeObject]:
    """Place ``(side, shape, color, size, rgb)`` objects largest first, dropping those that find no spot."""
    objects: list[ShapeObject] = []
    for side, shape, color, size, rgb in sorted(drawn, key=lambda d: -d[0]):
        for _ in range(PLACEMENT_TRIES):
            x = int(rng.integers(BORDER_MARGIN, width - BORDER_MARGIN - side + 1))
            y = int(rng.integers(BORDER_MARGIN, height - BORDER_MARGIN - side + 1))
            if _fits((x, y, side, side), objects):
                objects.append(ShapeObject(shape, color, size, (x, y, side, side), rgb))
                break
    return objects


def sample_scene(rng: np.random.Generator, num_objects: int | None = None) -> Scene:
    """Sample a scene's layout and attributes (no pixels).

    Args:
        rng: the only source of randomness.
        num_objects: objects to place; None draws uniformly from OBJECT_COUNT_RANGE.
            Objects are placed largest first; one that finds no free spot in
            PLACEMENT_TRIES tries is dropped, and of LAYOUT_TRIES layouts the fullest
            is kept, so a scene may hold fewer (never fewer than one).
    """
    width, height = (int(v) for v in rng.integers(CANVAS_RANGE[0], CANVAS_RANGE[1] + 1, size=2))
    background = int(rng.integers(GRAY_RANGE[0], GRAY_RANGE[1] + 1))
    noise_std = float(rng.uniform(0.0, MAX_NOISE_STD))
    if num_objects is None:
        num_objects = int(rng.integers(OBJECT_COUNT_RANGE[0], OBJECT_COUNT_RANGE[1] + 1))
    if num_objects < 1:
        raise ValueError(f"num_objects must be >= 1, got {num_objects}")

    color_names = list(COLORS)
    drawn: list[_Drawn] = []
    for _ in range(num_objects):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        color = color_names[int(rng.integers(len(color_names)))]
        size = ("small", "large")[int(rng.integers(2))]
        jitter = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3)
        r, g, b = (int(v) for v in np.clip(np.array(COLORS[color]) + jitter, 0, 255))
        lo, hi = _side_range(size, width, height)
        drawn.append((int(rng.integers(lo, hi + 1)), shape, color, size, (r, g, b)))

    objects: list[ShapeObject] = []
    for _ in range(LAYOUT_TRIES):  # keep the fullest layout
        layout = _place(rng, width, height, drawn)
        if len(layout) > len(objects):
            objects = layout
        if len(objects) == num_objects:
            break
    return Scene(width, height, background, noise_std, objects)


# ----------------------------------------------------------------------------- rendering
def _star_points(x: int, y: int, side: int) -> list[tuple[float, float]]:
    """Ten vertices of a 5-pointed star, first point straight up, centred in the box."""
    cx, cy, outer = x + (side - 1) / 2, y + (side - 1) / 2, (side - 1) / 2
    inner = outer * STAR_INNER_RATIO
    points = []
    for k in range(10):
        radius = outer if k % 2 == 0 else inner
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def _draw_object(draw: ImageDraw.ImageDraw, obj: ShapeObject) -> None:
    x, y, side, _ = obj.box
    x2, y2 = x + side - 1, y + side - 1  # PIL's shape coordinates are inclusive
    if obj.shape == "circle":
        draw.ellipse((x, y, x2, y2), fill=obj.rgb)
    elif obj.shape == "square":
        draw.rectangle((x, y, x2, y2), fill=obj.rgb)
    elif obj.shape == "triangle":
        draw.polygon([(x + (side - 1) / 2, y), (x2, y2), (x, y2)], fill=obj.rgb)
    elif obj.shape == "star":
        draw.polygon(_star_points(x, y, side), fill=obj.rgb)
    elif obj.shape == "cross":
        arm = max(1, round(side * CROSS_ARM_FRACTION))
        a0 = (side - arm) // 2
        draw.rectangle((x + a0, y, x + a0 + arm - 1, y2), fill=obj.rgb)
        draw.rectangle((x, y + a0, x2, y + a0 + arm - 1), fill=obj.rgb)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def render_scene(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """Draw ``scene`` as an RGB image; ``rng`` draws the background noise.

    The noise is one value per pixel, shared by the three channels, so the
    background stays gray.
    """
    noise = rng.normal(0.0, scene.noise_std, size=(scene.height, scene.width, 1))
    background = np.clip(np.rint(scene.background + noise), 0, 255).astype(np.uint8)
    image = Image.fromarray(np.repeat(background, 3, axis=2), mode="RGB")
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_object(draw, obj)
    return image


def draw_scene(rng: np.random.Generator, num_objects: int | None = None) -> tuple[Image.Image, Scene]:
    """Sample and render one scene; ``num_objects`` forces the count (e.g. 1 for curricula)."""
    scene = sample_scene(rng, num_objects)
    return render_scene(scene, rng), scene


# ----------------------------------------------------------------------------- language
def region_phrase(obj: ShapeObject) -> str:
    """Visual Genome phrase: ``"a large red circle"``."""
    return f"a {obj.size} {obj.color} {obj.shape}"


def region_description(obj: ShapeObject) -> str:
    """Region caption as the VG loader makes it: ``"A large red circle."``."""
    phrase = region_phrase(obj)
    return phrase[0].upper() + phrase[1:] + "."


def whole_image_caption(scene: Scene) -> str:
    """LAION-style caption, objects left to right by box centre.

    ``"three shapes: a large red circle, a small blue star and a small green square"``.
    The spec's count words start at "two"; a forced one-object scene gives
    ``"one shape: a large red circle"``.
    """
    if not scene.objects:
        raise ValueError("a scene needs at least one object to be captioned")
    ordered = sorted(scene.objects, key=lambda o: (o.center[0], o.center[1]))
    phrases = [region_phrase(o) for o in ordered]
    listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    noun = "shape" if len(phrases) == 1 else "shapes"
    return f"{COUNT_WORDS[len(phrases)]} {noun}: {listed}"


def _one_word(word: str) -> str:
    return word.capitalize() + "."


def single_answer(kind: str, obj: ShapeObject) -> str:
    """Answer to a one-region question: ``color -> "Red."``, ``describe -> "A large red circle."``."""
    if kind == "describe":
        return region_description(obj)
    if kind in ("color", "shape", "size"):
        return _one_word(getattr(obj, kind))
    raise ValueError(f"unknown single-region question kind {kind!r}")


def pair_answer(kind: str, first: ShapeObject, second: ShapeObject) -> str:
    """Answer to a two-region question: ``"Yes."`` or ``"No."``."""
    if kind not in PAIR_QUESTIONS:
        raise ValueError(f"unknown two-region question kind {kind!r}")
    attribute = kind.removeprefix("same_")
    return "Yes." if getattr(first, attribute) == getattr(second, attribute) else "No."


def single_prompt(question: str) -> str:
    """``"image[IMG] What color is it?"``."""
    return f"image{IMG_PLACEHOLDER} {question}"


def pair_prompt(question: str) -> str:
    """``"image 1[IMG] image 2[IMG] Are they the same color?"``."""
    return f"image 1{IMG_PLACEHOLDER} image 2{IMG_PLACEHOLDER} {question}"


def find_pairs(scene: Scene, kind: str, answer: str) -> list[tuple[int, int]]:
    """Ordered pairs ``(i, j)``, ``i != j``, of object indices whose pair answer is ``answer``."""
    objs = scene.objects
    return [
        (i, j)
        for i in range(len(objs))
        for j in range(len(objs))
        if i != j and pair_answer(kind, objs[i], objs[j]) == answer
    ]
