"""The demo's events without a browser: each method of DemoHandlers called the way Gradio
calls it, with fake select events (an object with ``.index``), on the tiny random model;
the locked captioner; the page's wiring and its API endpoints."""
from __future__ import annotations

import threading
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import numpy as np
import pytest
from PIL import Image

from click4caption.captioner import Captioner, Region
from click4caption.errors import InputError
from click4caption.paths import EXAMPLES_DIR
from click4caption.prompts import DESCRIBE_PROMPT, DESCRIBE_QUESTION, IMG_TOKEN, vicuna_v0
from click4caption.shapes.examples import ExampleScene, example_scene_records, load_example_scenes

gr = pytest.importorskip("gradio")

from click4caption_apps.demo.canvas import crop_thumbnail, display_scale  # noqa: E402
from click4caption_apps.demo.handlers import DemoHandlers, ThumbStore, settings_from_controls  # noqa: E402
from click4caption_apps.demo.model import LockedCaptioner  # noqa: E402
from click4caption_apps.demo.session import Session, prepare_question  # noqa: E402

GEN = (1, 0, 8)  # beams, temperature, max new tokens: greedy and short
SKIP = {"__type__": "update"}  # gr.skip(): the output keeps its value


@pytest.fixture(scope="module")
def model(tiny_files) -> LockedCaptioner:
    from click4caption.config import load_config

    return LockedCaptioner(Captioner.from_config(load_config(tiny_files["yaml"])), name="tiny")


@pytest.fixture(scope="module")
def examples() -> list[ExampleScene]:
    return load_example_scenes(EXAMPLES_DIR)


@pytest.fixture
def handlers(model: LockedCaptioner, examples: list[ExampleScene], tmp_path: Path) -> DemoHandlers:
    return DemoHandlers(model, examples, ThumbStore(tmp_path))


def event(index: Any) -> SimpleNamespace:
    """A fake ``gr.SelectData``: the handlers read only ``.index``."""
    return SimpleNamespace(index=index)


def last(stream: Iterator[tuple]) -> tuple:
    out = None
    for out in stream:
        pass
    assert out is not None
    return out


def load_example(h: DemoHandlers, n: int = 1, session: Session | None = None) -> Session:
    canvas, session, status = h.select_example(session, event(n - 1))
    assert f"Loaded **scene_{n}.png**" in status, status
    return session


def click(h: DemoHandlers, session: Session, point: tuple[float, float], mode: str = "QA") -> tuple[Any, str]:
    """Click image pixel ``point`` (sent in canvas pixels, as the browser does)."""
    s = display_scale(session.image.width, session.image.height)
    canvas, session, status = h.click(session, mode, event([point[0] * s, point[1] * s]))
    return canvas, status


def objects(h: DemoHandlers, n: int = 1) -> list[dict[str, Any]]:
    return h.examples[n - 1].objects


def describe_box(h: DemoHandlers, session: Session, box: list[int]) -> tuple:
    click(h, session, (box[0], box[1]), "Describe")
    click(h, session, (box[2], box[3]), "Describe")
    return last(h.describe(session, *GEN))


def add_box(h: DemoHandlers, session: Session, box: list[int]) -> str:
    click(h, session, (box[0], box[1]))
    click(h, session, (box[2], box[3]))
    _, gallery, session, status = h.add_region(session)
    return status


# ----------------------------------------------------------------------------- images and clicks
def test_loading_an_image_asks_for_any_corner(handlers: DemoHandlers):
    canvas, session, status = handlers.select_example(None, event(1))
    assert "scene_2.png" in status and "opposite corner" in status and "top-left" not in status
    assert canvas.size == (round(session.image.width * session.scale), round(session.image.height * session.scale))
    assert max(canvas.size) == 512


@pytest.mark.parametrize("first, second, order", [
    ("tl", "br", "top-left then bottom-right"),
    ("br", "tl", "bottom-right then top-left"),
    ("tr", "bl", "top-right then bottom-left"),
    ("bl", "tr", "bottom-left then top-right"),
])
@pytest.mark.parametrize("mode", ["Describe", "QA"])
def test_the_status_says_which_corners_were_clicked(handlers: DemoHandlers, first: str, second: str, order: str,
                                                     mode: str):
    """After the first click the hint asks for the opposite corner (never for the corner
    just clicked); after the second it names the order actually used."""
    session = load_example(handlers)
    x1, y1, x2, y2 = objects(handlers)[0]["box_xyxy"]
    corners = {"tl": (x1, y1), "br": (x2, y2), "tr": (x2, y1), "bl": (x1, y2)}
    _, status = click(handlers, session, corners[first], mode)
    assert "opposite corner" in status and "bottom-right" not in status and "top-left" not in status
    assert session.clicks.first == corners[first]
    canvas, status = click(handlers, session, corners[second], mode)
    assert f"(Corners clicked {order}.)" in status, status
    assert session.box == (x1, y1, x2, y2) and session.clicks.first is None
    if mode == "Describe":
        assert session.describe_box == (x1, y1, x2, y2) and "describing" in status
    else:
        assert session.describe_box is None and "Add region" in status
    assert canvas.getpixel((round(x1 * session.scale) + 1, round((y1 + y2) / 2 * session.scale))) == (255, 0, 0)


def test_click_errors_show_in_the_status_line_only(handlers: DemoHandlers):
    """No image, a click outside the picture, an empty box: a red status line and no
    toast (a Gradio toast outside an event is a Python warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        canvas, session, status = handlers.click(None, "Describe", event([3, 4]))
        assert canvas == SKIP and "Error" in status and "pick an example" in status
        session = load_example(handlers, 1, session)
        _, status = click(handlers, session, (10, 10))
        canvas, session, status = handlers.click(session, "QA", event(None))
        assert "inside the picture" in status and session.clicks.first == (10, 10)  # the first corner is kept
        _, status = click(handlers, session, (10, 40))  # same x: no box
        assert "empty box" in status and session.box is None and session.clicks.first is None


def test_an_unreadable_upload_is_named_as_the_user_knows_it(handlers: DemoHandlers, tmp_path: Path):
    broken = tmp_path / "upload-1234" / "broken.png"
    broken.parent.mkdir()
    broken.write_bytes(b"not an image")
    canvas, session, status = handlers.upload(str(broken), None)
    assert canvas == SKIP and "Error" in status and "broken.png" in status and "upload-1234" not in status
    good = tmp_path / "red.png"
    Image.new("RGB", (120, 90), (200, 30, 30)).save(good)
    canvas, session, status = handlers.upload(str(good), session)
    assert "Loaded **red.png** (120×90)" in status and canvas.size == (512, 384)
    _, _, status = handlers.upload(None, session)
    assert "no file" in status and session.image_name == "red.png"


def test_whole_image_selects_the_border_box(handlers: DemoHandlers):
    session = load_example(handlers, 3)
    canvas, session, status = handlers.whole_image(session, "Describe")
    w, h = session.image.size
    assert session.describe_box == (0, 0, w, h) and f"Box (0, 0, {w}, {h})" in status and "(whole image)" in status
    _, _, status = handlers.whole_image(None, "Describe")
    assert "pick an example" in status


# ----------------------------------------------------------------------------- Describe
def test_describe_shows_the_region_and_the_question_as_a_person_reads_it(handlers: DemoHandlers):
    session = load_example(handlers)
    box = objects(handlers)[0]["box_xyxy"]
    chat, session, status, info = describe_box(handlers, session, box)
    user, reply = chat
    picture, text = user["content"]
    assert text == DESCRIBE_QUESTION and IMG_TOKEN not in text
    assert Path(picture["path"]).is_file() and picture["path"].startswith(str(handlers.thumbs.folder))
    with Image.open(picture["path"]) as thumb:  # the region as it is: no number on a lone box
        assert np.array_equal(np.asarray(thumb.convert("RGB")), np.asarray(crop_thumbnail(session.image, box)))
    assert reply["role"] == "assistant" and reply["content"].strip()
    assert status.startswith(f"Described box ({box[0]}, {box[1]}, {box[2]}, {box[3]}) of **scene_1.png**")
    assert session.conv.messages[0][1] == DESCRIBE_PROMPT and len(session.img_list) == 1
    model = handlers.model
    assert f"encoded by the ViT: {model.cache_misses} · reused from the cache: {model.cache_hits}" in info
    # nothing selected: the chained describe changes nothing
    assert last(handlers.describe(session, *GEN)) == (SKIP, session, SKIP, SKIP)


def test_describe_streams_the_reply(handlers: DemoHandlers):
    session = load_example(handlers, 2)
    box = objects(handlers, 2)[0]["box_xyxy"]
    click(handlers, session, (box[0], box[1]), "Describe")
    click(handlers, session, (box[2], box[3]), "Describe")
    steps = list(handlers.describe(session, 1, 0, 16))
    assert [s[2] for s in steps[:-1]] == ["Describing…"] * (len(steps) - 1)
    replies = [s[0][-1]["content"] for s in steps]
    assert replies[0] == "" and len(steps) >= 3  # an empty bubble first, then pieces
    assert all(b.startswith(a) for a, b in zip(replies[1:-1], replies[2:-1]))


def test_a_follow_up_in_describe_mode_keeps_the_conversation(handlers: DemoHandlers):
    session = Session()
    _, _, status, _, _, _ = last(handlers.ask("What color is it?", session, "Describe", *GEN))
    assert "describe a box first" in status
    session = load_example(handlers, 1, session)
    describe_box(handlers, session, objects(handlers)[1]["box_xyxy"])
    chat, session, status, info, question, regions = last(handlers.ask("What color is it?", session, "Describe",
                                                                        *GEN))
    assert status == "Answered." and question == "" and chat[-2] == {"role": "user", "content": ["What color is it?"]}
    assert len(session.conv.messages) == 4 and len(session.img_list) == 1


# ----------------------------------------------------------------------------- QA
def test_qa_shows_the_numbered_regions_and_the_question_as_typed(handlers: DemoHandlers):
    canvas, session, chat, regions, add, status = handlers.change_mode("QA", Session())
    assert add == {"__type__": "update", "visible": True} and regions["visible"] is True and "QA mode" in status
    boxes = []
    for n in (1, 2):
        session = load_example(handlers, n, session)
        boxes.append(objects(handlers, n)[0]["box_xyxy"])
        status = add_box(handlers, session, boxes[-1])
        assert f"Added region **{n}**" in status
    chat, session, status, info, question, gallery = last(
        handlers.ask("  Are they the same color? ", session, "QA", *GEN))
    assert "image 1[IMG] image 2[IMG]" in status  # the app says what it inserted
    assert question == "" and [c for _, c in gallery] == ["1", "2"] and session.pending == []
    user = chat[-2]
    assert user["role"] == "user" and len(user["content"]) == 2  # ONE bubble: the regions, then the question
    picture, text = user["content"]
    assert text == "Are they the same color?" and picture["alt_text"] == "regions 1, 2"
    with Image.open(picture["path"]) as strip:
        thumbs = [r.thumb for r in session.regions]
        assert strip.width == thumbs[0].width + thumbs[1].width + 6
        assert strip.height == max(t.height for t in thumbs)
        arr = np.asarray(strip.convert("RGB"))
        top0 = (strip.height - thumbs[0].height) // 2
        top1 = (strip.height - thumbs[1].height) // 2
        assert tuple(arr[top0 + 1, 1]) == (0, 0, 0) and tuple(arr[top1 + 1, thumbs[0].width + 7]) == (0, 0, 0)
    assert session.conv.messages[0][1] == "image 1[IMG] image 2[IMG] Are they the same color?"
    # a follow-up is text only; a new region is numbered 3 and shown alone
    chat, session, status, *_ = last(handlers.ask("Is image 1 large or small?", session, "QA", *GEN))
    assert chat[-2]["content"] == ["Is image 1 large or small?"] and status == "Answered."
    add_box(handlers, session, objects(handlers, 2)[1]["box_xyxy"])
    chat, session, status, *_ = last(handlers.ask("And this one?", session, "QA", *GEN))
    assert chat[-2]["content"][0]["alt_text"] == "region 3" and "image 3[IMG]" in status
    assert session.conv.num_placeholders() == 3 and len(session.img_list) == 3


def test_qa_errors_keep_the_conversation(handlers: DemoHandlers):
    session = Session()
    _, _, _, status = handlers.add_region(session)
    assert "pick an example" in status
    session = load_example(handlers, 1, session)
    _, _, _, status = handlers.add_region(session)
    assert "select a box first" in status and "opposite corners" in status
    chat, session, status, *_ = last(handlers.ask("Are they the same color?", session, "QA", *GEN))
    assert "add a region first" in status and chat == []
    add_box(handlers, session, objects(handlers)[0]["box_xyxy"])
    for question, message in [("   ", "empty"), ("image[IMG] image[IMG] What?", "2 [IMG] placeholder")]:
        chat, session, status, info, q, regions = last(handlers.ask(question, session, "QA", *GEN))
        assert message in status and "Error" in status and (q, regions) == (SKIP, SKIP)
        assert chat == [] and len(session.pending) == 1  # the region waits for a good question
    chat, session, status, *_ = last(handlers.ask("What is it?", session, "QA", 9, 0, 8))
    assert "beams must be between 1 and 5" in status and len(session.pending) == 1


def test_restart_and_mode_change_clear_the_conversation(handlers: DemoHandlers):
    session = load_example(handlers)
    describe_box(handlers, session, objects(handlers)[0]["box_xyxy"])
    canvas, session, chat, regions, add, status = handlers.change_mode("Describe", session)
    assert chat == [] and session.conv is None and session.img_list == [] and session.messages == []
    assert add == {"__type__": "update", "visible": False} and canvas is not None and session.image is not None
    assert handlers.restart(session)[:6] == (None, Session(), [], [], "", "Restarted: pick an image.")


# ----------------------------------------------------------------------------- the locked captioner
def _regions(seed: int) -> list[Region]:
    """The objects of a scene no other test shows the model (the ViT cache knows images
    by content), as regions."""
    image, record = example_scene_records(seed=seed, count=1)[0]
    return [Captioner.region(image, o["box_xyxy"]) for o in record["objects"]]


def _run(stream):
    out = None
    for partial, turn in stream:
        out = (partial, turn)
    return out


def test_second_box_on_the_same_image_skips_the_vit(handlers: DemoHandlers):
    model, regions = handlers.model, _regions(seed=101)
    settings = settings_from_controls(1, 0, 16)
    misses, hits = model.cache_misses, model.cache_hits
    conv = vicuna_v0()
    reply, turn = _run(model.stream_turn(conv, [], regions[:1], DESCRIBE_PROMPT, settings))
    assert model.cache_misses == misses + 1
    assert conv.messages == []  # the caller's conversation is untouched until it adopts the turn
    assert len(turn.img_list) == 1 and turn.conv.messages[-1] == ["Assistant", reply]
    _run(model.stream_turn(vicuna_v0(), [], regions[1:2], DESCRIBE_PROMPT, settings))
    assert model.cache_misses == misses + 1 and model.cache_hits == hits + 1


def test_follow_up_turns_extend_the_conversation(handlers: DemoHandlers):
    model, regions = handlers.model, _regions(seed=102)
    settings = settings_from_controls(1, 0, 8)
    prompt, _ = prepare_question("Are they the same color?", 2)
    _, first = _run(model.stream_turn(vicuna_v0(), [], regions[:2], prompt, settings))
    assert len(first.img_list) == 2
    prompt, _ = prepare_question("Is it large?", 0, 2)
    _, second = _run(model.stream_turn(first.conv, first.img_list, [], prompt, settings))
    assert len(second.img_list) == 2 and len(second.conv.messages) == 4
    prompt, _ = prepare_question("And this?", 1, 2)
    assert prompt == "image 3[IMG] And this?"
    _, third = _run(model.stream_turn(second.conv, second.img_list, regions[2:3], prompt, settings))
    assert len(third.img_list) == 3 and third.conv.num_placeholders() == 3


def test_placeholder_mismatch_and_full_context_are_user_errors(handlers: DemoHandlers):
    model, region = handlers.model, _regions(seed=103)[0]
    with pytest.raises(InputError, match="placeholder"):
        _run(model.stream_turn(vicuna_v0(), [], [region], "What?", settings_from_controls(1, 0, 8)))
    with pytest.raises(InputError, match="no new region"):
        _run(model.stream_turn(vicuna_v0(), [], [], "image[IMG] What?", settings_from_controls(1, 0, 8)))
    full = settings_from_controls(1, 0, 8).replace(max_length=20)  # the prompt alone is longer than this
    with pytest.raises(InputError, match="conversation is full"):
        _run(model.stream_turn(vicuna_v0(), [], [region], "image[IMG] What?", full))
    assert not model.lock.locked()


# ----------------------------------------------------------------------------- the API endpoints
def upload(path: Path) -> dict[str, Any]:
    """What Gradio hands an endpoint for a file a client sent with handle_file."""
    return {"path": str(path), "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}


@pytest.fixture
def short_answers(model: LockedCaptioner) -> Iterator[None]:
    """The API answers with the captioner's settings: short ones keep the tiny model fast."""
    before = model.captioner.settings
    model.captioner.settings = before.replace(max_new_tokens=8)
    yield
    model.captioner.settings = before


def test_api_describe_is_one_batched_call_in_box_order(handlers: DemoHandlers, short_answers: None):
    scene = handlers.examples[0]
    boxes = [o["box_xyxy"] for o in scene.objects]
    boxes[0] = [boxes[0][2], boxes[0][3], boxes[0][0], boxes[0][1]]  # corners in any order, as the CLI
    answers = handlers.api_describe(upload(scene.path), boxes + [[-1, -1, -1, -1]])
    assert len(answers) == len(boxes) + 1 and all(isinstance(a, str) and a for a in answers)
    direct = handlers.model.captioner.describe(str(scene.path), boxes + [[-1, -1, -1, -1]])
    assert answers == direct  # the same greedy answers, in the same order


def test_api_ask_inserts_placeholders_like_the_ui(handlers: DemoHandlers, short_answers: None):
    scene = handlers.examples[0]
    boxes = [o["box_xyxy"] for o in scene.objects[:2]]
    answer = handlers.api_ask(upload(scene.path), boxes, "Are they the same color?")
    marked = handlers.api_ask(upload(scene.path), boxes, "image 1[IMG] image 2[IMG] Are they the same color?")
    assert isinstance(answer, str) and answer == marked


@pytest.mark.parametrize("image, boxes, question, message", [
    ("scene", [[5, 5, 5, 5]], None, "empty box"),
    ("scene", [[1, 2, 3]], None, "four numbers"),
    ("scene", [], None, "non-empty list"),
    ("scene", "0 0 10 10", None, "non-empty list"),
    ("/etc/hostname", [[0, 0, 10, 10]], None, "handle_file"),
    ("broken", [[0, 0, 10, 10]], None, "not an image"),
    ("scene", [[0, 0, 10, 10]], "image[IMG] image[IMG] What?", "2 [IMG] placeholder"),
    ("scene", [[0, 0, 10, 10]], "  ", "empty"),
])
def test_api_errors_are_one_line_for_the_client(handlers: DemoHandlers, tmp_path: Path, image: str, boxes: Any,
                                                question: str | None, message: str):
    files = {"scene": upload(handlers.examples[0].path), "/etc/hostname": "/etc/hostname"}
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"nope")
    files["broken"] = upload(broken)
    with pytest.raises(gr.Error) as caught:
        if question is None:
            handlers.api_describe(files[image], boxes)
        else:
            handlers.api_ask(files[image], boxes, question)
    assert message in caught.value.message and "\n" not in caught.value.message
    assert caught.value.print_exception is False  # no traceback in the server's log
    assert not handlers.model.lock.locked()


def test_api_calls_wait_for_the_model_lock(handlers: DemoHandlers, short_answers: None):
    """The API shares the UI's lock: while a UI call holds it, an API call waits."""
    scene = handlers.examples[0]
    done: list[Any] = []
    with handlers.model.lock:
        worker = threading.Thread(target=lambda: done.append(
            handlers.api_describe(upload(scene.path), [scene.objects[0]["box_xyxy"]])))
        worker.start()
        worker.join(timeout=1.0)
        assert worker.is_alive() and done == []
    worker.join(timeout=60)
    assert not worker.is_alive() and len(done) == 1 and len(done[0]) == 1


# ----------------------------------------------------------------------------- the page
def test_build_app_wires_every_event_and_lists_only_the_two_endpoints(handlers: DemoHandlers):
    from click4caption_apps.demo.layout import build_app

    app = build_app(handlers)
    assert isinstance(app, gr.Blocks)
    ids = {getattr(b, "elem_id", None) for b in app.blocks.values()}
    assert {"canvas", "examples", "chat", "status", "question", "ask", "add", "whole", "restart",
            "regions", "upload", "beams", "temperature", "max_new_tokens", "mode"} <= ids
    fns = {fn.fn for fn in app.fns.values()}
    for method in ("upload", "select_example", "click", "whole_image", "describe", "add_region", "ask",
                   "restart", "change_mode", "api_describe", "api_ask"):
        assert getattr(handlers, method) in fns, method
    info = app.get_api_info()
    assert set(info["named_endpoints"]) == {"/describe", "/ask"} and not info["unnamed_endpoints"]
    params = [p["parameter_name"] for p in info["named_endpoints"]["/ask"]["parameters"]]
    assert params == ["image", "boxes", "question"]
    assert info["named_endpoints"]["/describe"]["parameters"][0]["python_type"]["type"] == "filepath"
    settings = handlers.settings
    sliders = {b.elem_id: b.value for b in app.blocks.values() if isinstance(b, gr.Slider)}
    assert sliders == {"beams": settings.num_beams, "temperature": settings.temperature,
                       "max_new_tokens": settings.max_new_tokens}


def test_thumb_store_names_pictures_by_content(tmp_path: Path):
    store = ThumbStore(tmp_path)
    path = store.save(Image.new("RGB", (4, 4)))
    assert Path(path).is_file() and ThumbStore(tmp_path).save(Image.new("RGB", (4, 4))) == path
    assert store.save(Image.new("RGB", (4, 4), (1, 2, 3))) != path
