"""Scoring a model on fresh shapes scenes through the CLI's code path."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from click4caption.errors import Click4CaptionError, InputError
from click4caption.shapes.scoring import make_eval_items, make_followup_items, score

if TYPE_CHECKING:  # the CLI reads GENERATORS before torch is imported
    from click4caption.captioner import Captioner

logger = logging.getLogger(__name__)

# evaluation scenes come from this seed unless told otherwise; the training data uses
# seed 0 on other generator streams (click4caption_apps/shapes_recipe.py)
DEFAULT_EVAL_SEED = 20261128
#: scene generators: the training data's and another program following the spec
GENERATORS = ("shapes", "heldout")
#: one-turn questions generated together (``Captioner.run_items``)
EVAL_CHUNK = 64


def ask_conversation(captioner: Captioner, image: str, turns: list[dict[str, Any]]) -> list[str]:
    """Ask ``turns`` (``{"boxes", "question"}``, boxes in original pixels) in one
    conversation, as the demo does: one :class:`~click4caption.prompts.Conversation`
    and one list of soft tokens shared by every turn. Returns the replies."""
    from click4caption.images import load_image

    picture = load_image(image)
    conv, img_list, replies = captioner.new_conversation(), [], []
    for turn in turns:
        regions = [captioner.region(picture, box) for box in turn["boxes"]]
        replies.append(captioner.ask(regions, turn["question"], conv, img_list))
    return replies



def make_items(generator: str, seed: int, scenes: int, image_dir: Path) -> list[dict[str, Any]]:
    """The one-turn evaluation items of ``scenes`` scenes of ``generator`` (see
    :func:`evaluate_shapes`), images saved under ``image_dir``."""
    if generator == "shapes":
        return make_eval_items(seed, scenes, image_dir)
    if generator == "heldout":
        from click4caption.shapes.heldout import make_heldout_items

        return make_heldout_items(seed, scenes, image_dir)
    raise InputError(f"unknown generator {generator!r} (known: {', '.join(GENERATORS)})")


def evaluate_shapes(captioner: Captioner, seed: int, scenes: int, out: Path, followups: bool = True,
                    generator: str = "shapes", items: list[dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Score ``captioner`` on ``scenes`` fresh scenes (7 questions each, plus two
    follow-up conversations each unless ``followups`` is off).

    ``generator`` draws the scenes: ``shapes`` (:mod:`click4caption.shapes.world`, the
    training data's generator, on streams training never uses) or ``heldout``
    (:mod:`click4caption.shapes.heldout`, another program following the spec; no
    follow-ups).

    The one-turn questions go through :meth:`Captioner.run_items` (batched), as
    ``inference.py --batch_file`` does; follow-up conversations go through :meth:`Captioner.ask` with a
    shared conversation, as the demo does. Writes ``items.jsonl`` (the CLI's batch
    input), ``followups.jsonl`` and ``results.jsonl`` (answers plus ``expected`` and
    ``kind``) under ``out``. ``items``: the one-turn items of :func:`make_items` for the
    same arguments, where the caller made them already (they are not drawn again).
    """
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    if items is None:
        items = make_items(generator, seed, scenes, out / "images")
    use_followups = followups and generator == "shapes"
    conversations = make_followup_items(seed, scenes, out / "images") if use_followups else []
    with open(out / "items.jsonl", "w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps({k: it[k] for k in ("image", "boxes", "question")}) + "\n")
    with open(out / "followups.jsonl", "w", encoding="utf-8") as f:
        for it in conversations:
            f.write(json.dumps({k: it[k] for k in ("image", "turns")}) + "\n")
    answers: list[str] = []
    start = time.time()
    with open(out / "results.jsonl", "w", encoding="utf-8") as f:
        with tqdm(total=len(items), desc="questions", unit="q", disable=None) as bar:
            for first in range(0, len(items), EVAL_CHUNK):
                chunk = items[first:first + EVAL_CHUNK]
                lines = [{k: it[k] for k in ("image", "boxes", "question")} for it in chunk]
                for it, result in zip(chunk, captioner.run_items(lines)):
                    answers.append(result.get("answer", ""))
                    f.write(json.dumps({**result, "expected": it["meta"]["answer"],
                                        "kind": it["meta"]["kind"]}) + "\n")
                bar.update(len(chunk))
        for it in tqdm(conversations, desc="follow-ups", unit="conv", disable=None):
            line = {k: it[k] for k in ("image", "turns")}
            try:
                replies = ask_conversation(captioner, it["image"], it["turns"])
                result = {**line, "replies": replies, "answer": replies[-1]}
            except Click4CaptionError as err:
                result = {**line, "error": str(err)}
            answers.append(result.get("answer", ""))
            f.write(json.dumps({**result, "expected": it["meta"]["answer"], "kind": it["meta"]["kind"],
                                "ref": it["meta"]["ref"], "after": it["meta"]["after"]}) + "\n")
    logger.info("%d questions and %d follow-up conversations in %.0f s", len(items), len(conversations),
                time.time() - start)
    return score(items + conversations, answers)
