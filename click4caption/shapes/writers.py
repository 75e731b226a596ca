"""Write shapes-world splits to disk in the real dataset formats.

Three parts, each with its own random stream derived from one seed, so a part's
content depends only on ``(seed, part, its size)``:

- ``VisualGenome/``: Visual Genome v1.2 (``image_data.json``, ``region_descriptions.json``,
  ``VG_100K/<id>.jpg``); one region per object, phrase ``"a large red circle"``.
- ``LAION/``: webdataset shards ``00000.tar``, ... holding ``<key>.jpg``, ``<key>.json``
  (``caption``, ``width``, ``height``, ``key``, ``objects``: every object's box) and ``<key>.txt``.
- ``region_instruct/``: LLaVA-style ``instruct.json`` plus ``images/<id>.jpg``.

Instruction records: an :class:`InstructMix` says what each scene is asked (by default
every spec question about every object, one Yes/No couple per pair question and the
whole-image Describe, one question per record, so that a batch mixes images freely)
and how the questions are grouped into multi-turn conversations with text-only
follow-ups (:mod:`click4caption.shapes.dialogue`).
"""

from __future__ import annotations

import io
import json
import logging
import math
import tarfile
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from click4caption.shapes import dialogue
from click4caption.shapes.variety import draw_varied_scene
from click4caption.shapes.world import (
    PAIR_QUESTIONS,
    SINGLE_QUESTIONS,
    Scene,
    draw_scene,
    find_pairs,
    pair_answer,
    region_phrase,
    single_answer,
    whole_image_caption,
)

logger = logging.getLogger(__name__)

PARTS: tuple[str, ...] = ("vg", "laion", "instruct")
#: Stream index of each part: ``numpy.random.default_rng([seed, PART_STREAMS[part]])``.
PART_STREAMS: dict[str, int] = {"vg": 1, "laion": 2, "instruct": 3}
JPEG_QUALITY = 95
#: a text-only "Are they the same ...?" follow-up answered No is kept with this probability
THEY_NO_KEEP = 0.15
VG_URL = "https://cs.stanford.edu/people/rak248/VG_100K/{}.jpg"


def _jpeg_bytes(image: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _scenes(
    seed: int, part: str, count: int, num_objects: int | None, progress: bool, variety: float = 0.0
) -> Iterator[tuple[int, Image.Image, Scene, np.random.Generator]]:
    """Yield ``(index, image, scene, rng)`` from one part's deterministic stream; with
    ``variety`` > 0 that share of the scenes is laid out and drawn in other styles
    (:func:`click4caption.shapes.variety.draw_varied_scene`)."""
    rng = np.random.default_rng([seed, PART_STREAMS[part]])
    for index in tqdm(range(count), desc=part, unit="img", disable=not progress):
        if variety > 0:
            image, scene = draw_varied_scene(rng, num_objects, variety)
        else:
            image, scene = draw_scene(rng, num_objects)
        yield index, image, scene, rng


def _dump_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


# ----------------------------------------------------------------------------- Visual Genome
def write_visual_genome(
    root: Path | str, count: int, seed: int, num_objects: int | None = None, progress: bool = False,
    variety: float = 0.0,
) -> dict[str, Any]:
    """Write ``count`` scenes as Visual Genome v1.2 under ``root`` (image ids from 1)."""
    root = Path(root)
    (root / "VG_100K").mkdir(parents=True, exist_ok=True)
    image_data, region_descriptions = [], []
    region_id = 0
    for index, image, scene, _ in _scenes(seed, "vg", count, num_objects, progress, variety):
        image_id = index + 1
        image.save(root / "VG_100K" / f"{image_id}.jpg", format="JPEG", quality=JPEG_QUALITY)
        image_data.append(
            {
                "image_id": image_id,
                "url": VG_URL.format(image_id),
                "width": scene.width,
                "height": scene.height,
                "coco_id": None,
                "flickr_id": None,
            }
        )
        regions = []
        for obj in scene.objects:
            region_id += 1
            x, y, w, h = obj.box
            regions.append(
                {
                    "region_id": region_id,
                    "image_id": image_id,
                    "phrase": region_phrase(obj),
                    "x": x,
                    "y": y,
                    "width": w,
                    "height": h,
                }
            )
        region_descriptions.append({"id": image_id, "regions": regions})
    _dump_json(root / "image_data.json", image_data)
    _dump_json(root / "region_descriptions.json", region_descriptions)
    return {"path": str(root), "images": count, "regions": region_id}


# ----------------------------------------------------------------------------- LAION
def scene_object_boxes(scene: Scene) -> list[list[int]]:
    """Every object's ``[x1, y1, x2, y2]`` (original pixels), as the LAION json and the
    whole-image instruction records list them."""
    return [obj.box_xyxy for obj in scene.objects]


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o644  # fixed mtime: byte-identical reruns
    tar.addfile(info, io.BytesIO(payload))


def write_laion(
    root: Path | str,
    count: int,
    seed: int,
    shard_size: int = 500,
    num_objects: int | None = None,
    progress: bool = False,
    variety: float = 0.0,
) -> dict[str, Any]:
    """Write ``count`` scenes as LAION-style webdataset shards of ``shard_size`` samples."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tar: tarfile.TarFile | None = None
    shards = 0
    try:
        for index, image, scene, _ in _scenes(seed, "laion", count, num_objects, progress, variety):
            if index % shard_size == 0:
                if tar is not None:
                    tar.close()
                tar = tarfile.open(root / f"{shards:05d}.tar", "w", format=tarfile.USTAR_FORMAT)
                shards += 1
            key = f"{index:09d}"
            caption = whole_image_caption(scene)
            meta = {"caption": caption, "width": scene.width, "height": scene.height, "key": key,
                    "objects": scene_object_boxes(scene)}
            _add_member(tar, f"{key}.jpg", _jpeg_bytes(image))
            _add_member(tar, f"{key}.json", json.dumps(meta).encode("utf-8"))
            _add_member(tar, f"{key}.txt", caption.encode("utf-8"))
    finally:
        if tar is not None:
            tar.close()
    return {"path": str(root), "images": count, "shards": shards}


# ----------------------------------------------------------------------------- region instructions
@dataclass(frozen=True)
class InstructMix:
    """What the region-instruction records of one scene ask, and how they are grouped.

    Per-object kinds (``describe``, ``color``, ``shape``, ``size``) are expected
    questions per object: ``0.5`` asks about a random half of the objects, ``2`` asks
    every object twice (the two questions land in different places of the stream).
    Pair kinds are Yes/No couples per scene (only as many as the scene has distinct
    pairs of both answers, so Yes and No stay balanced); ``whole`` is whole-image
    Describe questions per scene, ``count`` whole-image ``How many shapes are there?``
    questions (answered with the count word the description starts with).

    The questions of a scene are shuffled and grouped into conversations of 1 to
    ``turns_per_record`` question turns (uniformly), each bringing its own regions,
    named as the demo names them (``image[IMG]`` for a conversation's only region,
    else ``image N[IMG]``). After each turn about objects come on average
    ``followups`` text-only follow-ups about regions already in the conversation
    (:mod:`click4caption.shapes.dialogue`: ``it``, ``they``, ``image N``, ``the first
    one``); 0 writes none. ``hard_no`` is the share of same-shape No pairs drawn among
    pairs of easily confused shapes (:data:`CONFUSED_SHAPES`) where the scene has one.
    ``small`` multiplies the ``describe`` and ``shape`` questions about small objects
    (the kinds that name a shape; a small object's shape is the hardest to read).
    ``followup_shape`` is the weight of a shape follow-up against a colour or size one
    (1) when a follow-up's question is drawn among those its reference allows, and
    ``followup_small`` multiplies that weight again about a small object.
    ``followup_distractor`` multiplies the weight of a follow-up about one region asking
    what another region of the conversation was already asked (its answer is in the
    conversation, a distractor the model must not repeat: the evaluation's follow-ups
    after two one-region questions).
    """

    describe: float = 1.0
    color: float = 1.0
    shape: float = 1.0
    size: float = 1.0
    same_color: int = 1
    same_shape: int = 1
    whole: int = 1
    count: int = 0
    turns_per_record: int = 1
    followups: float = 0.0
    hard_no: float = 0.0
    small: float = 1.0
    followup_shape: float = 1.0
    followup_small: float = 1.0
    followup_distractor: float = 1.0

    def __post_init__(self) -> None:
        if self.turns_per_record < 1:
            raise ValueError(f"turns_per_record must be >= 1, got {self.turns_per_record}")
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        if any(v < 0 for v in values.values()):
            raise ValueError(f"InstructMix values must be >= 0, got {values}")
        if self.hard_no > 1:
            raise ValueError(f"hard_no is a share, at most 1, got {self.hard_no}")


#: the per-object kinds that InstructMix.small multiplies for small objects
SMALL_BOOSTED = ("describe", "shape")

#: shape pairs the shapes model calls "the same shape" most often (models/shapes/REPORT.md,
#: run 7's same-shape errors, both generators: 55 of its 62 wrong "Yes." on these four pairs)
CONFUSED_SHAPES = frozenset(frozenset(p) for p in (("circle", "square"), ("circle", "cross"), ("star", "triangle"),
                                                    ("cross", "star")))


def _no_pairs(scene: Scene, no: list[tuple[int, int]], couples: int, hard_share: float,
              rng: np.random.Generator) -> list[tuple[int, int]]:
    """``couples`` No pairs out of ``no``: each among the confused-shape pairs with
    probability ``hard_share`` (while any is left), else among the others."""
    if hard_share <= 0:
        return [no[k] for k in rng.permutation(len(no))[:couples]]
    confused = [p for p in no if frozenset((scene.objects[p[0]].shape, scene.objects[p[1]].shape)) in CONFUSED_SHAPES]
    others = [p for p in no if p not in confused]
    confused = [confused[k] for k in rng.permutation(len(confused))]
    others = [others[k] for k in rng.permutation(len(others))]
    chosen = []
    for _ in range(couples):
        pool = confused if confused and (not others or rng.random() < hard_share) else others
        chosen.append(pool.pop(0))
    return chosen


def _draw_count(rng: np.random.Generator, expected: float) -> int:
    """``floor(expected)``, plus one with probability ``expected - floor(expected)``."""
    whole = int(math.floor(expected))
    return whole + int(rng.random() < expected - whole)


def scene_tasks(scene: Scene, rng: np.random.Generator, mix: InstructMix) -> list[dict[str, Any]]:
    """The questions that bring regions, as ``{"kind", "objects", "question", "answer"}``.

    ``objects`` lists the asked objects' indices (one, or two for pair kinds), or is
    None for the whole-image box; ``question`` is the bare question (no placeholder).
    """
    tasks: list[dict[str, Any]] = []
    for i, obj in enumerate(scene.objects):
        for kind, text in SINGLE_QUESTIONS.items():
            boost = mix.small if obj.size == "small" and kind in SMALL_BOOSTED else 1.0
            for _ in range(_draw_count(rng, getattr(mix, kind) * boost)):
                tasks.append({"kind": kind, "objects": [i], "question": text, "answer": single_answer(kind, obj)})
    for kind, text in PAIR_QUESTIONS.items():
        yes, no = find_pairs(scene, kind, "Yes."), find_pairs(scene, kind, "No.")
        couples = min(getattr(mix, kind), len(yes), len(no))
        chosen = [yes[k] for k in rng.permutation(len(yes))[:couples]]
        chosen += _no_pairs(scene, no, couples, mix.hard_no if kind == "same_shape" else 0.0, rng)
        for i, j in chosen:
            answer = pair_answer(kind, scene.objects[i], scene.objects[j])
            tasks.append({"kind": kind, "objects": [i, j], "question": text, "answer": answer})
    for _ in range(mix.whole):
        tasks.append({"kind": "whole", "objects": None, "question": SINGLE_QUESTIONS["describe"],
                      "answer": whole_image_caption(scene)})
    for _ in range(mix.count):
        tasks.append({"kind": "count", "objects": None, "question": dialogue.QUESTION_COUNT,
                      "answer": dialogue.count_answer(len(scene.objects))})
    return tasks


def _followup(scene: Scene, regions: list[int | None], last: list[int | None], asked: set[tuple[Any, ...]],
              rng: np.random.Generator, mix: InstructMix) -> tuple[str, str, str, list[int | None]] | None:
    """One text-only follow-up: ``(kind, question, answer, regions it is about)``, or None.

    ``regions`` holds the conversation's regions in order (object index, None for the
    whole image); ``last`` the regions the last turn was about; ``asked`` the
    ``(region position, attribute)`` and ``(pair positions, kind)`` questions already
    asked in the conversation, which are not asked again. A family of reference (``it``,
    ``they``, ``image N``, ``the first one``) is drawn uniformly among those that
    apply, then the region and the attribute (shape follow-ups weighted by ``mix``:
    :func:`_followup_weight`).
    """
    objs = scene.objects
    families: dict[str, list[tuple[str, str, str, list[int | None]]]] = {}
    attributes = list(dialogue.ATTRIBUTE_TEMPLATES)
    if len(last) == 1 and last[0] is not None:
        families["it"] = [(f"followup_{a}", dialogue.followup_question(a, "it"), single_answer(a, objs[last[0]]),
                           last) for a in attributes if (last[0], a) not in asked]
    if len(last) == 2 and None not in last:
        # the pair was drawn balanced for the attribute just asked, so the other one is
        # mostly No: keep a No with the probability that makes Yes and No about even
        families["they"] = [(f"followup_{k}", dialogue.pair_followup_question(k), answer, last)
                            for k in PAIR_QUESTIONS if (tuple(last), k) not in asked
                            for answer in [pair_answer(k, objs[last[0]], objs[last[1]])]
                            if answer == "Yes." or rng.random() < THEY_NO_KEEP]
    numbered = [(n, idx) for n, idx in enumerate(regions, start=1) if idx is not None]
    families["number"] = [(f"followup_{a}", dialogue.followup_question(a, dialogue.reference("number", n)),
                           single_answer(a, objs[idx]), [idx])
                          for n, idx in numbered for a in attributes if (idx, a) not in asked]
    if len(regions) == 2 and None not in regions:
        families["ordinal"] = [(f"followup_{a}", dialogue.followup_question(a, dialogue.reference("ordinal", n)),
                                single_answer(a, objs[idx]), [idx])
                               for n, idx in numbered for a in attributes if (idx, a) not in asked]
    families = {name: options for name, options in families.items() if options}
    if not families:
        return None
    names = sorted(families)
    options = families[names[int(rng.integers(len(names)))]]
    weights = [_followup_weight(kind, about, scene, mix, regions, asked) for kind, _, _, about in options]
    if len(set(weights)) == 1:  # the draw as before the weights, so equal weights redraw old data byte for byte
        pick = int(rng.integers(len(options)))
    else:
        pick = int(rng.choice(len(options), p=np.asarray(weights) / sum(weights)))
    return options[pick]


def _followup_weight(kind: str, about: list[int | None], scene: Scene, mix: InstructMix,
                     regions: list[int | None], asked: set[tuple[Any, ...]]) -> float:
    """How likely a follow-up option is drawn within its reference family: shape
    follow-ups weigh ``mix.followup_shape``, times ``mix.followup_small`` about a small
    object; one that asks a region what another region of the conversation was asked
    (``asked``) is multiplied by ``mix.followup_distractor``; the others weigh 1."""
    if len(about) != 1:  # a pair follow-up ("they")
        return 1.0
    attribute = kind.removeprefix("followup_")
    weight = 1.0
    if kind == "followup_shape":
        small = about[0] is not None and scene.objects[about[0]].size == "small"
        weight = mix.followup_shape * (mix.followup_small if small else 1.0)
    if any((other, attribute) in asked for other in regions if other is not None and other != about[0]):
        weight *= mix.followup_distractor
    return weight


def _asked_key(kind: str, about: list[int | None]) -> tuple[Any, ...]:
    """What a question asked, as :func:`_followup` excludes it: ``(object, attribute)``
    or ``((object, object), pair kind)``; a Describe excludes nothing."""
    return (tuple(about), kind) if len(about) == 2 else (about[0], kind)


def scene_conversations(scene: Scene, rng: np.random.Generator, mix: InstructMix) -> list[dict[str, Any]]:
    """The scene's questions (:func:`scene_tasks`) as conversations.

    Returns ``[{"boxes": [[x1, y1, x2, y2], ...], "turns": [{"kind", "question",
    "answer"}, ...]}, ...]``; ``boxes`` holds one box per ``[IMG]`` in order of appearance.
    """
    tasks = scene_tasks(scene, rng, mix)
    order = [tasks[k] for k in rng.permutation(len(tasks))]
    conversations = []
    start = 0
    while start < len(order):
        size = int(rng.integers(1, mix.turns_per_record + 1))
        group, start = order[start : start + size], start + size
        regions: list[int | None] = []
        asked: set[tuple[Any, ...]] = set()
        boxes: list[list[int]] = []
        turns: list[dict[str, str]] = []
        for task in group:
            new: list[int | None] = task["objects"] or [None]
            prompt = dialogue.turn_prompt(task["question"], len(regions) + 1, len(new))
            regions += new
            boxes += [scene.whole_box if i is None else scene.objects[i].box_xyxy for i in new]
            turns.append({"kind": task["kind"], "question": prompt, "answer": task["answer"]})
            last = new
            asked.add(_asked_key(task["kind"], new))
            for _ in range(_draw_count(rng, mix.followups) if task["objects"] else 0):
                followup = _followup(scene, regions, last, asked, rng, mix)
                if followup is None:
                    break
                kind, question, answer, last = followup
                asked.add(_asked_key(kind.removeprefix("followup_"), last))
                turns.append({"kind": kind, "question": question, "answer": answer})
        conversations.append({"boxes": boxes, "turns": turns})
    return conversations


def write_region_instruct(
    root: Path | str,
    count: int,
    seed: int,
    mix: InstructMix | None = None,
    num_objects: int | None = None,
    progress: bool = False,
    variety: float = 0.0,
) -> dict[str, Any]:
    """Write ``count`` scenes as LLaVA-style region instructions (``instruct.json``).

    Each scene's conversations (:func:`scene_conversations`) become records
    ``{"id": "<image id>_<k>", "image", "boxes", "conversations"}``; ``boxes`` lists one
    box per ``[IMG]`` in order of appearance across the human turns. Every record also
    lists every object's box (``objects``).
    """
    mix = mix or InstructMix()
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    kinds: Counter[str] = Counter()
    answers: Counter[str] = Counter()
    turns_per_record: Counter[int] = Counter()
    for index, image, scene, rng in _scenes(seed, "instruct", count, num_objects, progress, variety):
        image_id = index + 1
        image.save(root / "images" / f"{image_id}.jpg", format="JPEG", quality=JPEG_QUALITY)
        for k, conv in enumerate(scene_conversations(scene, rng, mix)):
            conversations = []
            for turn in conv["turns"]:
                conversations += [{"from": "human", "value": turn["question"]}, {"from": "gpt", "value": turn["answer"]}]
                kinds[turn["kind"]] += 1
                if turn["answer"] in ("Yes.", "No."):
                    answers[f"{turn['kind']}:{turn['answer']}"] += 1
            turns_per_record[len(conv["turns"])] += 1
            record = {"id": f"{image_id}_{k}", "image": f"images/{image_id}.jpg", "boxes": conv["boxes"],
                      "conversations": conversations}
            # what the training aids read: the box-attention aid on whole-image boxes, the
            # object-centre aid on every image
            record["objects"] = scene_object_boxes(scene)
            records.append(record)
    _dump_json(root / "instruct.json", records)
    return {
        "path": str(root / "instruct.json"),
        "images": count,
        "records": len(records),
        "questions": dict(sorted(kinds.items())),
        "pair_answers": dict(sorted(answers.items())),
        "turns_per_record": dict(sorted(turns_per_record.items())),
    }


# ----------------------------------------------------------------------------- everything
def write_shapes_dataset(
    out_dir: Path | str,
    num_images: Mapping[str, int],
    seed: int = 0,
    *,
    laion_shard_size: int = 500,
    mix: InstructMix | None = None,
    num_objects: int | None = None,
    variety: float = 0.0,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the requested parts under ``out_dir``; deterministic for a seed.

    Args:
        out_dir: receives ``VisualGenome/``, ``LAION/`` and ``region_instruct/``.
        num_images: images per part, keys among ``PARTS`` (``"vg"``, ``"laion"``,
            ``"instruct"``); a part missing or set to 0 is not written.
        seed: the seed of every part's random stream.
        laion_shard_size: samples per LAION shard.
        mix: what the region-instruction records ask (:class:`InstructMix`; default:
            every spec question about every object, one question per record).
        num_objects: force the object count of every scene (None: the spec's 2-5).
        variety: share of the scenes laid out and drawn in other styles the spec
            allows (:mod:`click4caption.shapes.variety`); 0 draws every scene as
            :mod:`click4caption.shapes.world` does.
        progress: show a tqdm bar per part.

    Returns:
        ``{"seed": seed, part: part summary, ...}`` for the parts written.
    """
    unknown = set(num_images) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; expected some of {PARTS}")
    if any(n < 0 for n in num_images.values()):
        raise ValueError(f"image counts must be >= 0, got {dict(num_images)}")
    out = Path(out_dir)
    summary: dict[str, Any] = {"seed": seed, "variety": variety}
    if num_images.get("vg", 0):
        summary["vg"] = write_visual_genome(out / "VisualGenome", num_images["vg"], seed, num_objects, progress,
                                            variety)
    if num_images.get("laion", 0):
        summary["laion"] = write_laion(
            out / "LAION", num_images["laion"], seed, laion_shard_size, num_objects, progress, variety
        )
    if num_images.get("instruct", 0):
        summary["instruct"] = write_region_instruct(
            out / "region_instruct", num_images["instruct"], seed, mix, num_objects, progress, variety
        )
    logger.info("shapes dataset written to %s: %s", out, summary)
    return summary
