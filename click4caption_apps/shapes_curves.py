"""Learning curves: score a training run's checkpoints on fresh shapes scenes.

``python -m click4caption_apps.shapes_curves runs/shapes --scenes 50`` scores every
``checkpoint_iter*.pth`` of the run (or the files given) with
:func:`click4caption.shapes.evaluation.evaluate_shapes`, one row per checkpoint (the
seven rows of design/shapes_world.md plus the follow-up row), and writes them to
``<run>/curves.json``. A checkpoint carries its resolved config, so nothing else is
needed but the LLM folder (tokenizer) that config names. An exported model (the shipped
``models/shapes/click4caption_shapes.pth``, no config) is read with the shipped eval config.

``--owners`` adds what the queries' "owns an object" channel counts on the same scenes'
whole-image boxes (:mod:`click4caption.shapes.owners`): the Q-Former's count before the
LLM, and where its wrong queries lie. ``--centres`` adds what the image tokens' "an
object's centre lies here" channel counts there (:mod:`click4caption.shapes.centres`, for
models trained with ``object_centre_weight``): the ViT's count before the Q-Former.
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from click4caption_apps.cli import run_main, setup_logging
from click4caption.errors import InputError
from click4caption.shapes.evaluation import DEFAULT_EVAL_SEED, GENERATORS, evaluate_shapes, make_items
from click4caption.shapes.scoring import KINDS

logger = logging.getLogger("click4caption.shapes_curves")  # not __name__: "__main__" under -m, not shown

SHORT = {"describe": "describe", "color": "colour", "shape": "shape", "size": "size", "same_color": "same colour",
         "same_shape": "same shape", "whole": "count", "followup": "follow-up"}


def load_captioner(checkpoint: Path, llm_dir: str | None = None, device: str = "cpu") -> tuple[Any, int | None, Any]:
    """``(Captioner, iteration, model config)`` of a trainer checkpoint, or of an exported
    model (iteration None) with the shipped eval config."""
    from click4caption.captioner import Captioner
    from click4caption.generation import GenerationSettings
    from click4caption.config import from_dict, load_config
    from click4caption.models.builder import build_model
    from click4caption.paths import default_config_path
    from click4caption.processors import Blip2ImageEvalProcessor
    from click4caption.training.checkpointing import load_checkpoint, load_trainable_state_dict
    from click4caption.training.freezing import frozen_parts

    settings = GenerationSettings(max_new_tokens=60)
    ckpt = load_checkpoint(checkpoint)
    if "config" not in ckpt:
        cfg = load_config(default_config_path())
        cfg.model.ckpt = str(checkpoint)
        if llm_dir:
            cfg.model.llama_model = llm_dir
        return Captioner.from_config(cfg, device, settings), None, cfg.model
    cfg = from_dict(ckpt["config"])
    if llm_dir:
        cfg.model.llama_model = llm_dir
    model = build_model(cfg.model, device, for_training=True)
    model.freeze(frozen_parts(cfg.model))  # what the trainer trained (and saved)
    load_trainable_state_dict(model, ckpt["model"], str(checkpoint))
    model.eval()
    captioner = Captioner(model, Blip2ImageEvalProcessor(cfg.model.image_size), device, settings)
    return captioner, int(ckpt["iteration"]), cfg.model


def checkpoint_grid(checkpoint: Path) -> int:
    """The ``box_attention_grid`` a trainer checkpoint's config names (0 for an exported model)."""
    from click4caption.config import from_dict
    from click4caption.training.checkpointing import load_checkpoint

    config = load_checkpoint(checkpoint).get("config")
    return from_dict(config).model.box_attention_grid if config else 0


def row(name: str, scores: dict[str, dict[str, Any]], owners: dict[str, Any] | None = None,
        centres: dict[str, Any] | None = None) -> str:
    cells = [f"{100 * scores[k]['value']:.1f}" if k in scores else "" for k in KINDS]
    for counted in (owners, centres):
        if counted is not None:
            cells.append(f"{100 * counted['value']:.1f} ({counted['under']} under, {counted['over']} over)")
    return f"| {name} | " + " | ".join(cells) + " |"


def header(owners: bool = False, centres: bool = False) -> str:
    names = [SHORT[k] for k in KINDS] + (["owner count"] if owners else []) + (["centre count"] if centres else [])
    return "| iterations | " + " | ".join(names) + " |\n|" + " --- |" * (len(names) + 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="+", help="a run folder (all its checkpoint_iter*.pth) or checkpoint files")
    p.add_argument("--scenes", type=int, default=50)
    p.add_argument("--seed", type=int, default=DEFAULT_EVAL_SEED)
    p.add_argument("--generator", choices=GENERATORS, default="shapes")
    p.add_argument("--every", type=int, default=1, help="score every N-th checkpoint of a folder (and the last)")
    p.add_argument("--llm-dir", default=None, help="the LLM folder (default: the one the checkpoint's config names)")
    p.add_argument("--out", default=None, help="JSON file for the rows (default: <run>/curves[-heldout].json)")
    p.add_argument("--owners", action="store_true",
                   help="also read the queries' owner channel on the whole-image boxes (click4caption/shapes/owners.py)")
    p.add_argument("--grid", type=int, default=None,
                   help="with --owners: the owner grid (default: the checkpoint's box_attention_grid; "
                        "an exported model has none: give 4 for the shipped one)")
    p.add_argument("--ramp", type=float, default=None,
                   help="with --owners: the owner ramp the targets follow (default: the checkpoint's "
                        "box_attention_owner_ramp; 0 for an exported model)")
    p.add_argument("--centres", action="store_true",
                   help="also count the image tokens' object-centre peaks on the whole-image boxes "
                        "(click4caption/shapes/centres.py)")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.ramp is not None and not 0 <= args.ramp <= 1:
        raise InputError(f"--ramp must be in [0, 1] cells, got {args.ramp}")
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
    grids = {f: args.grid if args.grid is not None else checkpoint_grid(f) for f in files} if args.owners else {}
    for f, grid in grids.items():
        if grid <= 0:
            raise InputError(f"{f}: --owners needs a grid: the model has no box_attention_grid; give --grid")
    print(header(args.owners, args.centres), flush=True)
    for f in files:
        captioner, iteration, model_cfg = load_captioner(f, args.llm_dir)
        with tempfile.TemporaryDirectory() as tmp:
            items = make_items(args.generator, args.seed, args.scenes, Path(tmp) / "images")
            scores = evaluate_shapes(captioner, args.seed, args.scenes, Path(tmp), generator=args.generator,
                                     items=items)
            owners = None
            if args.owners:
                from click4caption.shapes.owners import read_owners

                ramp = args.ramp if args.ramp is not None else model_cfg.box_attention_owner_ramp
                owners = read_owners(captioner, items, grids[f], ramp, model_cfg.box_attention_owner_cells)
            centres = None
            if args.centres:
                from click4caption.shapes.centres import read_centres

                centres = read_centres(captioner, items)
        name = f"{iteration:,}" if iteration is not None else f.name
        rows[str(iteration) if iteration is not None else f.name] = {
            "checkpoint": str(f), "scenes": args.scenes, "seed": args.seed, "generator": args.generator,
            "scores": scores, **({"owners": owners} if owners is not None else {}),
            **({"centres": centres} if centres is not None else {})}
        out.write_text(json.dumps(rows, indent=1))
        print(row(name, scores, owners, centres), flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)



