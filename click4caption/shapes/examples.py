"""The example scenes shipped in ``assets/examples/``: shapes-world scenes saved as PNG
files, each with a JSON sidecar naming its objects and their boxes.

Written and read here, in one place, so that the sidecar format has one home; the demo
shows them, the tests check that the shipped files are what the generator draws.
Regenerate them with::

    python -c "from click4caption.shapes.examples import write_example_scenes; write_example_scenes()"
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from click4caption.paths import EXAMPLES_DIR
from click4caption.shapes.world import draw_scene, region_description, whole_image_caption

logger = logging.getLogger(__name__)

EXAMPLE_SEED = 2024
NUM_EXAMPLES = 5
#: scenes with fewer objects, or noisier backgrounds (large PNGs), are skipped
MIN_OBJECTS = 3
MAX_NOISE_STD = 2.5


@dataclass
class ExampleScene:
    """One shipped example: the PNG and its objects (boxes ``(x, y, w, h)`` and ``box_xyxy``)."""

    path: Path
    objects: list[dict[str, Any]]
    caption: str = ""

    @property
    def name(self) -> str:
        return self.path.name


def example_scene_records(seed: int = EXAMPLE_SEED, count: int = NUM_EXAMPLES
                          ) -> list[tuple[Image.Image, dict[str, Any]]]:
    """Draw the example scenes: ``count`` shapes-world scenes with at least
    :data:`MIN_OBJECTS` objects and little background noise (small PNGs), from one
    seeded generator. Each comes with its sidecar record."""
    rng = np.random.default_rng(seed)
    out: list[tuple[Image.Image, dict[str, Any]]] = []
    while len(out) < count:
        image, scene = draw_scene(rng)
        if len(scene.objects) < MIN_OBJECTS or scene.noise_std > MAX_NOISE_STD:
            continue
        record = {
            "image": f"scene_{len(out) + 1}.png",
            "width": scene.width,
            "height": scene.height,
            "seed": seed,
            "caption": whole_image_caption(scene),
            "objects": [{"shape": o.shape, "color": o.color, "size": o.size, "box": list(o.box),
                         "box_xyxy": o.box_xyxy, "description": region_description(o)} for o in scene.objects],
        }
        out.append((image, record))
    return out


def sidecar_text(record: dict[str, Any]) -> str:
    """JSON with one line per field and per object (small, and easy to read in a diff)."""
    fields = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in record.items() if k != "objects"]
    objects = ",\n".join("  " + json.dumps(o) for o in record["objects"])
    return "{\n" + ",\n".join(fields) + ',\n "objects": [\n' + objects + "\n ]\n}\n"


def write_example_scenes(out_dir: str | Path = EXAMPLES_DIR, seed: int = EXAMPLE_SEED,
                         count: int = NUM_EXAMPLES) -> list[Path]:
    """Write ``scene_N.png`` + ``scene_N.json`` into ``out_dir``; returns the PNG paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for image, record in example_scene_records(seed, count):
        png = out / record["image"]
        image.save(png, optimize=True)
        png.with_suffix(".json").write_text(sidecar_text(record), encoding="utf-8")
        paths.append(png)
    logger.info("wrote %d example scenes to %s", len(paths), out)
    return paths


def load_example_scenes(folder: str | Path = EXAMPLES_DIR) -> list[ExampleScene]:
    """The ``*.png`` of ``folder`` (sorted), with their sidecars where present; an
    unreadable sidecar is logged and the scene kept without objects (an example is still
    worth showing)."""
    folder = Path(folder)
    scenes = []
    for png in sorted(folder.glob("*.png")):
        sidecar = png.with_suffix(".json")
        record: dict[str, Any] = {}
        if sidecar.is_file():
            try:
                record = json.loads(sidecar.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as err:
                logger.warning("ignoring the unreadable sidecar %s: %s", sidecar, err)
        scenes.append(ExampleScene(png, list(record.get("objects", [])), record.get("caption", "")))
    if not scenes:
        logger.warning("no example scenes in %s", folder)
    return scenes
