"""Learning curves: score a training run's checkpoints on fresh shapes scenes.

``python -m click4caption_apps.shapes_curves runs/shapes --scenes 50`` scores every
``checkpoint_iter*.pth`` of the run (or the files given) with
:func:`click4caption.shapes.evaluation.evaluate_shapes`, one row per checkpoint (the
seven rows of design/shapes_world.md plus the follow-up row), and writes them to
``<run>/curves.json``. A checkpoint carries its resolved config, so nothing else is
needed but the LLM folder (tokenizer) that config names.
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from click4caption_apps.cli import run_main, setup_logging
from click4caption.shapes.evaluation import DEFAULT_EVAL_SEED, GENERATORS, evaluate_shapes
from click4caption.shapes.scoring import KINDS

logger = logging.getLogger("click4caption.shapes_curves")  # not __name__: "__main__" under -m, not shown

SHORT = {"describe": "describe", "color": "colour", "shape": "shape", "size": "size", "same_color": "same colour",
         "same_shape": "same shape", "whole": "count", "followup": "follow-up"}


def load_captioner(checkpoint: Path, llm_dir: str | None = None, device: str = "cpu") -> Any:
    """A :class:`~click4caption.captioner.Captioner` on a trainer checkpoint."""
    from click4caption.captioner import Captioner
    from click4caption.generation import GenerationSettings
    from click4caption.config import from_dict
    from click4caption.models.builder import build_model
    from click4caption.processors import Blip2ImageEvalProcessor
    from click4caption.training.checkpointing import load_checkpoint, load_trainable_state_dict
    from click4caption.training.freezing import frozen_parts

    ckpt = load_checkpoint(checkpoint)
    cfg = from_dict(ckpt["config"])
    if llm_dir:
        cfg.model.llama_model = llm_dir
    model = build_model(cfg.model, device, for_training=True)
    model.freeze(frozen_parts(cfg.model))  # what the trainer trained (and saved)
    load_trainable_state_dict(model, ckpt["model"], str(checkpoint))
    model.eval()
    settings = GenerationSettings(max_new_tokens=60)
    return Captioner(model, Blip2ImageEvalProcessor(cfg.model.image_size), device, settings), int(ckpt["iteration"])


def row(iteration: int, scores: dict[str, dict[str, Any]]) -> str:
    return f"| {iteration:,} | " + " | ".join(
        f"{100 * scores[k]['value']:.1f}" if k in scores else "" for k in KINDS) + " |"


def header() -> str:
    return "| iterations | " + " | ".join(SHORT[k] for k in KINDS) + " |\n|" + " --- |" * (len(KINDS) + 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="+", help="a run folder (all its checkpoint_iter*.pth) or checkpoint files")
    p.add_argument("--scenes", type=int, default=50)
    p.add_argument("--seed", type=int, default=DEFAULT_EVAL_SEED)
    p.add_argument("--generator", choices=GENERATORS, default="shapes")
    p.add_argument("--every", type=int, default=1, help="score every N-th checkpoint of a folder (and the last)")
    p.add_argument("--llm-dir", default=None, help="the LLM folder (default: the one the checkpoint's config names)")
    p.add_argument("--out", default=None, help="JSON file for the rows (default: <run>/curves[-heldout].json)")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    files: list[Path] = []
    for path in map(Path, args.paths):
        if path.is_dir():
            found = sorted(path.glob("checkpoint_iter*.pth"))
            files += [f for k, f in enumerate(found) if k % args.every == args.every - 1 or k == len(found) - 1]
        else:
            files.append(path)
    first = Path(args.paths[0])
    suffix = "" if args.generator == "shapes" else f"-{args.generator}"
    out = Path(args.out) if args.out else (first if first.is_dir() else first.parent) / f"curves{suffix}.json"
    rows: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    print(header(), flush=True)
    for f in files:
        captioner, iteration = load_captioner(f, args.llm_dir)
        with tempfile.TemporaryDirectory() as tmp:
            scores = evaluate_shapes(captioner, args.seed, args.scenes, Path(tmp), generator=args.generator)
        rows[str(iteration)] = {"checkpoint": str(f), "scenes": args.scenes, "seed": args.seed,
                                "generator": args.generator, "scores": scores}
        out.write_text(json.dumps(rows, indent=1))
        print(row(iteration, scores), flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)



