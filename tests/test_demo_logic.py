"""The demo's logic without a browser and without a model: clicks -> boxes, the
corner order, placeholders, thumbnails, drawing and the session's canvas
(click4caption_apps.demo.canvas and .session), and the UI's generation settings."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from click4caption.errors import InputError
from click4caption.generation import GenerationSettings
from click4caption_apps.demo.canvas import (
    as_point,
    box_from_clicks,
    click_order,
    corner_name,
    crop_thumbnail,
    display_image,
    display_scale,
    draw_selection,
    mark_radius,
    numbered,
    region_strip,
    to_image_point,
)
from click4caption_apps.demo.session import (
    ClickState,
    Selection,
    Session,
    prepare_question,
    region_name,
    register_click,
)


# ----------------------------------------------------------------------------- clicks and boxes
def test_first_click_is_remembered_and_second_gives_the_box():
    state, box = register_click(ClickState(), (10, 20))
    assert box is None and state.waiting_for_second and state.first == (10, 20)
    state, done = register_click(state, (50, 70))
    assert done == Selection((10, 20), (50, 70))
    assert done.box == (10.0, 20.0, 50.0, 70.0) and done.order == "top-left then bottom-right"
    assert state == ClickState() and not state.waiting_for_second


def test_a_third_click_starts_a_new_box():
    state = ClickState()
    for point in [(1, 2), (30, 40)]:
        state, _ = register_click(state, point)
    state, box = register_click(state, (5, 6))
    assert box is None and state.first == (5, 6)
    state, done = register_click(state, (9, 9))
    assert done is not None and done.box == (5.0, 6.0, 9.0, 9.0)


@pytest.mark.parametrize("first, second, order", [
    ((10, 20), (50, 70), "top-left then bottom-right"),
    ((50, 70), (10, 20), "bottom-right then top-left"),
    ((50, 20), (10, 70), "top-right then bottom-left"),
    ((10, 70), (50, 20), "bottom-left then top-right"),
])
def test_box_from_clicks_in_any_order_names_the_order(first, second, order):
    assert box_from_clicks(first, second) == (10.0, 20.0, 50.0, 70.0)
    assert click_order(first, second) == order
    assert corner_name(first, second) == order.split(" then ")[0]
    assert Selection(first, second).order == order


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


@pytest.mark.parametrize("background", [(128, 128, 128), (220, 40, 40), (255, 255, 255)])
def test_first_click_mark_is_large_and_shows_on_any_colour(background):
    """The first corner's mark spans about 5% of the 512 px canvas each way (it was 10 px)
    and has red and white in it, so it shows on grey, red and white shapes alike."""
    canvas = Image.new("RGB", (512, 400), background)
    marked = np.asarray(draw_selection(canvas, first=(200, 150)))
    r = mark_radius(canvas)
    assert r >= 20
    changed = np.argwhere((marked != np.array(background)).any(axis=-1))
    assert changed[:, 1].min() <= 200 - r + 2 and changed[:, 1].max() >= 200 + r - 2  # x extent
    assert changed[:, 0].min() <= 150 - r + 2 and changed[:, 0].max() >= 150 + r - 2  # y extent
    around = marked[150 - r:150 + r + 1, 200 - r:200 + r + 1].reshape(-1, 3)
    colours = {tuple(int(v) for v in c) for c in around}
    assert (255, 0, 0) in colours and (255, 255, 255) in colours


def test_region_strip_puts_numbered_regions_side_by_side():
    red = Image.new("RGB", (40, 30), (220, 40, 40))
    blue = Image.new("RGB", (20, 50), (40, 80, 220))
    strip = region_strip([(1, red), (2, blue)], gap=6)
    assert strip.size == (40 + 6 + 20, 50)
    arr = np.asarray(strip)
    assert tuple(arr[20, 35]) == (220, 40, 40) and tuple(arr[45, 55]) == (40, 80, 220)
    assert tuple(arr[11, 1]) == (0, 0, 0) and tuple(arr[1, 47]) == (0, 0, 0)  # a number badge on each
    assert tuple(arr[5, 5]) == (255, 255, 255)  # the shorter one is centred on the background
    assert tuple(arr[2, 43]) == (255, 255, 255)  # the gap
    badge = np.asarray(numbered(red, 7))
    assert (badge[:16, :16] > 200).all(axis=-1).any()  # white digits on the badge
    assert tuple(badge[25, 35]) == (220, 40, 40)  # the rest untouched
    plain = region_strip([(None, red)])
    assert plain.size == red.size and tuple(np.asarray(plain)[1, 1]) == (220, 40, 40)
    with pytest.raises(ValueError):
        region_strip([])


def test_session_canvas_shows_first_click_then_box():
    s = Session()
    assert s.canvas() is None
    s.set_image(Image.new("RGB", (256, 128), (100, 100, 100)), "x.png")
    assert s.canvas().size == (512, 256)
    s.clicks = ClickState(first=(10, 10))
    assert s.canvas().getpixel((20, 20)) != (100, 100, 100)


# ----------------------------------------------------------------------------- settings
def test_settings_from_controls():
    from click4caption_apps.demo.handlers import settings_from_controls

    greedy = settings_from_controls(1, 0, 300)
    assert not greedy.do_sample and greedy.generate_kwargs()["do_sample"] is False and greedy.max_new_tokens == 300
    sampled = settings_from_controls(2, 0.7, 50)
    assert sampled.do_sample and sampled.temperature == pytest.approx(0.7) and sampled.num_beams == 2
    assert sampled.generate_kwargs()["temperature"] == pytest.approx(0.7)
    for bad in [(0, 0, 300), (1, -1, 300), (1, 0, 0), (1, float("nan"), 300), ("x", 0, 3)]:
        with pytest.raises(InputError):
            settings_from_controls(*bad)
    # the rest comes from the captioner's settings (one home for defaults)
    base = GenerationSettings(max_length=123, top_p=0.5)
    assert settings_from_controls(1, 0.5, 50, base) == base.replace(temperature=0.5, max_new_tokens=50)


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
