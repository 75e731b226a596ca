"""The demo's logic without a browser: clicks -> boxes, placeholders, thumbnails,
drawing, the shipped example scenes, and the shared model wrapper on a tiny model."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from click4caption.paths import EXAMPLES_DIR
from click4caption.shapes.examples import example_scene_records, load_example_scenes
from click4caption_apps.demo_app import (
    ClickState,
    Session,
    as_point,
    box_from_clicks,
    crop_thumbnail,
    display_image,
    display_scale,
    draw_selection,
    prepare_question,
    region_name,
    register_click,
    settings_from_controls,
    to_image_point,
)
from click4caption.prompts import DESCRIBE_PROMPT, vicuna_v0
from click4caption.errors import InputError


# ----------------------------------------------------------------------------- clicks and boxes
def test_first_click_is_remembered_and_second_gives_the_box():
    state, box = register_click(ClickState(), (10, 20))
    assert box is None and state.waiting_for_second and state.first == (10, 20)
    state, done = register_click(state, (50, 70))
    assert done == ((10.0, 20.0, 50.0, 70.0), False)
    assert state == ClickState() and not state.waiting_for_second


def test_a_third_click_starts_a_new_box():
    state = ClickState()
    for point in [(1, 2), (30, 40)]:
        state, _ = register_click(state, point)
    state, box = register_click(state, (5, 6))
    assert box is None and state.first == (5, 6)
    state, done = register_click(state, (9, 9))
    assert done is not None and done[0] == (5.0, 6.0, 9.0, 9.0)


@pytest.mark.parametrize("first, second", [
    ((10, 20), (50, 70)),  # top-left then bottom-right
    ((50, 70), (10, 20)),  # bottom-right then top-left
    ((50, 20), (10, 70)),  # top-right then bottom-left
    ((10, 70), (50, 20)),  # bottom-left then top-right
])
def test_box_from_clicks_in_any_order(first, second):
    box, swapped = box_from_clicks(first, second)
    assert box == (10.0, 20.0, 50.0, 70.0)
    assert swapped == (first != (10, 20))


def test_as_point_reads_select_data_and_refuses_missing_coordinates():
    assert as_point([3, 4]) == (3, 4)
    assert as_point((3.6, 4.2)) == (4, 4)
    for bad in (None, [1], "x", [None, 2]):
        with pytest.raises(InputError, match="inside the picture"):
            as_point(bad)


def test_canvas_clicks_map_back_to_image_pixels():
    w, h = 267, 212
    s = display_scale(w, h)
    assert round(w * s) == 512  # the longer side is shown at 512 px
    for x, y in [(0, 0), (74, 35), (156, 117), (266, 211), (267, 212)]:
        assert to_image_point((round(x * s), round(y * s)), s, w, h) == (x, y)
    # clicks past the picture's edge stay inside the image
    assert to_image_point((10_000, -5), s, w, h) == (w, 0)
    big = display_scale(2000, 1000)
    assert big < 1 and to_image_point((256, 128), big, 2000, 1000) == (1000, 500)


# ----------------------------------------------------------------------------- placeholders
def test_single_region_gets_image_placeholder():
    prompt, note = prepare_question("What color is it?", num_new=1)
    assert prompt == "image[IMG] What color is it?"
    assert note and "image[IMG]" in note


def test_two_regions_get_numbered_placeholders():
    prompt, note = prepare_question("  Are they the same color? ", num_new=2)
    assert prompt == "image 1[IMG] image 2[IMG] Are they the same color?"
    assert note and "image 1[IMG] image 2[IMG]" in note


def test_regions_added_later_are_numbered_after_the_earlier_ones():
    prompt, _ = prepare_question("And this one?", num_new=1, num_before=2)
    assert prompt == "image 3[IMG] And this one?"
    prompt, _ = prepare_question("And these?", num_new=2, num_before=1)
    assert prompt == "image 2[IMG] image 3[IMG] And these?"
    assert region_name(1, 1) == "image" and region_name(2, 3) == "image 2"


def test_follow_up_without_new_regions_is_plain_text():
    assert prepare_question("Is it large?", num_new=0, num_before=1) == ("Is it large?", None)


def test_user_placeholders_are_kept_when_they_match():
    q = "image 1[IMG] image 2[IMG] Write a story that combines image 1 and image 2."
    assert prepare_question(q, num_new=2) == (q, None)


@pytest.mark.parametrize("question, new, before, message", [
    ("", 1, 0, "empty"),
    ("   ", 1, 0, "empty"),
    (None, 1, 0, "empty"),
    ("What is it?", 0, 0, "add a region first"),
    ("image[IMG] image[IMG] What?", 1, 0, "2 \\[IMG\\] placeholder"),
    ("image[IMG] What?", 2, 0, "1 \\[IMG\\] placeholder"),
    ("image[IMG] And now?", 0, 2, "no new region"),
])
def test_bad_questions_are_refused(question, new, before, message):
    with pytest.raises(InputError, match=message):
        prepare_question(question, new, before)


# ----------------------------------------------------------------------------- thumbnails and drawing
def _checker(w: int = 100, h: int = 60) -> Image.Image:
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[:, w // 2:] = (0, 0, 255)
    return Image.fromarray(arr)


def test_crop_thumbnail_is_the_region_scaled_down():
    img = _checker()
    thumb = crop_thumbnail(img, (50.0, 0.0, 100.0, 60.0), max_side=30)
    assert max(thumb.size) == 30 and thumb.mode == "RGB"
    assert np.asarray(thumb)[..., 2].min() > 200  # only the blue half
    small = crop_thumbnail(img, (0.0, 0.0, 10.0, 5.0), max_side=96)
    assert small.size == (10, 5)  # never enlarged


def test_crop_thumbnail_handles_fractional_and_tiny_boxes():
    img = _checker()
    assert crop_thumbnail(img, (10.4, 10.6, 10.9, 11.0)).size >= (1, 1)
    assert crop_thumbnail(img.convert("L"), (0, 0, 100, 60)).mode == "RGB"


def test_draw_selection_marks_without_touching_the_original():
    img = Image.new("RGB", (100, 80), (128, 128, 128))
    before = img.tobytes()
    marked = draw_selection(img, first=(20, 30))
    assert img.tobytes() == before and marked.size == img.size
    assert marked.getpixel((20, 30)) != (128, 128, 128)
    boxed = draw_selection(img, box=(10, 10, 60, 50))
    assert boxed.getpixel((10, 30)) == (255, 0, 0) and boxed.getpixel((35, 30)) == (128, 128, 128)
    big = display_image(img, 2.0)
    assert big.size == (200, 160) and img.size == (100, 80)
    scaled = draw_selection(big, box=(10, 10, 60, 50), regions=[(1, (0, 0, 20, 20))], scale=2.0)
    assert scaled.size == (200, 160) and scaled.getpixel((20, 60)) == (255, 0, 0)
    assert scaled.getpixel((39, 5)) == (0, 200, 255)  # the added region's outline


def test_session_canvas_shows_first_click_then_box():
    s = Session()
    assert s.canvas() is None
    s.set_image(Image.new("RGB", (256, 128), (100, 100, 100)), "x.png")
    assert s.canvas().size == (512, 256)
    s.clicks = ClickState(first=(10, 10))
    assert s.canvas().getpixel((20, 20)) != (100, 100, 100)


# ----------------------------------------------------------------------------- settings
def test_settings_from_controls():
    greedy = settings_from_controls(1, 0, 300)
    assert not greedy.do_sample and greedy.generate_kwargs()["do_sample"] is False and greedy.max_new_tokens == 300
    sampled = settings_from_controls(2, 0.7, 50)
    assert sampled.do_sample and sampled.temperature == pytest.approx(0.7) and sampled.num_beams == 2
    assert sampled.generate_kwargs()["temperature"] == pytest.approx(0.7)
    for bad in [(0, 0, 300), (1, -1, 300), (1, 0, 0), (1, float("nan"), 300), ("x", 0, 3)]:
        with pytest.raises(InputError):
            settings_from_controls(*bad)


# ----------------------------------------------------------------------------- the shared model
@pytest.fixture(scope="module")
def demo_model(tiny_files):
    from click4caption.captioner import Captioner
    from click4caption.config import load_config
    from click4caption_apps.demo_app import DemoModel

    return DemoModel(Captioner.from_config(load_config(tiny_files["yaml"])), name="tiny")


def _scene():
    image, record = example_scene_records(count=1)[0]
    return image, [o["box_xyxy"] for o in record["objects"]]


def _run(stream):
    out = None
    for partial, turn in stream:
        out = (partial, turn)
    return out


def test_second_box_on_the_same_image_skips_the_vit(demo_model):
    from click4caption.captioner import Captioner

    image, boxes = _scene()
    settings = settings_from_controls(1, 0, 16)
    misses, hits = demo_model.cache_misses, demo_model.cache_hits
    conv = vicuna_v0()
    reply, turn = _run(demo_model.stream_turn(conv, [], [Captioner.region(image, boxes[0])], DESCRIBE_PROMPT,
                                              settings))
    assert demo_model.cache_misses == misses + 1
    assert conv.messages == []  # the caller's conversation is untouched until it adopts the turn
    assert len(turn.img_list) == 1 and turn.conv.messages[-1] == ["Assistant", reply]
    _run(demo_model.stream_turn(vicuna_v0(), [], [Captioner.region(image, boxes[1])], DESCRIBE_PROMPT, settings))
    assert demo_model.cache_misses == misses + 1 and demo_model.cache_hits == hits + 1


def test_follow_up_turns_extend_the_conversation(demo_model):
    from click4caption.captioner import Captioner

    image, boxes = _scene()
    settings = settings_from_controls(1, 0, 8)
    regions = [Captioner.region(image, b) for b in boxes[:2]]
    prompt, _ = prepare_question("Are they the same color?", 2)
    _, first = _run(demo_model.stream_turn(vicuna_v0(), [], regions, prompt, settings))
    assert len(first.img_list) == 2
    prompt, _ = prepare_question("Is it large?", 0, 2)
    _, second = _run(demo_model.stream_turn(first.conv, first.img_list, [], prompt, settings))
    assert len(second.img_list) == 2 and len(second.conv.messages) == 4
    third_region = [Captioner.region(image, boxes[2])]
    prompt, _ = prepare_question("And this?", 1, 2)
    assert prompt == "image 3[IMG] And this?"
    _, third = _run(demo_model.stream_turn(second.conv, second.img_list, third_region, prompt, settings))
    assert len(third.img_list) == 3 and third.conv.num_placeholders() == 3


def test_placeholder_mismatch_and_full_context_are_user_errors(demo_model):
    from click4caption.captioner import Captioner

    image, boxes = _scene()
    region = Captioner.region(image, boxes[0])
    with pytest.raises(InputError, match="placeholder"):
        _run(demo_model.stream_turn(vicuna_v0(), [], [region], "What?", settings_from_controls(1, 0, 8)))
    with pytest.raises(InputError, match="no new region"):
        _run(demo_model.stream_turn(vicuna_v0(), [], [], "image[IMG] What?", settings_from_controls(1, 0, 8)))
    full = settings_from_controls(1, 0, 8).replace(max_length=20)  # the prompt alone is longer than this
    with pytest.raises(InputError, match="conversation is full"):
        _run(demo_model.stream_turn(vicuna_v0(), [], [region], "image[IMG] What?", full))
    assert not demo_model.lock.locked()


def test_build_app_makes_the_blocks(demo_model, tmp_path: Path):
    import gradio as gr

    from click4caption_apps.demo_app import ThumbStore, build_app

    app = build_app(demo_model, load_example_scenes(EXAMPLES_DIR), ThumbStore(tmp_path))
    assert isinstance(app, gr.Blocks)
    ids = {getattr(b, "elem_id", None) for b in app.blocks.values()}
    assert {"canvas", "examples", "chat", "status", "question", "ask", "add", "whole", "restart",
            "regions", "upload", "beams", "temperature", "max_new_tokens"} <= ids
    path = ThumbStore(tmp_path).save(Image.new("RGB", (4, 4)))
    assert Path(path).is_file() and ThumbStore(tmp_path).save(Image.new("RGB", (4, 4))) == path


@pytest.mark.parametrize("before,new", [(0, 1), (0, 3), (2, 1), (1, 2)])
def test_inserted_placeholders_are_what_the_engine_splices(before: int, new: int):
    """The demo's inserted ``[IMG]`` prefix passes the library's check and gives the chat
    engine exactly one gap per new region, numbered after the regions already asked about."""
    from click4caption.prompts import IMG_TOKEN, check_question, vicuna_v0

    prompt, note = prepare_question("Are they the same color?", new, before)
    assert check_question(prompt, new) == prompt and note is not None
    conv = vicuna_v0()
    conv.append_message(conv.roles[0], prompt)
    assert len(conv.get_prompt().split(IMG_TOKEN)) == new + 1
    total = before + new
    names = [f"image {before + i + 1}" if total > 1 else "image" for i in range(new)]
    assert prompt == "".join(f"{name}{IMG_TOKEN} " for name in names) + "Are they the same color?"
