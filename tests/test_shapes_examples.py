"""The example scenes shipped in assets/examples/ (click4caption.shapes.examples):
they are what the seeded generator draws, and they round-trip through their sidecars."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from click4caption.paths import EXAMPLES_DIR
from click4caption.shapes.examples import example_scene_records, load_example_scenes, write_example_scenes


def test_shipped_examples_match_the_generator():
    shipped = load_example_scenes(EXAMPLES_DIR)
    assert [s.name for s in shipped] == [f"scene_{i}.png" for i in range(1, 6)]
    for (image, record), scene in zip(example_scene_records(), shipped):
        on_disk = json.loads(scene.path.with_suffix(".json").read_text())
        assert on_disk == record
        with Image.open(scene.path) as png:
            assert np.array_equal(np.asarray(png.convert("RGB")), np.asarray(image))
        assert len(scene.objects) >= 3 and scene.caption == record["caption"]
        for obj in scene.objects:
            x, y, w, h = obj["box"]
            assert obj["box_xyxy"] == [x, y, x + w, y + h]
            assert 0 <= x and x + w <= record["width"] and 0 <= y and y + h <= record["height"]
    assert sum(p.stat().st_size for p in EXAMPLES_DIR.iterdir()) < 400_000


def test_written_sidecars_are_the_shipped_bytes(tmp_path: Path):
    """Regenerating the shipped scenes changes no byte of the sidecars (one line per field)."""
    write_example_scenes(tmp_path)
    for sidecar in sorted(EXAMPLES_DIR.glob("*.json")):
        assert (tmp_path / sidecar.name).read_bytes() == sidecar.read_bytes(), sidecar.name


def test_write_and_load_example_scenes(tmp_path: Path):
    paths = write_example_scenes(tmp_path, seed=7, count=2)
    scenes = load_example_scenes(tmp_path)
    assert [s.path for s in scenes] == paths and all(s.objects for s in scenes)
    (tmp_path / "scene_2.json").write_text("{broken")
    assert load_example_scenes(tmp_path)[1].objects == []
    assert load_example_scenes(tmp_path / "missing") == []
