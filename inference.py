"""Command-line region captioning / question answering.

Upstream's arguments keep working::

    python inference.py --cfg-path eval_configs/click4caption_eval.yaml --gpu-id 0 \\
        --image_path img.jpg --tl_x 10 --tl_y 20 --br_x 200 --br_y 180 --input_text 'image[IMG] What is it?'

Without ``--cfg-path`` the shipped shapes model is used (no downloads). Batch mode::

    python inference.py --batch_file in.jsonl --output_file out.jsonl
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NoReturn

from PIL import ImageDraw

# light imports only: what the user gave is checked before torch & co. are imported
from click4caption.boxes import normalize_box
from click4caption.paths import default_config_path
from click4caption_apps.cli import pick_device, run_main, seed_everything, setup_logging
from click4caption.config import load_config
from click4caption.errors import InputError
from click4caption.generation import GenerationSettings
from click4caption.images import load_image
from click4caption.prompts import DESCRIBE_PROMPT, IMG_TOKEN, check_question

if TYPE_CHECKING:
    from click4caption import parallel
    from click4caption.captioner import Captioner

logger = logging.getLogger("click4caption.inference")
DEFAULTS = GenerationSettings()
#: batch lines read, answered and written together (a crash loses at most one chunk)
CHUNK_LINES = 64


class _Parser(argparse.ArgumentParser):
    """Usage errors as one ``error:`` line on stderr (exit 2), like every other user error."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _Parser(description="Click4Caption: describe a box, or ask about regions.")
    p.add_argument("--cfg-path", default=None, help=f"eval config (default: the shipped shapes model, {default_config_path()})")
    p.add_argument("--gpu-id", type=int, default=None, help="GPU index (upstream); with CUDA the default is 0")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--options", nargs="+", default=None, help="config overrides, key=value (e.g. model.ckpt=x.pth)")
    p.add_argument("--num_beams", type=int, default=DEFAULTS.num_beams, help=GenerationSettings.help("num_beams"))
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --do_sample)")
    p.add_argument("--do_sample", action="store_true", help=f"sample (top-p {DEFAULTS.top_p}) instead of greedy decoding")
    p.add_argument("--max_new_tokens", type=int, default=DEFAULTS.max_new_tokens,
                   help=GenerationSettings.help("max_new_tokens"))
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--image_path", default=None)
    p.add_argument("--tl_x", type=float, default=-1, help="top-left x (-1: image border)")
    p.add_argument("--tl_y", type=float, default=-1, help="top-left y (-1: image border)")
    p.add_argument("--br_x", type=float, default=-1, help="bottom-right x (-1: image border)")
    p.add_argument("--br_y", type=float, default=-1, help="bottom-right y (-1: image border)")
    p.add_argument("--input_text", default=DESCRIBE_PROMPT, help=f"question; {IMG_TOKEN} marks the region")
    p.add_argument("--save_vis", default=None, metavar="PATH", help="write the image with the box drawn")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--batch_file", default=None, metavar="IN.jsonl",
                   help="one JSON object per line: image, boxes, question (optional); runs under torchrun too")
    p.add_argument("--output_file", default=None, metavar="OUT.jsonl",
                   help="results in input order; a rerun resumes (lines already answered are kept)")
    p.add_argument("--batch_size", type=int, default=DEFAULTS.batch_size, help=GenerationSettings.help("batch_size"))
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.batch_file is None and args.image_path is None:
        p.error("give --image_path (one image) or --batch_file IN.jsonl")
    if args.batch_file is not None and args.output_file is None:
        p.error("--batch_file needs --output_file OUT.jsonl")
    if args.num_beams < 1 or args.max_new_tokens < 1 or args.batch_size < 1:
        p.error("--num_beams, --max_new_tokens and --batch_size must be >= 1")
    if args.do_sample and args.temperature <= 0:
        p.error("--temperature must be > 0 with --do_sample")
    return args


def draw_box(image, box, path: str) -> None:
    """Save ``image`` with ``box`` (original pixels) drawn in red."""
    vis = image.copy()
    width = max(2, (image.width + image.height) // 224)
    ImageDraw.Draw(vis).rectangle(box, outline=(255, 0, 0), width=width)
    try:
        vis.save(path)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot write --save_vis {path}: {err}") from None
    logger.info("image with the box drawn saved to %s", path)


def _same_input(record: dict[str, Any], item: Any, raw: str) -> bool:
    """Whether an earlier run's output ``record`` answers this very line."""
    if isinstance(item, dict):
        return all(record.get(k) == v for k, v in item.items())
    return record.get("input") == raw


def run_batch(make_captioner: Callable[[], "Captioner"], in_path: str, out_path: str,
              settings: GenerationSettings, ctx: "parallel.DistContext | None" = None) -> int:
    """Answer every line of ``in_path`` into ``out_path`` (input order; bad lines get an
    ``error`` field, every result its 1-based ``line``). Lines are answered in chunks of
    ``CHUNK_LINES``, all their questions batched together, and each chunk is written as
    soon as it is done. Under ``torchrun`` each process takes its share of the lines;
    rank 0 merges. A rerun keeps the lines already answered and does the rest.

    Returns:
        on rank 0, the number of lines of the output with errors; 0 on other ranks.
    """
    from tqdm import tqdm

    from click4caption import parallel

    src = Path(in_path)
    lines = [(n, line) for n, line in enumerate(src.read_text(encoding="utf-8").splitlines(), start=1)
             if line.strip()]
    items: list[tuple[int, str, Any]] = []
    for n, line in lines:
        try:
            items.append((n, line, json.loads(line)))
        except json.JSONDecodeError as err:
            items.append((n, line, err))
    ctx = ctx or parallel.DistContext()
    done = parallel.load_done(out_path, "line")
    mine = [items[i] for i in parallel.shard(len(items), ctx.rank, ctx.world_size)]
    todo = [(n, raw, item) for n, raw, item in mine
            if not (str(n) in done and _same_input(done[str(n)], item, raw))]
    if len(todo) < len(mine):
        logger.info("%d of %d lines already answered in %s", len(mine) - len(todo), len(mine), out_path)
    captioner = make_captioner() if todo else None
    with parallel.PartialWriter(parallel.partial_path(out_path, ctx.rank)) as writer, \
            tqdm(total=len(todo), desc="batch", unit="line", disable=None if ctx.is_main else True) as bar:
        for start in range(0, len(todo), CHUNK_LINES):
            chunk = todo[start:start + CHUNK_LINES]
            good = [(n, item) for n, _, item in chunk if not isinstance(item, json.JSONDecodeError)]
            answered = dict(zip([n for n, _ in good], captioner.run_items([item for _, item in good], settings)))
            records = []
            for n, raw, item in chunk:
                if isinstance(item, json.JSONDecodeError):
                    record = {"input": raw, "error": f"not valid JSON: {item.msg}"}
                else:
                    record = answered[n]
                record = {"line": n, **record}
                if "error" in record:
                    logger.warning("line %d: %s", n, record["error"])
                records.append(record)
            writer.write_many(records)
            bar.update(len(chunk))
    merged = parallel.merge(out_path, [str(n) for n, _, _ in items], "line", ctx, keep_unknown=False)
    if merged is None:
        return 0
    failed = sum("error" in r for r in merged.values())
    logger.info("wrote %d results to %s (%d with errors)", len(merged), out_path, failed)
    return failed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    cfg = load_config(args.cfg_path or default_config_path(), args.options)
    # check the cheap things before the slow imports and the model load
    if args.batch_file is not None:
        if not Path(args.batch_file).is_file():
            raise InputError(f"batch file not found: {args.batch_file}")
        if not Path(args.output_file).resolve().parent.is_dir():
            raise InputError(f"cannot write --output_file {args.output_file}: its folder does not exist")
    else:
        if args.save_vis and not Path(args.save_vis).resolve().parent.is_dir():
            raise InputError(f"cannot write --save_vis {args.save_vis}: its folder does not exist")
        check_question(args.input_text, 1)
        image = load_image(args.image_path)
        box, box_warnings = normalize_box([args.tl_x, args.tl_y, args.br_x, args.br_y], image.width, image.height)
        for warning in box_warnings:
            logger.warning(warning)

    from click4caption import parallel
    from click4caption.captioner import Captioner, Region

    seed_everything(args.seed)
    settings = GenerationSettings(num_beams=args.num_beams, temperature=args.temperature if args.do_sample else 0.0,
                                  max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    if args.batch_file is not None:
        ctx = parallel.dist_context()
        if not ctx.is_main:
            logging.getLogger("click4caption").setLevel(logging.WARNING)
        device = pick_device(args.device, args.gpu_id if ctx.world_size == 1 else ctx.local_rank)
        ctx = parallel.init(ctx, device)
        try:
            failed = run_batch(lambda: Captioner.from_config(cfg, device=device, settings=settings),
                               args.batch_file, args.output_file, settings, ctx)
        finally:
            parallel.cleanup(ctx)
        return 1 if failed else 0
    device = pick_device(args.device, args.gpu_id)
    captioner = Captioner.from_config(cfg, device=device, settings=settings)
    region = Region(image, box, box_warnings)
    answer = captioner.ask([region], args.input_text)
    if args.save_vis:
        draw_box(image, region.box, args.save_vis)
    if args.json:
        print(json.dumps({"image": args.image_path, "box": list(region.box), "question": args.input_text,
                          "answer": answer, "warnings": region.warnings}, ensure_ascii=False))
    else:
        print(answer)
    return 0


if __name__ == "__main__":
    run_main(main)
