"""Write a shapes-world dataset: ``python -m click4caption.shapes --out DIR --seed S --vg N ...``.

Optionally also writes evaluation items (``--eval N``: ``<out>/eval/items.json`` and
their PNG images, from a stream no training part uses) and the shapes tokenizer
(``--tokenizer``: ``<out>/tokenizer/``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from click4caption.shapes.scoring import make_eval_items
from click4caption.shapes.tokenizer import build_shapes_tokenizer
from click4caption.shapes.writers import InstructMix, write_shapes_dataset

OUTPUT_DIRS = {"vg": "VisualGenome", "laion": "LAION", "instruct": "region_instruct", "eval": "eval"}


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m click4caption.shapes", description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of every part's random stream")
    parser.add_argument("--vg", type=_count, default=0, help="Visual Genome images")
    parser.add_argument("--laion", type=_count, default=0, help="LAION webdataset images")
    parser.add_argument("--instruct", type=_count, default=0, help="region-instruction images")
    parser.add_argument("--eval", type=_count, default=0, help="evaluation scenes (items.json)")
    parser.add_argument("--tokenizer", action="store_true", help="also save the shapes tokenizer")
    parser.add_argument("--shard-size", type=_positive, default=500, help="samples per LAION shard")
    parser.add_argument("--turns", type=_positive, default=1,
                        help="most question turns bringing regions per instruct record (records get 1..N)")
    parser.add_argument("--pair-couples", type=_count, default=1, help="Yes/No couples per pair kind and image")
    parser.add_argument("--followups", type=float, default=0.0,
                        help="expected text-only follow-up questions after each turn about objects")
    parser.add_argument("--objects", type=_positive, default=None, help="force the object count of every scene")
    parser.add_argument("--overwrite", action="store_true", help="write into existing part folders")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    counts = {"vg": args.vg, "laion": args.laion, "instruct": args.instruct, "eval": args.eval}
    if not any(counts.values()) and not args.tokenizer:
        build_parser().error("nothing to write: give --vg, --laion, --instruct, --eval or --tokenizer")
    existing = [
        str(args.out / OUTPUT_DIRS[part]) for part, n in counts.items() if n and (args.out / OUTPUT_DIRS[part]).exists()
    ]
    if existing and not args.overwrite:
        build_parser().error(f"already exists: {', '.join(existing)} (use --overwrite or another --out)")

    summary = write_shapes_dataset(
        args.out,
        {part: counts[part] for part in ("vg", "laion", "instruct")},
        args.seed,
        laion_shard_size=args.shard_size,
        mix=InstructMix(same_color=args.pair_couples, same_shape=args.pair_couples, turns_per_record=args.turns,
                        followups=args.followups),
        num_objects=args.objects,
        progress=not args.no_progress,
    )
    parts = []
    if "vg" in summary:
        parts.append(f"vg {summary['vg']['images']} images / {summary['vg']['regions']} regions")
    if "laion" in summary:
        parts.append(f"laion {summary['laion']['images']} images / {summary['laion']['shards']} shards")
    if "instruct" in summary:
        parts.append(f"instruct {summary['instruct']['images']} images / {summary['instruct']['records']} records")
    if args.eval:
        eval_dir = args.out / OUTPUT_DIRS["eval"]
        items = make_eval_items(args.seed, args.eval, eval_dir / "images")
        (eval_dir / "items.json").write_text(json.dumps(items), encoding="utf-8")
        parts.append(f"eval {args.eval} scenes / {len(items)} items")
    if args.tokenizer:
        tokenizer = build_shapes_tokenizer(args.out / "tokenizer")
        parts.append(f"tokenizer {len(tokenizer)} tokens")
    print(f"shapes world (seed {args.seed}) -> {args.out}: " + "; ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
