"""The shapes world obeys design/shapes_world.md, and its files are what the real loaders read."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from click4caption.shapes import world
from click4caption.shapes.__main__ import main as cli_main
from click4caption.shapes.scoring import format_table, make_eval_items, score
from click4caption.shapes.tokenizer import build_shapes_tokenizer
from click4caption.shapes.world import (
    COLORS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    draw_scene,
    pair_answer,
    pair_prompt,
    region_description,
    region_phrase,
    single_answer,
    single_prompt,
    whole_image_caption,
)
from click4caption.shapes.writers import PART_STREAMS, InstructMix, write_shapes_dataset


def nearest_color(rgb: np.ndarray) -> str:
    """Palette name nearest to an RGB value."""
    return min(COLORS, key=lambda name: float(np.sum((np.asarray(COLORS[name]) - rgb) ** 2)))


def center_rgb(image: Image.Image, box_xyxy: list[float]) -> np.ndarray:
    """Mean colour of the 3x3 patch at a box's centre."""
    x1, y1, x2, y2 = box_xyxy
    cx, cy = int((x1 + x2) / 2), int((y1 + y2) / 2)
    return np.asarray(image.convert("RGB"))[cy - 1 : cy + 2, cx - 1 : cx + 2].reshape(-1, 3).mean(0)


def obj(shape: str, color: str, size: str, box: tuple[int, int, int, int]) -> ShapeObject:
    return ShapeObject(shape, color, size, box, COLORS[color])


@pytest.fixture(scope="module")
def scenes() -> list[tuple[Image.Image, Scene]]:
    rng = np.random.default_rng(1234)
    return [draw_scene(rng) for _ in range(150)]


# ----------------------------------------------------------------------------- scenes
def test_scenes_obey_the_spec(scenes: list[tuple[Image.Image, Scene]]) -> None:
    counts = set()
    for image, scene in scenes:
        width, height = scene.width, scene.height
        assert 192 <= width <= 320 and 192 <= height <= 320 and image.size == (width, height)
        assert 100 <= scene.background <= 160 and 0 <= scene.noise_std <= 8
        assert 2 <= len(scene.objects) <= 5
        counts.add(len(scene.objects))
        pixels = np.asarray(image)
        for o in scene.objects:
            x, y, w, h = o.box
            assert w == h and all(isinstance(v, int) for v in o.box)
            lo, hi = SIZES[o.size]
            assert lo * min(width, height) <= w <= hi * min(width, height), (o, width, height)
            assert x >= 2 and y >= 2 and x + w <= width - 2 and y + h <= height - 2
            assert o.shape in SHAPES and o.color in COLORS
            assert np.all(np.abs(np.asarray(o.rgb) - COLORS[o.color]) <= 15)
            # every shape covers its box centre, drawn in the object's colour
            cx, cy = x + w // 2, y + h // 2
            assert tuple(pixels[cy, cx]) == o.rgb
        for a, b in itertools.combinations(scene.objects, 2):
            ax, ay, aw, ah = a.box
            bx, by, bw, bh = b.box
            apart = ax + aw + 4 <= bx or bx + bw + 4 <= ax or ay + ah + 4 <= by or by + bh + 4 <= ay
            assert apart, (a.box, b.box)
        # background outside every box is gray (one noise value shared by the channels)
        mask = np.ones((height, width), bool)
        for o in scene.objects:
            x, y, w, h = o.box
            mask[y : y + h, x : x + w] = False
        bg = pixels[mask].astype(int)
        assert np.all(bg[:, 0] == bg[:, 1]) and np.all(bg[:, 1] == bg[:, 2])
        assert abs(bg[:, 0].mean() - scene.background) < 2
    assert counts == {2, 3, 4, 5}


def test_shapes_are_drawn_as_named(scenes: list[tuple[Image.Image, Scene]]) -> None:
    """Fill fraction of the box and apex-up triangles tell the five shapes apart."""
    fill: dict[str, list[float]] = {s: [] for s in SHAPES}
    for image, scene in scenes:
        pixels = np.asarray(image).astype(int)
        for o in scene.objects:
            x, y, w, h = o.box
            inside = np.all(pixels[y : y + h, x : x + w] == o.rgb, axis=2)
            fill[o.shape].append(inside.mean())
            if o.shape == "triangle":
                assert inside[1].sum() <= 3 and inside[-1].mean() > 0.9
    expected = {
        "square": (0.97, 1.01),
        "circle": (0.72, 0.83),
        "cross": (0.5, 0.62),
        "triangle": (0.44, 0.56),
        "star": (0.2, 0.4),
    }
    for shape, (lo, hi) in expected.items():
        assert fill[shape] and lo <= min(fill[shape]) and max(fill[shape]) <= hi, (
            shape,
            min(fill[shape]),
            max(fill[shape]),
        )


def test_forced_counts_and_determinism() -> None:
    rng = np.random.default_rng(7)
    singles = [draw_scene(rng, num_objects=1)[1] for _ in range(20)]
    assert all(len(s.objects) == 1 for s in singles)
    assert whole_image_caption(singles[0]).startswith("one shape: a ")
    assert max(len(draw_scene(rng, num_objects=4)[1].objects) for _ in range(10)) == 4

    (img_a, scene_a), (img_b, scene_b) = draw_scene(np.random.default_rng(5)), draw_scene(np.random.default_rng(5))
    assert scene_a == scene_b and np.array_equal(np.asarray(img_a), np.asarray(img_b))
    assert draw_scene(np.random.default_rng(6))[1] != scene_a
    with pytest.raises(ValueError):
        draw_scene(rng, num_objects=0)


# ----------------------------------------------------------------------------- language
def test_language() -> None:
    red = obj("circle", "red", "large", (150, 10, 80, 80))
    blue = obj("star", "blue", "small", (10, 100, 40, 40))
    green = obj("square", "green", "small", (100, 150, 40, 40))
    scene = Scene(300, 200, 128, 0.0, [red, blue, green])
    assert region_phrase(red) == "a large red circle"
    assert region_description(red) == "A large red circle."
    assert whole_image_caption(scene) == "three shapes: a small blue star, a small green square and a large red circle"
    assert (
        whole_image_caption(Scene(300, 200, 128, 0.0, [red, blue]))
        == "two shapes: a small blue star and a large red circle"
    )
    assert [single_answer(k, red) for k in ("color", "shape", "size", "describe")] == [
        "Red.",
        "Circle.",
        "Large.",
        "A large red circle.",
    ]
    assert pair_answer("same_color", red, blue) == "No." and pair_answer("same_shape", red, red) == "Yes."
    assert pair_answer("same_color", blue, obj("cross", "blue", "large", (0, 0, 9, 9))) == "Yes."
    assert single_prompt(world.QUESTION_COLOR) == "image[IMG] What color is it?"
    assert pair_prompt(world.QUESTION_SAME_COLOR) == "image 1[IMG] image 2[IMG] Are they the same color?"
    assert world.QUESTION_DESCRIBE == "Tell me what it is and write a description for it."
    assert scene.whole_box == [0, 0, 300, 200]
    with pytest.raises(ValueError):
        single_answer("count", red)


# ----------------------------------------------------------------------------- writers
@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("shapes")
    summary = write_shapes_dataset(
        out, {"vg": 6, "laion": 7, "instruct": 8}, seed=11, laion_shard_size=3, progress=False
    )
    return out, summary


def test_visual_genome_files_point_at_the_objects(dataset: tuple[Path, dict]) -> None:
    out, summary = dataset
    root = out / "VisualGenome"
    image_data = json.loads((root / "image_data.json").read_text())
    regions = json.loads((root / "region_descriptions.json").read_text())
    assert len(image_data) == len(regions) == 6
    assert summary["vg"]["regions"] == sum(len(r["regions"]) for r in regions)
    region_ids = [reg["region_id"] for r in regions for reg in r["regions"]]
    assert len(set(region_ids)) == len(region_ids)
    for info, entry in zip(image_data, regions, strict=True):
        assert entry["id"] == info["image_id"] and info["coco_id"] is None and info["flickr_id"] is None
        image = Image.open(root / Path(*info["url"].split("/")[-2:]))
        assert image.format == "JPEG" and image.size == (info["width"], info["height"])
        for reg in entry["regions"]:
            size, color, shape = re.fullmatch(r"a (\w+) (\w+) (\w+)", reg["phrase"]).groups()
            assert size in SIZES and shape in SHAPES and reg["width"] == reg["height"]
            box = [reg["x"], reg["y"], reg["x"] + reg["width"], reg["y"] + reg["height"]]
            assert nearest_color(center_rgb(image, box)) == color


def test_laion_shards_read_with_webdataset(dataset: tuple[Path, dict]) -> None:
    import webdataset as wds

    out, summary = dataset
    shards = sorted((out / "LAION").glob("*.tar"))
    assert [p.name for p in shards] == ["00000.tar", "00001.tar", "00002.tar"] and summary["laion"]["shards"] == 3
    samples = list(wds.WebDataset([str(p) for p in shards], shardshuffle=False, empty_check=False).decode("pil"))
    assert len(samples) == 7
    rng = np.random.default_rng([11, PART_STREAMS["laion"]])  # the part's own stream draws the same scenes
    for sample in samples:
        image, scene = draw_scene(rng)
        meta = sample["json"]
        assert meta["caption"] == sample["txt"] == whole_image_caption(scene) == meta["caption"]
        assert meta["key"] == sample["__key__"] and sample["jpg"].size == (meta["width"], meta["height"])
        assert meta["objects"] == [obj.box_xyxy for obj in scene.objects]
        assert np.abs(np.asarray(sample["jpg"], dtype=int) - np.asarray(image, dtype=int)).mean() < 4


def test_region_instruct_records(dataset: tuple[Path, dict]) -> None:
    out, _ = dataset
    root = out / "region_instruct"
    records = json.loads((root / "instruct.json").read_text())
    answers: dict[str, list[str]] = {"same_color": [], "same_shape": []}
    wholes = 0
    for rec in records:
        image = Image.open(root / rec["image"])
        humans = [t["value"] for t in rec["conversations"][0::2]]
        replies = [t["value"] for t in rec["conversations"][1::2]]
        assert [t["from"] for t in rec["conversations"]] == ["human", "gpt"] * len(humans)
        assert sum(h.count("[IMG]") for h in humans) == len(rec["boxes"]) and len(humans) == 1
        question, reply, boxes = humans[0], replies[0], rec["boxes"]
        colors = [nearest_color(center_rgb(image, b)) for b in boxes]
        assert len(rec["objects"]) >= 2  # every object's box, in every record (the training aids read them)
        assert all(any(b == o for o in rec["objects"]) for b in boxes if b != [0, 0, *image.size])
        if boxes[0] == [0, 0, *image.size]:
            wholes += 1
            assert question == single_prompt(world.QUESTION_DESCRIBE) and " shape" in reply.split(":")[0]
            listed = [nearest_color(center_rgb(image, b)) for b in sorted(rec["objects"], key=lambda b: b[0] + b[2])]
            assert reply.split(":")[0] == f"{world.COUNT_WORDS[len(rec['objects'])]} shapes"
            assert [p.split()[-2] for p in re.split(r", | and ", reply.split(": ")[1])] == listed
        elif question == single_prompt(world.QUESTION_COLOR):
            assert reply == colors[0].capitalize() + "."
        elif question == single_prompt(world.QUESTION_DESCRIBE):
            assert re.fullmatch(r"A (small|large) (\w+) (\w+)\.", reply).group(2) == colors[0]
        elif question == pair_prompt(world.QUESTION_SAME_COLOR):
            answers["same_color"].append(reply)
            assert reply == ("Yes." if colors[0] == colors[1] else "No.") and boxes[0] != boxes[1]
        elif question == pair_prompt(world.QUESTION_SAME_SHAPE):
            answers["same_shape"].append(reply)
        else:
            assert question in (single_prompt(world.QUESTION_SHAPE), single_prompt(world.QUESTION_SIZE))
    assert wholes == 8
    for kind, replies in answers.items():
        assert replies and replies.count("Yes.") == replies.count("No."), kind


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


def test_writer_is_deterministic_and_multi_turn(tmp_path: Path) -> None:
    counts = {"vg": 2, "laion": 2, "instruct": 2}
    write_shapes_dataset(tmp_path / "a", counts, seed=3, progress=False)
    write_shapes_dataset(tmp_path / "b", counts, seed=3, progress=False)
    write_shapes_dataset(tmp_path / "c", counts, seed=4, progress=False)
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b") != _tree_digest(tmp_path / "c")

    mix = InstructMix(turns_per_record=4, followups=1.0, same_shape=2)
    summary = write_shapes_dataset(tmp_path / "d", {"instruct": 6}, seed=3, mix=mix, progress=False)
    records = json.loads((tmp_path / "d" / "region_instruct" / "instruct.json").read_text())
    assert summary["instruct"]["records"] == len(records)
    assert max(len(r["conversations"]) for r in records) > 8  # up to 4 question turns plus follow-ups
    followups = 0
    for rec in records:
        image = Image.open(tmp_path / "d" / "region_instruct" / rec["image"])
        humans = [t["value"] for t in rec["conversations"][0::2]]
        replies = [t["value"] for t in rec["conversations"][1::2]]
        img_count = sum(h.count("[IMG]") for h in humans)
        assert img_count == len(rec["boxes"])
        assert humans[0].count("[IMG]") >= 1  # a conversation starts with a question bringing its regions
        # regions are named as the demo names them: "image" alone, else "image N" counted over the conversation
        names = re.findall(r"(image(?: \d+)?)\[IMG\]", " ".join(humans))
        expected = [f"image {n}" for n in range(1, img_count + 1)]
        if humans[0].count("[IMG]") == 1:
            expected[0] = "image"
        assert names == expected
        # every follow-up about one region is answered by that region's pixels
        numbered = list(rec["boxes"])
        last: list[list[float]] = []
        seen = 0
        for human, reply in zip(humans, replies, strict=True):
            new = human.count("[IMG]")
            if new:
                last = numbered[seen : seen + new]
                seen += new
                continue
            followups += 1
            match = re.fullmatch(r"What color is (it|image (\d)|the (first|second) one)\?", human)
            if match:
                if match.group(1) == "it":
                    box = last[0]
                elif match.group(2):
                    box = numbered[int(match.group(2)) - 1]
                else:
                    box = numbered[("first", "second").index(match.group(3))]
                assert reply == nearest_color(center_rgb(image, box)).capitalize() + ".", (human, reply)
            else:
                assert re.fullmatch(r"(What shape is|Is) (it|they|image \d|the (first|second) one)( large or small)?\?"
                                    r"|Are they the same (color|shape)\?", human), human
    assert followups > 10
    assert all(re.fullmatch(r"[A-Z][a-z]+\.|A (small|large) \w+ \w+\.|\w+ shapes?: .*", t["value"])
               for rec in records for t in rec["conversations"][1::2])
    with pytest.raises(ValueError):
        write_shapes_dataset(tmp_path / "e", {"coco": 1}, progress=False)
    with pytest.raises(ValueError):
        InstructMix(turns_per_record=0)
    with pytest.raises(ValueError):
        InstructMix(hard_no=1.5)


def test_hard_same_shape_negatives() -> None:
    """``hard_no``: same-shape No pairs drawn among the confused shape pairs; 0 draws
    exactly as before (the data of earlier recipes is unchanged)."""
    from click4caption.shapes.writers import CONFUSED_SHAPES, scene_tasks

    objects = [world.ShapeObject(shape, "red", "large", (10 + 60 * k, 10, 50, 50), (255, 0, 0))
               for k, shape in enumerate(("circle", *SHAPES))]  # one Yes pair (two circles), both orders
    scene = world.Scene(width=380, height=80, background=128, objects=objects)

    def no_pairs(mix: InstructMix, seed: int) -> list[frozenset]:
        tasks = scene_tasks(scene, np.random.default_rng(seed), mix)
        return [frozenset(objects[i].shape for i in t["objects"]) for t in tasks
                if t["kind"] == "same_shape" and t["answer"] == "No."]

    base = dict(describe=0, color=0, shape=0, size=0, same_color=0, whole=0, same_shape=3)
    hard = [p for seed in range(30) for p in no_pairs(InstructMix(**base, hard_no=1.0), seed)]
    assert len(hard) == 60 and all(p in CONFUSED_SHAPES for p in hard)  # 2 couples: as many as Yes pairs
    plain = [p for seed in range(30) for p in no_pairs(InstructMix(**base), seed)]
    assert len(plain) == 60 and 0.25 < sum(p in CONFUSED_SHAPES for p in plain) / 60 < 0.75  # 16 of 28 pairs
    tasks = scene_tasks(scene, np.random.default_rng(3), InstructMix(**base))
    rng = np.random.default_rng(3)  # hard_no 0 draws as the writer always did: Yes pairs, then No pairs
    rng.random(len(objects) * len(world.SINGLE_QUESTIONS))  # the single questions' draws (none asked)
    for kind in world.PAIR_QUESTIONS:
        yes, no = world.find_pairs(scene, kind, "Yes."), world.find_pairs(scene, kind, "No.")
        n = min(base[kind], len(yes), len(no))
        expect = [yes[k] for k in rng.permutation(len(yes))[:n]] + [no[k] for k in rng.permutation(len(no))[:n]]
    assert [t["objects"] for t in tasks if t["kind"] == "same_shape"] == [list(p) for p in expect]


# ----------------------------------------------------------------------------- tokenizer
def language_texts() -> list[str]:
    """Every kind of text the shapes language and the conversation template produce."""
    rng = np.random.default_rng(0)
    texts = []
    for size, color, shape in itertools.product(SIZES, COLORS, SHAPES):
        o = obj(shape, color, size, (0, 0, 1, 1))
        texts += [region_phrase(o), *(single_answer(k, o) for k in world.SINGLE_QUESTIONS)]
    texts += [whole_image_caption(draw_scene(rng, n)[1]) for n in (1, 2, 3, 4, 5, None, None)]
    texts += [re.sub(r'[.!"()*#:;~]', " ", t.lower()) for t in texts[-7:]]  # as the LAION loader cleans them
    texts += ["Yes.", "No."]
    from click4caption.shapes import dialogue

    prompts = [single_prompt(q) for q in world.SINGLE_QUESTIONS.values()]
    prompts += [pair_prompt(q) for q in world.PAIR_QUESTIONS.values()]
    prompts += [dialogue.turn_prompt(dialogue.QUESTION_COUNT, 3, 1), dialogue.turn_prompt(world.QUESTION_SIZE, 12, 1)]
    prompts += [dialogue.followup_question(a, dialogue.reference(kind, n)) for a in dialogue.ATTRIBUTE_TEMPLATES
                for kind, n in (("it", 0), ("number", 7), ("ordinal", 1), ("ordinal", 2))]
    texts += [dialogue.count_answer(n) for n in (2, 3, 4, 5)]
    texts += [f"### Human: {p}\n### Assistant:" for p in prompts]
    answers = ["A large red circle.", "Red.", "Circle."]
    texts += [f"### Human: {p}\n### Assistant: {a}\n###" for p, a in zip(prompts[:3], answers, strict=True)]
    texts += [f"{a}###" for a in answers]  # a training target: caption + stop sequence
    return texts


def test_tokenizer_round_trips(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    build_shapes_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) < 200
    assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == ("<unk>", "<s>", "</s>", "[PAD]")
    assert tok.pad_token_id == len(tok) - 1 and tok.unk_token_id == 0
    for text in language_texts():
        # split at [IMG] as the model does: only the first piece gets BOS
        first, *rest = text.split("[IMG]")
        ids = tok(first).input_ids + [i for p in rest for i in tok(p, add_special_tokens=False).input_ids]
        assert ids[0] == tok.bos_token_id and tok.bos_token_id not in ids[1:] and tok.eos_token_id not in ids
        assert tok.unk_token_id not in ids, (text, tok.convert_ids_to_tokens(ids))
        assert tok.decode(ids, skip_special_tokens=True) == text.replace("[IMG]", "")
        plain = text.replace("[IMG]", "")
        assert tok.decode(tok(plain).input_ids, skip_special_tokens=True) == plain
        assert len(tok(plain, add_special_tokens=False).input_ids) == len(tok(plain).input_ids) - 1
    stop = tok("###", add_special_tokens=False).input_ids
    assert tok.decode(stop) == "###" and len(stop) == 1
    assert "\n" in tok.convert_ids_to_tokens(tok("a\nb").input_ids)
    assert tok("a zebra", add_special_tokens=False).input_ids[-1] == tok.unk_token_id
    assert (
        len(
            tok(
                whole_image_caption(
                    Scene(320, 320, 128, 0.0, [obj("circle", "red", "small", (i * 60, 0, 50, 50)) for i in range(5)])
                ),
                add_special_tokens=False,
            ).input_ids
        )
        <= 31
    )


# ----------------------------------------------------------------------------- scoring
@pytest.fixture(scope="module")
def eval_items(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return make_eval_items(seed=21, num_scenes=40, image_dir=tmp_path_factory.mktemp("eval"))


def test_eval_items_format(eval_items: list[dict]) -> None:
    kinds = [it["meta"]["kind"] for it in eval_items]
    assert {k: kinds.count(k) for k in set(kinds)} == {
        k: 40 for k in ("describe", "color", "shape", "size", "whole", "same_color", "same_shape")
    }
    for item in eval_items:
        image = Image.open(item["image"])
        meta = item["meta"]
        assert item["question"].count("[IMG]") == len(item["boxes"])
        if meta["kind"] == "whole":
            assert item["boxes"] == [[0, 0, *image.size]] and item["question"] == single_prompt(world.QUESTION_DESCRIBE)
        elif meta["kind"] == "color":
            assert meta["answer"] == nearest_color(center_rgb(image, item["boxes"][0])).capitalize() + "."
    for kind in ("same_color", "same_shape"):
        replies = [it["meta"]["answer"] for it in eval_items if it["meta"]["kind"] == kind]
        assert replies.count("Yes.") == replies.count("No.") == 20


def _answer_from(kind: str, objects: list[dict], indices: list[int]) -> str:
    """Answer as the generator would, about the objects at ``indices``."""
    os = [obj(o["shape"], o["color"], o["size"], tuple(o["box"])) for o in (objects[i] for i in indices)]
    if kind in world.PAIR_QUESTIONS:
        return pair_answer(kind, *os)
    if kind == "whole":
        return region_description(os[0])  # a box-blind model describes one object, with no count
    return single_answer(kind, os[0])


def test_scores_of_perfect_and_box_blind_predictors(eval_items: list[dict]) -> None:
    perfect = score(eval_items, [it["meta"]["answer"] for it in eval_items])
    assert all(s["value"] == 1.0 and s["passed"] for s in perfect.values()) and len(perfect) == 7
    assert "FAIL" not in format_table(perfect)

    rng = np.random.default_rng(0)
    blind_answers = []
    for it in eval_items:
        meta = it["meta"]
        n = len(meta["objects"])
        indices = (
            list(rng.choice(n, size=2, replace=False))
            if meta["kind"] in world.PAIR_QUESTIONS
            else [int(rng.integers(n))]
        )
        blind_answers.append(_answer_from(meta["kind"], meta["objects"], indices))
    blind = score(eval_items, blind_answers)
    for kind in ("describe", "color", "shape", "size"):
        assert blind[kind]["value"] < 0.75 and not blind[kind]["passed"], (kind, blind[kind])
    for kind in ("same_color", "same_shape"):
        assert blind[kind]["value"] < 0.8 and not blind[kind]["passed"], (kind, blind[kind])
    assert blind["whole"]["value"] == 0.0
    assert format_table(blind).count("FAIL") == 7


def test_score_parsing() -> None:
    o = [{"shape": "circle", "color": "red", "size": "large", "box": [0, 0, 9, 9]}]
    items = [
        {"meta": {"kind": "color", "answer": "Red.", "objects": o, "target": 0}},
        {"meta": {"kind": "color", "answer": "Red.", "objects": o, "target": 0}},
        {"meta": {"kind": "describe", "answer": "A large red circle.", "objects": o, "target": 0}},
        {"meta": {"kind": "describe", "answer": "A large red circle.", "objects": o, "target": 0}},
        {"meta": {"kind": "whole", "answer": "one shape: a large red circle", "objects": o, "count": 1}},
        {"meta": {"kind": "same_shape", "answer": "Yes."}},
        {"meta": {"kind": "same_shape", "answer": "No."}},
        {"meta": {"kind": "same_shape", "answer": "No."}},
    ]
    answers = [
        " red ",
        "Red circle.",
        "a red LARGE circle",
        "A large red circle and a blue star.",
        "One shape.",
        "yes",
        "Yes.",
        "no",
    ]
    s = score(items, answers)
    assert s["color"]["value"] == 0.5 and s["describe"]["value"] == 0.5 and s["whole"]["value"] == 1.0
    assert (
        s["same_shape"]["yes_recall"] == 1.0
        and s["same_shape"]["no_recall"] == 0.5
        and s["same_shape"]["value"] == 0.75
    )
    with pytest.raises(ValueError):
        score(items, answers[:-1])


# ----------------------------------------------------------------------------- CLI
def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert cli_main(["--out", str(out), "--seed", "2", "--vg", "2", "--instruct", "1", "--no-progress"]) == 0
    line = capsys.readouterr().out.strip()
    assert "vg 2 images" in line and "instruct 1 images" in line and "\n" not in line
    assert (out / "VisualGenome" / "region_descriptions.json").exists() and not (out / "LAION").exists()
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--out", str(out), "--vg", "1", "--no-progress"])  # exists already
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        cli_main(["--out", str(tmp_path / "x")])  # nothing to write
    with pytest.raises(SystemExit):
        cli_main(["--out", str(tmp_path / "x"), "--vg", "-1"])


# ----------------------------------------------------------------------------- follow-ups
def test_dialogue_names_regions_as_the_demo_does() -> None:
    from click4caption_apps.demo.session import prepare_question

    from click4caption.shapes import dialogue

    assert dialogue.turn_prompt("What color is it?", 1, 1) == "image[IMG] What color is it?"
    assert dialogue.turn_prompt("Are they the same shape?", 1, 2) == pair_prompt(world.QUESTION_SAME_SHAPE)
    assert dialogue.turn_prompt("What color is it?", 3, 1) == "image 3[IMG] What color is it?"
    # the demo inserts the same placeholders when the user types none
    assert prepare_question("What color is it?", 1, 2)[0] == dialogue.turn_prompt("What color is it?", 3, 1)
    assert prepare_question("What color is it?", 1, 0)[0] == dialogue.turn_prompt("What color is it?", 1, 1)
    assert prepare_question("Are they the same shape?", 2, 0)[0] == dialogue.turn_prompt("Are they the same shape?", 1, 2)
    assert dialogue.followup_question("color", "it") == world.QUESTION_COLOR
    assert dialogue.followup_question("size", "it") == world.QUESTION_SIZE
    assert dialogue.followup_question("shape", dialogue.reference("number", 2)) == "What shape is image 2?"
    assert dialogue.followup_question("color", dialogue.reference("ordinal", 1)) == "What color is the first one?"
    with pytest.raises(ValueError):
        dialogue.reference("third", 3)


@pytest.fixture(scope="module")
def followup_items(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    from click4caption.shapes.scoring import make_followup_items

    return make_followup_items(seed=21, num_scenes=24, image_dir=tmp_path_factory.mktemp("followups"))


def test_followup_items(followup_items: list[dict]) -> None:
    kinds = [it["meta"]["kind"] for it in followup_items]
    assert kinds.count("followup_color") == kinds.count("followup_shape") == 24
    refs = {it["meta"]["ref"].split()[0] for it in followup_items}
    afters = {it["meta"]["after"] for it in followup_items}
    assert refs == {"it", "image", "the"} and afters == {"describe", "same_color", "same_shape", "two_questions"}
    for item in followup_items:
        image = Image.open(item["image"])
        turns, meta = item["turns"], item["meta"]
        assert turns[-1]["boxes"] == [] and "[IMG]" not in turns[-1]["question"]
        assert all(t["question"].count("[IMG]") == len(t["boxes"]) >= 1 for t in turns[:-1])
        boxes = [b for t in turns for b in t["boxes"]]
        match = re.fullmatch(r"What (color|shape) is (it|image (\d)|the (first|second) one)\?", turns[-1]["question"])
        assert match and meta["kind"] == f"followup_{match.group(1)}"
        number = 1 if match.group(2) == "it" else int(match.group(3) or ("first", "second").index(match.group(4)) + 1)
        target = meta["objects"][meta["target"]]
        assert boxes[number - 1] == [target["box"][0], target["box"][1], target["box"][0] + target["box"][2],
                                     target["box"][1] + target["box"][3]]
        if match.group(1) == "color":
            assert meta["answer"] == nearest_color(center_rgb(image, boxes[number - 1])).capitalize() + "."
        if meta["after"] == "two_questions":  # the other region was asked exactly this attribute
            other = turns[2 - number]["question"]
            assert ("color" if "color" in other else "shape") == match.group(1)


def test_followup_row(followup_items: list[dict], eval_items: list[dict]) -> None:
    perfect = score(followup_items, [it["meta"]["answer"] for it in followup_items])
    assert set(perfect) == {"followup"} and perfect["followup"]["parts"] == {"colour": 1.0, "shape": 1.0}
    assert perfect["followup"]["value"] == 1.0 and perfect["followup"]["passed"]
    # answering about the wrong region (the other one of two), or "Yes." to a colour question
    wrong = []
    for it in followup_items:
        meta = it["meta"]
        attribute = meta["kind"].removeprefix("followup_")
        others = [o for k, o in enumerate(meta["objects"]) if k != meta["target"] and o[attribute] != meta["objects"][meta["target"]][attribute]]
        wrong.append(others[0][attribute].capitalize() + "." if others and attribute == "shape" else "Yes.")
    bad = score(followup_items, wrong)
    assert bad["followup"]["value"] < 0.5 and not bad["followup"]["passed"]
    both = score(eval_items + followup_items, [it["meta"]["answer"] for it in eval_items + followup_items])
    table = format_table(both)
    assert len(table.splitlines()) == 2 + 8 and "Follow-up" in table.splitlines()[-1] and "colour 100.0 %" in table


# ----------------------------------------------------------------------------- held-out generator
def test_heldout_generator_follows_the_spec(tmp_path: Path) -> None:
    from click4caption.shapes.heldout import LAYOUTS, draw_heldout_scene, make_heldout_items

    rng = np.random.default_rng(3)
    counts = set()
    for k in range(60):
        image, scene = draw_heldout_scene(rng, LAYOUTS[k % len(LAYOUTS)])
        width, height = scene.width, scene.height
        assert 192 <= width <= 320 and 192 <= height <= 320 and image.size == (width, height)
        assert 1 <= len(scene.objects) <= 5
        counts.add(len(scene.objects))
        for o in scene.objects:
            x, y, w, h = o.box
            lo, hi = SIZES[o.size]
            assert w == h and lo * min(width, height) <= w <= hi * min(width, height)
            assert x >= 2 and y >= 2 and x + w <= width - 2 and y + h <= height - 2
            assert nearest_color(center_rgb(image, o.box_xyxy)) == o.color  # noise is small next to the palette
        for a, b in itertools.combinations(scene.objects, 2):
            ax, ay, aw, ah = a.box
            bx, by, bw, bh = b.box
            assert ax + aw + 4 <= bx or bx + bw + 4 <= ax or ay + ah + 4 <= by or by + bh + 4 <= ay
    assert {2, 3, 4, 5} <= counts
    items = make_heldout_items(5, 8, tmp_path)
    kinds = [it["meta"]["kind"] for it in items]
    assert {k: kinds.count(k) for k in set(kinds)} == {k: 8 for k in ("describe", "color", "shape", "size", "whole",
                                                                      "same_color", "same_shape")}
    perfect = score(items, [it["meta"]["answer"] for it in items])
    assert all(s["value"] == 1.0 for s in perfect.values())


def test_varied_training_scenes_follow_the_spec() -> None:
    from click4caption.shapes.variety import draw_varied_scene

    rng = np.random.default_rng(8)
    for _ in range(80):
        image, scene = draw_varied_scene(rng)
        width, height = scene.width, scene.height
        assert image.size == (width, height) and 1 <= len(scene.objects) <= 5
        for o in scene.objects:
            x, y, w, h = o.box
            lo, hi = SIZES[o.size]
            assert w == h and lo * min(width, height) <= w <= hi * min(width, height)
            assert x >= 2 and y >= 2 and x + w <= width - 2 and y + h <= height - 2
            assert nearest_color(center_rgb(image, o.box_xyxy)) == o.color
        for a, b in itertools.combinations(scene.objects, 2):
            ax, ay, aw, ah = a.box
            bx, by, bw, bh = b.box
            assert ax + aw + 4 <= bx or bx + bw + 4 <= ax or ay + ah + 4 <= by or by + bh + 4 <= ay


def test_small_multiplies_the_shape_naming_questions_of_small_objects_only() -> None:
    from click4caption.shapes.writers import InstructMix, scene_tasks

    objects = [world.ShapeObject("star", "red", "small", (10, 10, 40, 40), (220, 40, 40)),
               world.ShapeObject("circle", "blue", "large", (80, 80, 90, 90), (40, 80, 220))]
    scene = world.Scene(256, 256, 130, 0.0, objects)
    base = dict(describe=0.5, color=0.5, shape=0.5, size=0.5, same_color=0, same_shape=0, whole=0)

    def asked(mix: InstructMix) -> dict[tuple[int, str], int]:
        out: dict[tuple[int, str], int] = {}
        for seed in range(400):
            for t in scene_tasks(scene, np.random.default_rng(seed), mix):
                key = (t["objects"][0], t["kind"])
                out[key] = out.get(key, 0) + 1
        return out

    plain, boosted = asked(InstructMix(**base)), asked(InstructMix(**base, small=4.0))
    for kind in ("describe", "shape"):  # 0.5 -> 2 per scene for the small star
        assert 160 <= plain[(0, kind)] <= 240 and boosted[(0, kind)] == 800
        assert 160 <= boosted[(1, kind)] <= 240  # the large circle as before
    for kind in ("color", "size"):
        assert 160 <= boosted[(0, kind)] <= 240


def test_followup_shape_and_followup_small_weigh_shape_follow_ups() -> None:
    from click4caption.shapes.writers import InstructMix, scene_conversations

    def shape_share(size: str, **weights: float) -> float:
        side = 40 if size == "small" else 90
        scene = world.Scene(256, 256, 130, 0.0, [world.ShapeObject("star", "red", size, (10, 10, side, side),
                                                                   (220, 40, 40))])
        mix = InstructMix(describe=1.0, color=0, shape=0, size=0, same_color=0, same_shape=0, whole=0,
                          followups=1.0, **weights)
        kinds = [t["kind"] for seed in range(600)
                 for conv in scene_conversations(scene, np.random.default_rng(seed), mix)
                 for t in conv["turns"] if t["kind"].startswith("followup_")]
        # one follow-up per Describe (two of them about a small object when small=2)
        assert len(kinds) >= 600 and set(kinds) <= {"followup_color", "followup_shape", "followup_size"}
        return kinds.count("followup_shape") / len(kinds)

    # colour, shape and size equally likely by default, for small and large objects alike
    # (small, which multiplies the single questions, leaves the follow-ups as they were)
    assert abs(shape_share("small") - 1 / 3) < 0.06 and abs(shape_share("small", small=2.0) - 1 / 3) < 0.06
    assert abs(shape_share("large", followup_small=4.0) - 1 / 3) < 0.06
    # weights 3 : 1 : 1 for a large object, 3 * 2 : 1 : 1 for a small one
    assert abs(shape_share("large", followup_shape=3.0, followup_small=2.0) - 3 / 5) < 0.06
    assert abs(shape_share("small", followup_shape=3.0, followup_small=2.0) - 6 / 8) < 0.06
    assert abs(shape_share("small", followup_small=2.0) - 2 / 4) < 0.06


def test_followup_distractor_weighs_questions_whose_answer_another_region_gave() -> None:
    """Image 1 was asked its shape and image 2 its colour: of the follow-ups left (``it``:
    shape / size of image 2; ``image N`` and ``the first one``: colour / size of image 1,
    shape / size of image 2), half ask what the other region was asked; weighed 3 : 1,
    three quarters do."""
    from click4caption.shapes.writers import InstructMix, _followup

    scene = world.Scene(256, 256, 130, 0.0, [world.ShapeObject("star", "red", "large", (10, 10, 90, 90), (220, 40, 40)),
                                             world.ShapeObject("circle", "blue", "large", (120, 120, 200, 200),
                                                               (40, 40, 220))])
    asked = {(0, "shape"), (1, "color")}

    def distractor_share(**weights: float) -> float:
        mix = InstructMix(followups=1.0, **weights)
        hits = []
        for seed in range(1500):
            kind, _, _, about = _followup(scene, [0, 1], [1], set(asked), np.random.default_rng(seed), mix)
            hits.append((1 - about[0], kind.removeprefix("followup_")) in asked)
        return sum(hits) / len(hits)

    assert abs(distractor_share() - 1 / 2) < 0.05
    assert abs(distractor_share(followup_distractor=3.0) - 3 / 4) < 0.05
    assert distractor_share(followup_distractor=0.0) == 0.0
