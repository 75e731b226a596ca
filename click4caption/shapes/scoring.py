"""Judge a model on fresh shapes scenes against the bars of design/shapes_world.md.

``make_eval_items`` draws scenes from a stream no training split uses and returns
items in the inference CLI's batch format (``image``, ``boxes``, ``question``) plus
a ``meta`` dict; ``score`` turns the model's answers into the spec's measures and
``format_table`` prints them with their bars.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from click4caption.shapes import dialogue
from click4caption.shapes.world import (
    COLORS,
    COUNT_WORDS,
    PAIR_QUESTIONS,
    SHAPES,
    SINGLE_QUESTIONS,
    SIZES,
    Scene,
    draw_scene,
    find_pairs,
    pair_answer,
    pair_prompt,
    single_answer,
    single_prompt,
    whole_image_caption,
)

#: Stream index of evaluation scenes (writers.PART_STREAMS uses 1-3), so even a
#: training seed reused here draws different scenes.
EVAL_STREAM = 1000
#: Stream index of the follow-up conversations' scenes.
FOLLOWUP_STREAM = 1001
REJECTION_TRIES = 1000

#: kind -> (question, measure, bar), in table order.
BARS: dict[str, tuple[str, str, float]] = {
    "describe": ("Describe, one box on an object", "colour, shape and size all right", 0.90),
    "color": ("What color is it?", "exact answer", 0.95),
    "shape": ("What shape is it?", "exact answer", 0.95),
    "size": ("Is it large or small?", "exact answer", 0.95),
    "same_color": ("Two boxes, same colour", "balanced accuracy", 0.85),
    "same_shape": ("Two boxes, same shape", "balanced accuracy", 0.85),
    "whole": ("Describe, whole image", "count word right", 0.80),
    "followup": ("Follow-up without [IMG] (it / image N / the first one)",
                 "exact answer, colour and shape each (the lower shown)", 0.95),
}
KINDS: tuple[str, ...] = tuple(BARS)
#: The follow-up row's parts (scored as exact answers, reported by the lower one).
FOLLOWUP_KINDS: dict[str, str] = {"followup_color": "colour", "followup_shape": "shape"}


def _object_meta(scene: Scene) -> list[dict[str, Any]]:
    return [{k: v for k, v in asdict(o).items() if k != "rgb"} for o in scene.objects]


def _item(image: Path, boxes: list[list[int]], question: str, meta: dict[str, Any]) -> dict[str, Any]:
    return {"image": str(image), "boxes": boxes, "question": question, "meta": meta}


#: ``draw(rng, index)`` -> ``(image, scene)``: the scene of evaluation scene ``index``, or
#: (``index`` None) a further scene drawn to find a pair with the wanted answer
SceneDrawer = Callable[[np.random.Generator, "int | None"], tuple[Image.Image, Scene]]


def make_eval_items(seed: int, num_scenes: int, image_dir: Path | str) -> list[dict[str, Any]]:
    """Draw ``num_scenes`` scenes of :mod:`click4caption.shapes.world`, save them as PNG
    under ``image_dir``, return the items (see :func:`scene_items`)."""
    return scene_items(np.random.default_rng([seed, EVAL_STREAM]), num_scenes, image_dir,
                       lambda rng, _index: draw_scene(rng))


def scene_items(rng: np.random.Generator, num_scenes: int, image_dir: Path | str, draw: SceneDrawer,
                prefix: str = "", tries: int = REJECTION_TRIES) -> list[dict[str, Any]]:
    """The evaluation items of ``num_scenes`` scenes that ``draw`` makes, images saved as
    ``<prefix><scene>.png`` under ``image_dir``.

    Per scene: Describe, color, shape and size, each on a random object; the
    whole-image box ``[0, 0, W, H]`` with the Describe question; and one pair question
    per pair kind. Pair targets alternate Yes/No over scenes (exactly half Yes for an
    even ``num_scenes``); when a scene has no pair with the target answer, further
    scenes are drawn (up to ``tries``) until one has, and saved as ``<prefix><scene>_<kind>.png``.

    Each item's ``meta`` holds ``kind``, ``answer`` (the expected answer), ``scene``
    (its index), ``count`` and ``objects`` (every object of its image: shape, color,
    size, box) and, for single-object kinds, ``target`` (the asked object's index).
    """
    image_dir = Path(image_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    items: list[dict[str, Any]] = []
    for index in range(num_scenes):
        image, scene = draw(rng, index)
        path = image_dir / f"{prefix}{index:05d}.png"
        image.save(path)
        base = {"scene": index, "count": len(scene.objects), "objects": _object_meta(scene)}
        for kind, text in SINGLE_QUESTIONS.items():
            target = int(rng.integers(len(scene.objects)))
            obj = scene.objects[target]
            meta = {**base, "kind": kind, "answer": single_answer(kind, obj), "target": target}
            items.append(_item(path, [obj.box_xyxy], single_prompt(text), meta))
        whole_meta = {**base, "kind": "whole", "answer": whole_image_caption(scene)}
        items.append(_item(path, [scene.whole_box], single_prompt(SINGLE_QUESTIONS["describe"]), whole_meta))

        for k, (kind, text) in enumerate(PAIR_QUESTIONS.items()):
            wanted = "Yes." if (index + k) % 2 == 0 else "No."
            pair_scene, pair_path = scene, path
            for _ in range(tries):
                if find_pairs(pair_scene, kind, wanted):
                    break
                pair_image, pair_scene = draw(rng, None)
                pair_path = image_dir / f"{prefix}{index:05d}_{kind}.png"
                pair_image.save(pair_path)
            else:
                raise RuntimeError(f"no scene with a {kind} pair answered {wanted} in {tries} draws")
            pairs = find_pairs(pair_scene, kind, wanted)
            i, j = pairs[int(rng.integers(len(pairs)))]
            a, b = pair_scene.objects[i], pair_scene.objects[j]
            meta = {
                "scene": index,
                "count": len(pair_scene.objects),
                "objects": _object_meta(pair_scene),
                "kind": kind,
                "answer": pair_answer(kind, a, b),
                "targets": [i, j],
            }
            items.append(_item(pair_path, [a.box_xyxy, b.box_xyxy], pair_prompt(text), meta))
    return items


def make_followup_items(seed: int, num_scenes: int, image_dir: Path | str) -> list[dict[str, Any]]:
    """Conversations whose last question is a text-only follow-up about an earlier region.

    Per scene (saved as ``<scene>_followup.png``), two conversations, one asking a
    colour and one a shape (alternating over scenes):

    - the Describe question about a random object, then ``What color is it?`` (or shape);
    - two objects asked about, alternating between one pair question (``image 1[IMG]
      image 2[IMG] Are they the same color?``) and two one-region questions
      (``image[IMG] What shape is it?``, ``image 2[IMG] What color is it?``), then a
      question about ``image 1`` / ``image 2`` or ``the first one`` / ``the second one``
      (alternating) asking what was not asked of that region (after two one-region
      questions, the other region was asked exactly that: a wrong reference shows).

    Items: ``{"image", "turns": [{"boxes", "question"}, ...], "meta"}``; the last turn
    has no box. ``meta`` holds ``kind`` (``followup_color`` / ``followup_shape``),
    ``answer``, ``ref``, ``after``, ``scene``, ``objects`` and ``target``. Scenes come
    from their own stream, so :func:`make_eval_items` is unchanged.
    """
    image_dir = Path(image_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, FOLLOWUP_STREAM])
    items: list[dict[str, Any]] = []
    for index in range(num_scenes):
        for _ in range(REJECTION_TRIES):
            image, scene = draw_scene(rng)
            if len(scene.objects) >= 2:
                break
        else:
            raise RuntimeError(f"no scene with two objects in {REJECTION_TRIES} draws")
        path = image_dir / f"{index:05d}_followup.png"
        image.save(path)
        objs = scene.objects
        base = {"scene": index, "count": len(objs), "objects": _object_meta(scene)}
        describe_attr, pair_attr = ("color", "shape") if index % 2 == 0 else ("shape", "color")

        target = int(rng.integers(len(objs)))
        turns = [{"boxes": [objs[target].box_xyxy], "question": single_prompt(SINGLE_QUESTIONS["describe"])},
                 {"boxes": [], "question": dialogue.followup_question(describe_attr, "it")}]
        meta = {**base, "kind": f"followup_{describe_attr}", "answer": single_answer(describe_attr, objs[target]),
                "target": target, "ref": "it", "after": "describe"}
        items.append({"image": str(path), "turns": turns, "meta": meta})

        i, j = (int(v) for v in rng.choice(len(objs), size=2, replace=False))
        if (index // 2) % 2 == 0:
            kind = "same_shape" if pair_attr == "color" else "same_color"  # not the attribute asked next
            turns = [{"boxes": [objs[i].box_xyxy, objs[j].box_xyxy], "question": pair_prompt(PAIR_QUESTIONS[kind])}]
            number = 1 + int(rng.integers(2))
            after = kind
        else:  # the target was asked the other attribute, the other region this one (a distractor)
            other = "shape" if pair_attr == "color" else "color"
            number = 1 + int(rng.integers(2))
            asked = (other, pair_attr) if number == 1 else (pair_attr, other)
            turns = [{"boxes": [objs[i].box_xyxy], "question": dialogue.turn_prompt(SINGLE_QUESTIONS[asked[0]], 1, 1)},
                     {"boxes": [objs[j].box_xyxy], "question": dialogue.turn_prompt(SINGLE_QUESTIONS[asked[1]], 2, 1)}]
            after = "two_questions"
        ref = dialogue.reference("number" if (index // 4) % 2 == 0 else "ordinal", number)
        turns.append({"boxes": [], "question": dialogue.followup_question(pair_attr, ref)})
        target = (i, j)[number - 1]
        meta = {**base, "kind": f"followup_{pair_attr}", "answer": single_answer(pair_attr, objs[target]),
                "target": target, "ref": ref, "after": after}
        items.append({"image": str(path), "turns": turns, "meta": meta})
    return items


# ----------------------------------------------------------------------------- scoring
def _normalise(answer: str) -> str:
    return answer.strip().rstrip(".").strip().lower()


def _words(answer: str) -> list[str]:
    return re.findall(r"[a-z]+", answer.lower())


def describe_correct(answer: str, objects: list[dict[str, Any]], target: int) -> bool:
    """True if the answer names exactly the target's colour, shape and size (no other)."""
    words = set(_words(answer))
    expected = objects[target]
    return all(
        words & set(vocabulary) == {expected[attribute]}
        for attribute, vocabulary in (("color", COLORS), ("shape", SHAPES), ("size", SIZES))
    )


def said_count(answer: str) -> int | None:
    """The number the answer's first count word names (``"four shapes: ..." -> 4``), or None."""
    numbers = {word: n for n, word in COUNT_WORDS.items()}
    return next((numbers[w] for w in _words(answer) if w in numbers), None)


def count_word_correct(answer: str, expected_count: int) -> bool:
    """True if the answer's first count word is the expected one."""
    return said_count(answer) == expected_count


def score(items: list[dict[str, Any]], answers: list[str]) -> dict[str, dict[str, Any]]:
    """Score ``answers`` (one per item, in order) against the items' ``meta``.

    Returns ``{kind: {"question", "measure", "value", "bar", "passed", "n"}}`` for the
    kinds present; pair kinds add ``"yes_recall"`` and ``"no_recall"``. Exact answers
    ignore case and a trailing period; balanced accuracy is the mean of the recalls
    of the classes present.
    """
    if len(items) != len(answers):
        raise ValueError(f"{len(items)} items but {len(answers)} answers")
    hits: dict[str, list[bool]] = {}
    recalls: dict[str, dict[str, list[bool]]] = {}
    for item, answer in zip(items, answers, strict=True):
        meta = item["meta"]
        kind = meta["kind"]
        if kind == "describe":
            ok = describe_correct(answer, meta["objects"], meta["target"])
        elif kind == "whole":
            ok = count_word_correct(answer, meta["count"])
        else:
            ok = _normalise(answer) == _normalise(meta["answer"])
        hits.setdefault(kind, []).append(ok)
        if kind in PAIR_QUESTIONS:
            recalls.setdefault(kind, {}).setdefault(_normalise(meta["answer"]), []).append(ok)

    results: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        if kind == "followup":
            parts = {name: hits[k] for k, name in FOLLOWUP_KINDS.items() if k in hits}
            if parts:
                question, measure, bar = BARS[kind]
                values = {name: float(np.mean(oks)) for name, oks in parts.items()}
                value = min(values.values())
                results[kind] = {"question": question, "measure": measure, "bar": bar,
                                 "n": sum(len(oks) for oks in parts.values()), "parts": values,
                                 "parts_n": {name: len(oks) for name, oks in parts.items()},
                                 "value": value, "passed": value >= bar}
            continue
        if kind not in hits:
            continue
        question, measure, bar = BARS[kind]
        result: dict[str, Any] = {"question": question, "measure": measure, "bar": bar, "n": len(hits[kind])}
        if kind in PAIR_QUESTIONS:
            by_class = {label: float(np.mean(oks)) for label, oks in recalls[kind].items()}
            result["yes_recall"] = by_class.get("yes", math.nan)
            result["no_recall"] = by_class.get("no", math.nan)
            value = float(np.mean(list(by_class.values())))
        else:
            value = float(np.mean(hits[kind]))
        result["value"] = value
        result["passed"] = value >= bar
        results[kind] = result
    return results


def format_table(scores: dict[str, dict[str, Any]]) -> str:
    """The spec's table as Markdown: question, measure, value, bar, pass/fail."""
    lines = ["| question | measure | value | bar | result |", "| --- | --- | --- | --- | --- |"]
    for kind in KINDS:
        if kind not in scores:
            continue
        s = scores[kind]
        value = f"{100 * s['value']:.1f} % (n={s['n']})"
        if "parts" in s:
            parts = ", ".join(f"{name} {100 * v:.1f} %" for name, v in s["parts"].items())
            value = f"{100 * s['value']:.1f} % ({parts}; n={s['n']})"
        result = "pass" if s["passed"] else "FAIL"
        lines.append(f"| {s['question']} | {s['measure']} | {value} | >= {100 * s['bar']:.0f} % | {result} |")
    return "\n".join(lines)
