"""Where the shapes model's whole-image count goes wrong, from one evaluation's answers.

``python evaluate.py shapes --generator heldout --scenes 200 --out DIR`` then
``python benchmarks/shapes_count_misses.py DIR --generator heldout --scenes 200`` draws the
same scenes again (same seed, generator and number: the items are deterministic), reads the
answers in ``DIR/results.jsonl`` and splits the whole-image descriptions (count word right,
too few or none, too many) by:

- the true count;
- the held-out generator's layout (scene k is drawn with layout k mod 4);
- how many objects have their centre within ``--band`` cells (default 0.1) of an inner
  line of the g x g grid of ``box_attention_grid`` (where the rule "the query of the cell
  holding the centre owns the object" flips);
- the most centres in one cell (a cell's second object must be claimed by a neighbour);
- the true count and how many of the objects are small;
- the gap between the two nearest objects' boxes, in ViT patches (``--patch`` model pixels
  of a 224-px input): under one patch, two objects can share a patch or touch neighbouring
  ones.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: the shipped model's ViT patch side in pixels of a 224-px input (``vit.patch_size`` of
#: ``train_configs/shapes_train.yaml``, whose ``image_size`` is 224)
PATCH = 16.0


def most_in_one_cell(corners: "torch.Tensor", grid: int, image_size: int) -> int:
    """``Mx2x2`` object corners in model pixels -> the most centres that fall in one cell."""
    cells = ((corners[:, 0] + corners[:, 1]) / 2 / image_size * grid).floor().clamp(0, grid - 1)
    return max(Counter(map(tuple, cells.tolist())).values())


def nearest_gap(corners: "torch.Tensor", patch: float) -> str:
    """``Mx2x2`` object corners in model pixels -> the gap between the two nearest boxes in
    patches of ``patch`` pixels (the larger of the x and y gaps, 0 where they overlap),
    as ``"< 1"``, ``"1-2"`` or ``">= 2"``; ``"one object"`` when there is only one."""
    if corners.shape[0] < 2:
        return "one object"
    lo, hi = corners[:, 0].float(), corners[:, 1].float()  # Mx2
    gaps = (lo[:, None] - hi[None, :]).clamp(min=0)  # MxMx2: how far box i starts after box j ends
    gap = (gaps + gaps.transpose(0, 1)).amax(-1)  # MxM: per axis one of the two is 0
    gap.fill_diagonal_(float("inf"))
    g = float(gap.min()) / patch
    return "< 1" if g < 1 else "1-2" if g < 2 else ">= 2"


def tally(items: list[dict[str, Any]], results: list[dict[str, Any]], generator: str, grid: int,
          band: float, patch: float = PATCH) -> dict[tuple[str, Any], Counter]:
    """``(split, value) -> Counter(scenes, right, under, over)`` over the whole-image items."""
    from click4caption.shapes.heldout import LAYOUTS
    from click4caption.shapes.owners import border_distance, object_corners
    from click4caption.shapes.scoring import said_count

    size = 224  # distances are read in cells, and gaps in patches of a 224-px input

    table: dict[tuple[str, Any], Counter] = {}
    for item, result in zip(items, results, strict=True):
        meta = item["meta"]
        if meta["kind"] != "whole":
            continue
        said = said_count(result["answer"])  # as the recipe's table scores it; None: no count word
        outcome = "right" if said == meta["count"] else "under" if said is None or said < meta["count"] else "over"
        corners = object_corners(meta["objects"], item["boxes"][0][2], item["boxes"][0][3], size)
        near = int((border_distance(corners, grid, size) < band).sum())
        keys: list[tuple[str, Any]] = [("all", ""), ("true count", meta["count"]),
                                       (f"centres within {band} cell of a line", near),
                                       ("most centres in one cell", most_in_one_cell(corners, grid, size)),
                                       ("count / small objects",
                                        f"{meta['count']} / {sum(o['size'] == 'small' for o in meta['objects'])}"),
                                       ("nearest boxes' gap, patches", nearest_gap(corners, patch))]
        if generator == "heldout":
            keys.append(("layout", LAYOUTS[meta["scene"] % len(LAYOUTS)]))
        for key in keys:
            table.setdefault(key, Counter()).update(["scenes", outcome])
    return table


def main(argv: list[str] | None = None) -> int:
    from click4caption.shapes.evaluation import DEFAULT_EVAL_SEED, GENERATORS, make_items

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", help="the --out folder of `evaluate.py shapes`")
    p.add_argument("--generator", choices=GENERATORS, default="shapes")
    p.add_argument("--seed", type=int, default=DEFAULT_EVAL_SEED)
    p.add_argument("--scenes", type=int, default=200)
    p.add_argument("--grid", type=int, default=4, help="g of the g x g grid (box_attention_grid)")
    p.add_argument("--band", type=float, default=0.1, help="cells from a grid line that count as near it")
    p.add_argument("--patch", type=float, default=PATCH, help="ViT patch side in pixels of a 224-px input")
    args = p.parse_args(argv)
    results_file = Path(args.results) / "results.jsonl"
    if not results_file.is_file():
        print(f"error: no {results_file} (run `python evaluate.py shapes --out {args.results}` first)", file=sys.stderr)
        return 2
    results = [json.loads(line) for line in results_file.read_text().splitlines() if line.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        items = make_items(args.generator, args.seed, args.scenes, Path(tmp))
    if len(items) != len(results) or any(i["question"] != r["question"] for i, r in zip(items, results)):
        print(f"error: {results_file} does not hold the items of --generator {args.generator} --seed {args.seed} "
              f"--scenes {args.scenes}", file=sys.stderr)
        return 2
    table = tally(items, results, args.generator, args.grid, args.band, args.patch)
    print(f"whole-image count, {args.generator} generator, seed {args.seed}, {args.grid} x {args.grid} cells")
    print("| scenes by | value | scenes | count right | too few | too many |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (split, value), c in sorted(table.items(), key=lambda kv: (kv[0][0] != "all", kv[0][0], str(kv[0][1]))):
        print(f"| {split} | {value} | {c['scenes']} | {100 * c['right'] / c['scenes']:.1f} % | {c['under']} | {c['over']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
