"""Evaluate a model.

``python evaluate.py shapes [--cfg-path CFG] [--seed 20261128] [--scenes 100]`` draws
fresh shapes scenes (a seed never used in training), asks every question through the
same code path as ``inference.py --batch_file`` (``Captioner.run_item``) and the
follow-up conversations through the Python API the demo uses (``Captioner.ask`` with a
shared conversation), and prints the table of design/shapes_world.md plus the
follow-up row. ``--generator heldout`` draws the scenes with another program that
follows the spec (click4caption/shapes/heldout.py). Without ``--cfg-path`` the shipped
model is used.

``python evaluate.py vg|refcocog --annotations FILE --images DIR [DIR ...] --out DIR``
captions every ground-truth box of a region-captioning benchmark file (GLaMM's
``test_caption.json`` / ``finetune_refcocog_val_captions.json``, or GRiT's dense-captioning
``test.json``) and scores the captions with pycocoevalcap (METEOR, CIDEr, BLEU-4, ROUGE-L).
Resumable (rerun the same command after a crash); runs unchanged under
``torchrun --nproc-per-node N``. ``evaluate.py vg --annotations FILE --write-held-out ids.txt``
writes the file's Visual Genome image ids for ``datasets.vg.held_out_ids_file``.
"""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

# light imports only: the arguments and files are checked before torch & co. are imported
from click4caption.paths import default_config_path
from click4caption_apps.cli import pick_device, run_main, seed_everything, setup_logging
from click4caption.config import load_config
from click4caption.errors import InputError

logger = logging.getLogger("click4caption.evaluate")


class _Parser(argparse.ArgumentParser):
    """Usage errors as one ``error:`` line on stderr (exit 2), like every other user error."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cfg-path", default=None, help="eval config (default: the shipped shapes model)")
    p.add_argument("--options", nargs="+", default=None, help="config overrides, key=value")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (under torchrun: cuda:<local rank>)")
    p.add_argument("--gpu-id", type=int, default=None)
    p.add_argument("--verbose", action="store_true")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from click4caption.evaluation.benchmark import BENCHMARK_MAX_NEW_TOKENS
    from click4caption.evaluation.regions import DEFAULT_BATCH_SIZE
    from click4caption.shapes.evaluation import GENERATORS

    p = _Parser(description="Evaluate Click4Caption.")
    sub = p.add_subparsers(dest="suite", required=True, parser_class=_Parser)
    s = sub.add_parser("shapes", help="accuracy table on fresh shapes-world scenes")
    _model_args(s)
    s.add_argument("--seed", type=int, default=None,
                   help="scene seed (default: click4caption.shapes.evaluation.DEFAULT_EVAL_SEED, never used in training)")
    s.add_argument("--scenes", type=int, default=100, help="scenes to draw (7 questions each)")
    s.add_argument("--out", default=None, help="folder for images, the batch file and results (default: a temp dir)")
    s.add_argument("--max_new_tokens", type=int, default=60)
    s.add_argument("--generator", choices=GENERATORS, default="shapes",
                   help="scene generator: the training data's (shapes) or another one following the spec (heldout)")
    s.add_argument("--no-followups", action="store_true", help="skip the follow-up conversations")
    for name, what in (("vg", "Visual Genome region captioning (GLaMM's test_caption.json or GRiT's test.json)"),
                       ("refcocog", "RefCOCOg region captioning (GLaMM's finetune_refcocog_val_captions.json)")):
        b = sub.add_parser(name, help=what, description=what)
        b.add_argument("--annotations", required=True, metavar="FILE", help="the benchmark annotation file")
        b.add_argument("--images", nargs="+", default=None, metavar="DIR",
                       help="folder(s) holding the images named by file_name (searched in order)")
        b.add_argument("--out", default=None, metavar="DIR", help="output folder (rerun the same command to resume)")
        b.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                       help=f"regions per generation call, across images (default {DEFAULT_BATCH_SIZE})")
        b.add_argument("--max_new_tokens", type=int, default=BENCHMARK_MAX_NEW_TOKENS,
                       help=f"default {BENCHMARK_MAX_NEW_TOKENS} (region captions are short)")
        b.add_argument("--num_beams", type=int, default=None, help="default 1 (greedy)")
        b.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N regions (a quick run)")
        b.add_argument("--seed", type=int, default=42)
        if name == "vg":
            b.add_argument("--write-held-out", default=None, metavar="IDS.txt",
                           help="write the file's VG image ids (for datasets.vg.held_out_ids_file) and exit")
        _model_args(b)
    args = p.parse_args(argv)
    if args.suite == "shapes" and (args.scenes < 1 or args.max_new_tokens < 1):
        p.error("--scenes and --max_new_tokens must be >= 1")
    if args.suite in ("vg", "refcocog") and getattr(args, "write_held_out", None) is None:
        if not args.images or not args.out:
            p.error(f"{args.suite} needs --images DIR and --out DIR")
        if args.batch_size < 1 or args.max_new_tokens < 1 or (args.num_beams is not None and args.num_beams < 1):
            p.error("--batch-size, --max_new_tokens and --num_beams must be >= 1")
        if args.limit is not None and args.limit < 1:
            p.error("--limit must be >= 1")
    return args


def run_shapes(args: argparse.Namespace) -> int:
    from click4caption.captioner import Captioner
    from click4caption.generation import GenerationSettings
    from click4caption.shapes.evaluation import DEFAULT_EVAL_SEED, evaluate_shapes
    from click4caption.shapes.scoring import format_table

    seed = DEFAULT_EVAL_SEED if args.seed is None else args.seed
    seed_everything(0)
    cfg = load_config(args.cfg_path or default_config_path(), args.options)
    device = pick_device(args.device, args.gpu_id)
    captioner = Captioner.from_config(cfg, device=device, settings=GenerationSettings(max_new_tokens=args.max_new_tokens))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        scores = evaluate_shapes(captioner, seed, args.scenes, out, not args.no_followups, args.generator)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            scores = evaluate_shapes(captioner, seed, args.scenes, Path(tmp), not args.no_followups,
                                     args.generator)
    print(format_table(scores))
    if args.out:
        (Path(args.out) / "scores.json").write_text(json.dumps(scores, indent=2))
    return 0 if all(s["passed"] for s in scores.values()) else 1


def write_held_out(annotations: str, out: str) -> int:
    """The annotation file's VG image ids, one per line, for ``datasets.vg.held_out_ids_file``."""
    from click4caption.evaluation.annotations import read_annotation_json, vg_image_ids

    doc = read_annotation_json(annotations)
    ids = vg_image_ids([e["file_name"] for e in doc["images"] if isinstance(e, dict) and "file_name" in e])
    path = Path(out)
    if not path.resolve().parent.is_dir():
        raise InputError(f"cannot write --write-held-out {out}: its folder does not exist")
    path.write_text(f"# Visual Genome image ids of {Path(annotations).name} ({len(ids)} images), "
                    "for datasets.vg.held_out_ids_file\n" + "".join(i + "\n" for i in ids), encoding="utf-8")
    logger.info("wrote %d VG image ids to %s", len(ids), path)
    return 0


def run_region_benchmark(args: argparse.Namespace, argv: list[str] | None) -> int:
    from click4caption.evaluation.annotations import load_benchmark
    from click4caption.evaluation.benchmark import BenchmarkRun, format_scores, run_benchmark
    from click4caption.parallel import cleanup, dist_context, init

    # the cheap checks first: config, annotation file and its layout, folders
    cfg_path = args.cfg_path or default_config_path()
    cfg = load_config(cfg_path, args.options)
    roots = [Path(d) for d in args.images]
    for root in roots:
        if not root.is_dir():
            raise InputError(f"image folder not found: {root}")
    out = Path(args.out)
    if not out.resolve().parent.is_dir():
        raise InputError(f"cannot write --out {args.out}: its parent folder does not exist")
    bench = load_benchmark(args.annotations)
    ctx = dist_context()
    if not ctx.is_main:
        logging.getLogger("click4caption").setLevel(logging.WARNING)

    from click4caption.captioner import Captioner
    from click4caption.generation import GenerationSettings

    beams = {} if args.num_beams is None else {"num_beams": args.num_beams}
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, **beams)
    device = pick_device(args.device, args.gpu_id if ctx.world_size == 1 else ctx.local_rank)
    ctx = init(ctx, device)
    try:
        seed_everything(args.seed)
        run = BenchmarkRun(
            benchmark=args.suite, annotations=Path(args.annotations), image_roots=roots, out=out, limit=args.limit,
            batch_size=args.batch_size, command=shlex.join(["evaluate.py", *(sys.argv[1:] if argv is None else argv)]),
            signature={"config": str(Path(cfg_path).resolve()), "options": args.options or [],
                       "generation": {"max_new_tokens": settings.max_new_tokens, "num_beams": settings.num_beams,
                                      "do_sample": settings.do_sample}})
        scores = run_benchmark(run, lambda: Captioner.from_config(cfg, device=device, settings=settings), settings,
                               ctx, bench)
    finally:
        cleanup(ctx)
    if scores is not None:
        print(format_scores(scores))
        logger.info("scores in %s", out / "scores.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    if args.suite == "shapes":
        return run_shapes(args)
    if getattr(args, "write_held_out", None) is not None:
        return write_held_out(args.annotations, args.write_held_out)
    return run_region_benchmark(args, argv)


if __name__ == "__main__":
    run_main(main)
