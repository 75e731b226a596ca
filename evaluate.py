"""Evaluate a model.

``python evaluate.py shapes [--cfg-path CFG] [--seed 20261128] [--scenes 100]`` draws
fresh shapes scenes (a seed never used in training), asks every question through the
same code path as ``inference.py --batch_file`` (``Captioner.run_item``) and the
follow-up conversations through the Python API the demo uses (``Captioner.ask`` with a
shared conversation), and prints the table of design/shapes_world.md plus the
follow-up row. ``--generator heldout`` draws the scenes with another program that
follows the spec (click4caption/shapes/heldout.py). Without ``--cfg-path`` the shipped
model is used.
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

from click4caption.captioner import Captioner, GenerationSettings
from click4caption.cli import default_config_path, pick_device, run_main, seed_everything, setup_logging
from click4caption.config import load_config
from click4caption.shapes.evaluation import DEFAULT_EVAL_SEED, GENERATORS, evaluate_shapes

logger = logging.getLogger("click4caption.evaluate")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Evaluate Click4Caption.")
    sub = p.add_subparsers(dest="suite", required=True)
    s = sub.add_parser("shapes", help="accuracy table on fresh shapes-world scenes")
    s.add_argument("--cfg-path", default=None, help="eval config (default: the shipped shapes model)")
    s.add_argument("--options", nargs="+", default=None)
    s.add_argument("--device", default=None)
    s.add_argument("--gpu-id", type=int, default=None)
    s.add_argument("--seed", type=int, default=DEFAULT_EVAL_SEED, help="scene seed (never used in training)")
    s.add_argument("--scenes", type=int, default=100, help="scenes to draw (7 questions each)")
    s.add_argument("--out", default=None, help="folder for images, the batch file and results (default: a temp dir)")
    s.add_argument("--max_new_tokens", type=int, default=60)
    s.add_argument("--generator", choices=GENERATORS, default="shapes",
                   help="scene generator: the training data's (shapes) or another one following the spec (heldout)")
    s.add_argument("--no-followups", action="store_true", help="skip the follow-up conversations")
    s.add_argument("--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    seed_everything(0)
    from click4caption.shapes.scoring import format_table

    cfg = load_config(args.cfg_path or default_config_path(), args.options)
    device = pick_device(args.device, args.gpu_id)
    captioner = Captioner.from_config(cfg, device=device, settings=GenerationSettings(max_new_tokens=args.max_new_tokens))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        scores = evaluate_shapes(captioner, args.seed, args.scenes, out, not args.no_followups, args.generator)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            scores = evaluate_shapes(captioner, args.seed, args.scenes, Path(tmp), not args.no_followups,
                                     args.generator)
    print(format_table(scores))
    if args.out:
        (Path(args.out) / "scores.json").write_text(json.dumps(scores, indent=2))
    return 0 if all(s["passed"] for s in scores.values()) else 1


if __name__ == "__main__":
    run_main(main)
