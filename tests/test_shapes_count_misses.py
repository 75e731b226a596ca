"""benchmarks/shapes_count_misses.py: the whole-image count split by true count, layout,
objects near a grid line, shared cells, small objects and the nearest boxes' gap, on
hand-made items and answers."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "shapes_count_misses.py"
spec = importlib.util.spec_from_file_location("shapes_count_misses", SCRIPT)
assert spec is not None and spec.loader is not None
misses = importlib.util.module_from_spec(spec)
spec.loader.exec_module(misses)


def whole(scene: int, centres: list[tuple[int, int]], small: int = 0) -> dict[str, Any]:
    """A whole-image item of a 224 x 224 image: objects of side 10 around ``centres``,
    the first ``small`` of them small, the others large."""
    objects = [{"box": [x - 5, y - 5, 10, 10], "size": "small" if k < small else "large"}
               for k, (x, y) in enumerate(centres)]
    return {"boxes": [[0, 0, 224, 224]], "meta": {"kind": "whole", "scene": scene, "count": len(objects),
                                                  "objects": objects}}


def test_the_count_splits_by_layout_lines_and_shared_cells() -> None:
    """Cells of 56 px. Scene 0 (layout grid): two objects mid-cell, counted right. Scene 1
    (corners): one centre 1 px off the line x = 56, two in cell (1, 1); said "Two": too few.
    Scene 2 (cluster): four objects, the first count word "five": too many. Scene 3 (row):
    no count word: too few. A single-region item is not a whole-image one and is skipped."""
    items = [whole(0, [(28, 28), (84, 28)]), whole(1, [(57, 28), (70, 100), (90, 80)], small=2),
             whole(2, [(28, 28), (84, 28), (140, 28), (196, 28)], small=4), whole(3, [(28, 28), (84, 84)]),
             {"boxes": [[0, 0, 10, 10]], "meta": {"kind": "color", "scene": 0, "count": 2, "objects": []}}]
    answers = ["two shapes: a small red circle and a large blue star", "Two shapes: a red circle and a star",
               "I see five shapes, four of them small", "Shapes.", "Red."]
    table = misses.tally(items, [{"answer": a} for a in answers], "heldout", 4, 0.1)
    got = {key: (c["scenes"], c["right"], c["under"], c["over"]) for key, c in table.items()}
    assert got[("all", "")] == (4, 1, 2, 1)
    assert {k[1]: v for k, v in got.items() if k[0] == "layout"} == {
        "grid": (1, 1, 0, 0), "corners": (1, 0, 1, 0), "cluster": (1, 0, 0, 1), "row": (1, 0, 1, 0)}
    assert {k[1]: v for k, v in got.items() if k[0] == "centres within 0.1 cell of a line"} == {
        0: (3, 1, 1, 1), 1: (1, 0, 1, 0)}
    assert {k[1]: v for k, v in got.items() if k[0] == "most centres in one cell"} == {
        1: (3, 1, 1, 1), 2: (1, 0, 1, 0)}
    assert {k[1]: v[0] for k, v in got.items() if k[0] == "true count"} == {2: 2, 3: 1, 4: 1}
    assert {k[1]: v for k, v in got.items() if k[0] == "count / small objects"} == {
        "2 / 0": (2, 1, 1, 0), "3 / 2": (1, 0, 1, 0), "4 / 4": (1, 0, 0, 1)}
    # the training generator's scenes have no layout split
    assert not any(k[0] == "layout" for k in misses.tally(items, [{"answer": a} for a in answers], "shapes", 4, 0.1))


def test_a_missing_results_file_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    assert misses.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no ") and "\n" not in err


def test_the_count_splits_by_the_nearest_boxes_gap_in_patches() -> None:
    """Boxes of side 10 px, patches of 16 px: scene 1's second and third boxes are 10 px apart
    on both axes (under one patch); the other scenes' nearest boxes are 46 px apart."""
    items = [whole(0, [(28, 28), (84, 28)]), whole(1, [(57, 28), (70, 100), (90, 80)], small=2),
             whole(2, [(28, 28), (84, 28), (140, 28), (196, 28)], small=4), whole(3, [(28, 28), (84, 84)])]
    answers = ["two shapes", "Two shapes", "five shapes", "Shapes."]
    table = misses.tally(items, [{"answer": a} for a in answers], "heldout", 4, 0.1)
    got = {k[1]: (c["scenes"], c["right"], c["under"], c["over"]) for k, c in table.items()
           if k[0] == "nearest boxes' gap, patches"}
    assert got == {"< 1": (1, 0, 1, 0), ">= 2": (3, 1, 1, 1)}


def test_nearest_gap_is_the_larger_axis_gap_of_the_closest_pair() -> None:
    import torch

    def boxes(*xyxy: tuple[float, float, float, float]) -> torch.Tensor:
        return torch.tensor([[[x0, y0], [x1, y1]] for x0, y0, x1, y1 in xyxy])

    # 20 px apart on x, overlapping on y: 1.25 patches; a third box far away
    assert misses.nearest_gap(boxes((0, 0, 10, 10), (30, 5, 40, 15), (150, 150, 160, 160)), 16.0) == "1-2"
    # diagonal neighbours 10 px apart on x and 40 px on y: the larger, 2.5 patches
    assert misses.nearest_gap(boxes((0, 0, 10, 10), (20, 50, 30, 60)), 16.0) == ">= 2"
    # overlapping boxes: gap 0
    assert misses.nearest_gap(boxes((0, 0, 20, 20), (10, 10, 30, 30)), 16.0) == "< 1"
    assert misses.nearest_gap(boxes((0, 0, 10, 10)), 16.0) == "one object"


def test_the_default_patch_is_the_shipped_configs_patch_at_224_px() -> None:
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(SCRIPT.parents[1] / "train_configs" / "shapes_train.yaml")
    assert misses.PATCH == cfg.model.vit.patch_size * 224 / cfg.model.image_size
