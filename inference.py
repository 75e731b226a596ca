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
from typing import TYPE_CHECKING, NoReturn

from PIL import ImageDraw

# light imports only: what the user gave is checked before torch & co. are imported
from click4caption.boxes import normalize_box
from click4caption.cli import default_config_path, pick_device, run_main, seed_everything, setup_logging
from click4caption.config import load_config
from click4caption.errors import Click4CaptionError, InputError
from click4caption.images import load_image
from click4caption.prompts import DESCRIBE_PROMPT, IMG_TOKEN, check_question

if TYPE_CHECKING:
    from click4caption.captioner import Captioner

logger = logging.getLogger("click4caption.inference")


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
    p.add_argument("--num_beams", type=int, default=1)
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --do_sample)")
    p.add_argument("--do_sample", action="store_true", help="sample (top-p 0.9) instead of greedy decoding")
    p.add_argument("--max_new_tokens", type=int, default=300)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--image_path", default=None)
    p.add_argument("--tl_x", type=float, default=-1, help="top-left x (-1: image border)")
    p.add_argument("--tl_y", type=float, default=-1, help="top-left y (-1: image border)")
    p.add_argument("--br_x", type=float, default=-1, help="bottom-right x (-1: image border)")
    p.add_argument("--br_y", type=float, default=-1, help="bottom-right y (-1: image border)")
    p.add_argument("--input_text", default=DESCRIBE_PROMPT, help=f"question; {IMG_TOKEN} marks the region")
    p.add_argument("--save_vis", default=None, metavar="PATH", help="write the image with the box drawn")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--batch_file", default=None, metavar="IN.jsonl")
    p.add_argument("--output_file", default=None, metavar="OUT.jsonl")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.batch_file is None and args.image_path is None:
        p.error("give --image_path (one image) or --batch_file IN.jsonl")
    if args.batch_file is not None and args.output_file is None:
        p.error("--batch_file needs --output_file OUT.jsonl")
    if args.num_beams < 1 or args.max_new_tokens < 1:
        p.error("--num_beams and --max_new_tokens must be >= 1")
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


def run_batch(captioner: Captioner, in_path: str, out_path: str) -> int:
    """Answer every line of ``in_path``; bad lines get an ``error`` field. Returns the
    number of failed lines. Output is written line by line (nothing lost on a crash)."""
    src = Path(in_path)
    if not src.is_file():
        raise InputError(f"batch file not found: {src}")
    lines = src.read_text(encoding="utf-8").splitlines()
    failed = 0
    try:
        out = open(out_path, "w", encoding="utf-8")
    except OSError as err:
        raise InputError(f"cannot write --output_file {out_path}: {err}") from None
    from tqdm import tqdm

    with out:
        for n, line in enumerate(tqdm(lines, desc="batch", unit="line", disable=None), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                result = {"line": n, "input": line, "error": f"not valid JSON: {err.msg}"}
            else:
                try:
                    result = captioner.run_item(item)
                except Click4CaptionError as err:
                    result = dict(item) if isinstance(item, dict) else {"input": item}
                    result["error"] = str(err)
            if "error" in result:
                failed += 1
                logger.warning("line %d: %s", n, result["error"])
            out.write(json.dumps(result, ensure_ascii=False) + "\n")
            out.flush()
    logger.info("wrote %d results to %s (%d with errors)", len(lines), out_path, failed)
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

    from click4caption.captioner import Captioner, GenerationSettings, Region

    seed_everything(args.seed)
    device = pick_device(args.device, args.gpu_id)
    settings = GenerationSettings(num_beams=args.num_beams, temperature=args.temperature, do_sample=args.do_sample,
                                  max_new_tokens=args.max_new_tokens)
    captioner = Captioner.from_config(cfg, device=device, settings=settings)
    if args.batch_file is not None:
        failed = run_batch(captioner, args.batch_file, args.output_file)
        return 1 if failed else 0
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
