"""Write shapes-world splits to disk in the real dataset formats.

Three parts, each with its own random stream derived from one seed, so a part's
content depends only on ``(seed, part, its size)``:

- ``VisualGenome/``: Visual Genome v1.2 (``image_data.json``, ``region_descriptions.json``,
  ``VG_100K/<id>.jpg``); one region per object, phrase ``"a large red circle"``.
- ``LAION/``: webdataset shards ``00000.tar``, ... holding ``<key>.jpg``, ``<key>.json``
  (``caption``, ``width``, ``height``, ``key``) and ``<key>.txt``.
- ``region_instruct/``: LLaVA-style ``instruct.json`` plus ``images/<id>.jpg``.

Instruction records: by default one question/answer pair per record and several
records per image (every object asked every single-region question, up to
``pair_couples`` Yes/No couples per pair question, and the whole-image Describe), so
that a batch mixes images freely; ``turns_per_record > 1`` groups an image's pairs
into multi-turn conversations instead.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from click4caption.shapes.world import (
    PAIR_QUESTIONS,
    SINGLE_QUESTIONS,
    Scene,
    draw_scene,
    find_pairs,
    pair_answer,
    pair_prompt,
    region_phrase,
    single_answer,
    single_prompt,
    whole_image_caption,
)

logger = logging.getLogger(__name__)

PARTS: tuple[str, ...] = ("vg", "laion", "instruct")
#: Stream index of each part: ``numpy.random.default_rng([seed, PART_STREAMS[part]])``.
PART_STREAMS: dict[str, int] = {"vg": 1, "laion": 2, "instruct": 3}
JPEG_QUALITY = 95
VG_URL = "https://cs.stanford.edu/people/rak248/VG_100K/{}.jpg"


def _jpeg_bytes(image: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _scenes(
    seed: int, part: str, count: int, num_objects: int | None, progress: bool
) -> Iterator[tuple[int, Image.Image, Scene, np.random.Generator]]:
    """Yield ``(index, image, scene, rng)`` from one part's deterministic stream."""
    rng = np.random.default_rng([seed, PART_STREAMS[part]])
    for index in tqdm(range(count), desc=part, unit="img", disable=not progress):
        image, scene = draw_scene(rng, num_objects)
        yield index, image, scene, rng


def _dump_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


# ----------------------------------------------------------------------------- Visual Genome
def write_visual_genome(
    root: Path | str, count: int, seed: int, num_objects: int | None = None, progress: bool = False
) -> dict[str, Any]:
    """Write ``count`` scenes as Visual Genome v1.2 under ``root`` (image ids from 1)."""
    root = Path(root)
    (root / "VG_100K").mkdir(parents=True, exist_ok=True)
    image_data, region_descriptions = [], []
    region_id = 0
    for index, image, scene, _ in _scenes(seed, "vg", count, num_objects, progress):
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
) -> dict[str, Any]:
    """Write ``count`` scenes as LAION-style webdataset shards of ``shard_size`` samples."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tar: tarfile.TarFile | None = None
    shards = 0
    try:
        for index, image, scene, _ in _scenes(seed, "laion", count, num_objects, progress):
            if index % shard_size == 0:
                if tar is not None:
                    tar.close()
                tar = tarfile.open(root / f"{shards:05d}.tar", "w", format=tarfile.USTAR_FORMAT)
                shards += 1
            key = f"{index:09d}"
            caption = whole_image_caption(scene)
            meta = {"caption": caption, "width": scene.width, "height": scene.height, "key": key}
            _add_member(tar, f"{key}.jpg", _jpeg_bytes(image))
            _add_member(tar, f"{key}.json", json.dumps(meta).encode("utf-8"))
            _add_member(tar, f"{key}.txt", caption.encode("utf-8"))
    finally:
        if tar is not None:
            tar.close()
    return {"path": str(root), "images": count, "shards": shards}


# ----------------------------------------------------------------------------- region instructions
def scene_questions(scene: Scene, rng: np.random.Generator, pair_couples: int = 1) -> list[dict[str, Any]]:
    """Every question asked about one scene, as ``{"kind", "boxes", "question", "answer"}``.

    Single-region kinds are asked about every object; each pair kind gets up to
    ``pair_couples`` couples of one Yes pair and one No pair (only as many couples as
    the scene has distinct pairs of both answers, so Yes and No stay balanced); the
    whole-image box gets the Describe question answered by the whole-image caption.
    Boxes are ``[x1, y1, x2, y2]`` in original pixels, one per ``[IMG]``.
    """
    questions = []
    for obj in scene.objects:
        for kind, text in SINGLE_QUESTIONS.items():
            questions.append(
                {
                    "kind": kind,
                    "boxes": [obj.box_xyxy],
                    "question": single_prompt(text),
                    "answer": single_answer(kind, obj),
                }
            )
    for kind, text in PAIR_QUESTIONS.items():
        yes, no = find_pairs(scene, kind, "Yes."), find_pairs(scene, kind, "No.")
        couples = min(pair_couples, len(yes), len(no))
        chosen = [yes[k] for k in rng.permutation(len(yes))[:couples]]
        chosen += [no[k] for k in rng.permutation(len(no))[:couples]]
        for i, j in chosen:
            a, b = scene.objects[i], scene.objects[j]
            questions.append(
                {
                    "kind": kind,
                    "boxes": [a.box_xyxy, b.box_xyxy],
                    "question": pair_prompt(text),
                    "answer": pair_answer(kind, a, b),
                }
            )
    questions.append(
        {
            "kind": "whole",
            "boxes": [scene.whole_box],
            "question": single_prompt(SINGLE_QUESTIONS["describe"]),
            "answer": whole_image_caption(scene),
        }
    )
    return questions


def write_region_instruct(
    root: Path | str,
    count: int,
    seed: int,
    turns_per_record: int = 1,
    pair_couples: int = 1,
    num_objects: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Write ``count`` scenes as LLaVA-style region instructions (``instruct.json``).

    Each image's questions are shuffled and grouped ``turns_per_record`` at a time into
    records ``{"id", "image", "boxes", "conversations"}``; ``boxes`` lists one box per
    ``[IMG]`` in order of appearance across the human turns.
    """
    if turns_per_record < 1:
        raise ValueError(f"turns_per_record must be >= 1, got {turns_per_record}")
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    kinds: Counter[str] = Counter()
    answers: Counter[str] = Counter()
    for index, image, scene, rng in _scenes(seed, "instruct", count, num_objects, progress):
        image_id = index + 1
        image.save(root / "images" / f"{image_id}.jpg", format="JPEG", quality=JPEG_QUALITY)
        questions = scene_questions(scene, rng, pair_couples)
        questions = [questions[k] for k in rng.permutation(len(questions))]
        for start in range(0, len(questions), turns_per_record):
            group = questions[start : start + turns_per_record]
            conversations = []
            for q in group:
                conversations += [{"from": "human", "value": q["question"]}, {"from": "gpt", "value": q["answer"]}]
                kinds[q["kind"]] += 1
                if q["kind"].startswith("same_"):
                    answers[f"{q['kind']}:{q['answer']}"] += 1
            records.append(
                {
                    "id": f"{image_id}_{start // turns_per_record}",
                    "image": f"images/{image_id}.jpg",
                    "boxes": [box for q in group for box in q["boxes"]],
                    "conversations": conversations,
                }
            )
    _dump_json(root / "instruct.json", records)
    return {
        "path": str(root / "instruct.json"),
        "images": count,
        "records": len(records),
        "questions": dict(sorted(kinds.items())),
        "pair_answers": dict(sorted(answers.items())),
    }


# ----------------------------------------------------------------------------- everything
def write_shapes_dataset(
    out_dir: Path | str,
    num_images: Mapping[str, int],
    seed: int = 0,
    *,
    laion_shard_size: int = 500,
    turns_per_record: int = 1,
    pair_couples: int = 1,
    num_objects: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the requested parts under ``out_dir``; deterministic for a seed.

    Args:
        out_dir: receives ``VisualGenome/``, ``LAION/`` and ``region_instruct/``.
        num_images: images per part, keys among ``PARTS`` (``"vg"``, ``"laion"``,
            ``"instruct"``); a part missing or set to 0 is not written.
        seed: the seed of every part's random stream.
        laion_shard_size: samples per LAION shard.
        turns_per_record: question/answer pairs per instruction record.
        pair_couples: Yes/No couples per two-region question kind and image.
        num_objects: force the object count of every scene (None: the spec's 2-5).
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
    summary: dict[str, Any] = {"seed": seed}
    if num_images.get("vg", 0):
        summary["vg"] = write_visual_genome(out / "VisualGenome", num_images["vg"], seed, num_objects, progress)
    if num_images.get("laion", 0):
        summary["laion"] = write_laion(
            out / "LAION", num_images["laion"], seed, laion_shard_size, num_objects, progress
        )
    if num_images.get("instruct", 0):
        summary["instruct"] = write_region_instruct(
            out / "region_instruct", num_images["instruct"], seed, turns_per_record, pair_couples, num_objects, progress
        )
    logger.info("shapes dataset written to %s: %s", out, summary)
    return summary
