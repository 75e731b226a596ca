"""The demo in a real browser: ``demo.py`` in a subprocess (:mod:`tests.demo_server`),
driven by headless Chromium.

The model is the shipped shapes model, or a tiny random one (see tests/demo_server.py):
with a random one every check runs except those about what the answers say (the caption
names the shape's colour; the Yes/No answer). The Describe screenshot goes to
``assets/demo_screenshot.png`` with the shipped model (elsewhere with a random one, so
the README never shows gibberish; ``C4C_DEMO_SCREENSHOT`` names the file).

Needs ``/usr/bin/chromium`` (Debian's ``chromium`` package); skipped without it.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

import pytest

from click4caption.prompts import DESCRIBE_QUESTION, IMG_TOKEN
from click4caption_apps.demo.canvas import display_scale
from tests.demo_server import REPO, demo_cfg, server  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow

EXAMPLES = REPO / "assets" / "examples"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
REPLY_TIMEOUT_MS = 60_000
MAX_NEW_TOKENS = 40  # set in the UI: short replies keep the test fast (shapes answers are shorter)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    pytest.importorskip("playwright")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def _open(browser: Any, url: str) -> tuple[Any, Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(url)
    page.wait_for_selector("#examples button.thumbnail-item")
    page.get_by_text("Generation settings").click()
    tokens = page.locator("#max_new_tokens input[type=number]")
    tokens.fill(str(MAX_NEW_TOKENS))
    tokens.press("Enter")
    page.get_by_text("Generation settings").click()  # fold the settings away again
    page.wait_for_selector("#max_new_tokens", state="hidden")
    return context, page


@pytest.fixture
def page(browser: Any, server: str) -> Iterator[Any]:
    context, pg = _open(browser, server)
    yield pg
    context.close()


# ----------------------------------------------------------------------------- helpers
def scene(n: int) -> dict[str, Any]:
    """The sidecar of ``scene_<n>.png``."""
    return json.loads((EXAMPLES / f"scene_{n}.json").read_text())


def status(page: Any) -> str:
    return page.inner_text("#status")


def wait_status(page: Any, text: str, timeout: int = REPLY_TIMEOUT_MS) -> str:
    page.wait_for_function("t => document.querySelector('#status').innerText.includes(t)", arg=text,
                           timeout=timeout)
    return status(page)


def pick_example(page: Any, n: int) -> dict[str, Any]:
    sc = scene(n)
    page.locator("#examples button.thumbnail-item").nth(n - 1).click()
    wait_status(page, f"Loaded scene_{n}.png")
    w = round(sc["width"] * display_scale(sc["width"], sc["height"]))
    page.wait_for_function("w => { const i = document.querySelector('#canvas img'); "
                           "return i && i.complete && i.naturalWidth === w; }", arg=w)
    return sc


def _canvas_geometry(page: Any, sc: dict[str, Any]) -> tuple[float, float, float]:
    """Page position of image pixel (0, 0) and page px per image pixel, computed the way
    Gradio maps clicks back (the picture is centred and never enlarged by CSS)."""
    img = page.locator("#canvas img").first
    bb = img.bounding_box()
    nw, nh = img.evaluate("e => [e.naturalWidth, e.naturalHeight]")
    r = min(bb["width"] / nw, bb["height"] / nh, 1.0)
    s = nw / sc["width"]  # the canvas shows the image enlarged (or reduced) by s
    return bb["x"] + (bb["width"] - nw * r) / 2, bb["y"] + (bb["height"] - nh * r) / 2, s * r


def click_image(page: Any, sc: dict[str, Any], x: float, y: float) -> None:
    """Click image pixel (x, y) of the scene shown on the canvas."""
    ox, oy, k = _canvas_geometry(page, sc)
    page.mouse.click(ox + x * k, oy + y * k)


def canvas_pixel(page: Any, sc: dict[str, Any], x: float, y: float) -> list[int]:
    """RGB of the canvas picture at image pixel (x, y) (read back from the <img>)."""
    s = display_scale(sc["width"], sc["height"])
    return page.evaluate(
        """([x, y]) => { const i = document.querySelector('#canvas img'); const c = document.createElement('canvas');
            c.width = i.naturalWidth; c.height = i.naturalHeight; const g = c.getContext('2d');
            g.drawImage(i, 0, 0); return Array.from(g.getImageData(x, y, 1, 1).data.slice(0, 3)); }""",
        [int(x * s), int(y * s)])


def select_box(page: Any, sc: dict[str, Any], box: list[float], reverse: bool = False) -> None:
    """Click the two corners of ``box`` (x1, y1, x2, y2): top-left first, or bottom-right first."""
    x1, y1, x2, y2 = box
    first, second = ((x2, y2), (x1, y1)) if reverse else ((x1, y1), (x2, y2))
    click_image(page, sc, *first)
    wait_status(page, "First corner")
    page.wait_for_timeout(100)  # let the marked picture replace the old one
    click_image(page, sc, *second)


BOX_RE = r"\(([-\d.]+), ([-\d.]+), ([-\d.]+), ([-\d.]+)\)"


def described_box(text: str, name: str) -> list[float]:
    m = re.search(r"Described box " + BOX_RE + " of " + re.escape(name), text)
    assert m, text
    return [float(v) for v in m.groups()]


def bot_replies(page: Any) -> list[str]:
    return page.locator('#chat [data-testid="bot"]').all_inner_texts()


def user_messages(page: Any) -> list[str]:
    return page.locator('#chat [data-testid="user"]').all_inner_texts()


def cache_counts(page: Any) -> tuple[int, int]:
    m = re.search(r"encoded by the ViT: (\d+) · reused from the cache: (\d+)", page.inner_text("#model-info"))
    assert m, page.inner_text("#model-info")
    return int(m.group(1)), int(m.group(2))


def watch_reply_lengths(page: Any) -> None:
    """Record every length the last bot message takes (to see the reply stream in)."""
    page.evaluate("""() => { window.__lens = []; const chat = document.querySelector('#chat');
        new MutationObserver(() => { const b = chat.querySelectorAll('[data-testid="bot"]');
            if (!b.length) return; const n = b[b.length - 1].innerText.length;
            if (window.__lens[window.__lens.length - 1] !== n) window.__lens.push(n); })
        .observe(chat, {subtree: true, childList: true, characterData: true}); }""")


def near(box: list[float], expected: list[int], tol: float = 1.0) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(box, expected))


# ----------------------------------------------------------------------------- tests
def test_describe_a_box(page: Any, demo_cfg: tuple[str, bool], tmp_path: Path):
    """Two clicks around a shape: corner marked, box drawn, description streamed."""
    shipped = demo_cfg[1]
    sc = pick_example(page, 1)
    obj = sc["objects"][0]
    x1, y1, x2, y2 = obj["box_xyxy"]
    gray_before = canvas_pixel(page, sc, x1, y1)
    assert "opposite corner" in status(page)  # any corner may come first
    click_image(page, sc, x1, y1)
    assert "now click the opposite corner" in wait_status(page, "First corner")
    page.wait_for_timeout(200)  # let the marked picture load
    marked = canvas_pixel(page, sc, x1, y1)
    assert marked != gray_before and marked[0] > 200 and marked[1] < 80, (gray_before, marked)  # red mark
    watch_reply_lengths(page)
    click_image(page, sc, x2, y2)
    text = wait_status(page, "Described box")
    box = described_box(text, "scene_1.png")
    assert near(box, [x1, y1, x2, y2]), (box, obj)
    # the box is drawn (pure red outline on the left edge, where the picture has no pure red)
    page.wait_for_timeout(200)
    assert canvas_pixel(page, sc, box[0] + 0.5, (box[1] + box[3]) / 2) == [255, 0, 0]
    # the chat: the region's thumbnail, the Describe question as a person reads it, the streamed reply
    assert page.locator('#chat [data-testid="user"] img').count() == 1
    assert [m.strip() for m in user_messages(page) if m.strip()] == [DESCRIBE_QUESTION]
    replies = bot_replies(page)
    assert len(replies) == 1 and replies[0].strip()
    lengths = page.evaluate("window.__lens")
    if len(replies[0].split()) >= 20:  # long enough to arrive in several pieces
        assert len([n for n in lengths if n > 0]) >= 2, lengths
    if shipped:
        assert obj["color"] in replies[0].lower(), (obj, replies[0])
    shot = Path(os.environ.get("C4C_DEMO_SCREENSHOT") or
                (REPO / "assets" / "demo_screenshot.png" if shipped else tmp_path / "demo_screenshot.png"))
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    # a second box on the same image: a new description, no new ViT pass
    misses1, hits1 = cache_counts(page)
    other = sc["objects"][1]
    select_box(page, sc, other["box_xyxy"])
    page.wait_for_function("n => document.querySelectorAll('#chat [data-testid=\"bot\"]').length === n", arg=2)
    text = wait_status(page, "Described box")
    assert near(described_box(text, "scene_1.png"), other["box_xyxy"]), text
    misses2, hits2 = cache_counts(page)
    assert misses2 == misses1 and hits2 == hits1 + 1
    if shipped:
        assert other["color"] in bot_replies(page)[-1].lower()
    # the whole-image button is the -1 box
    page.click("#whole")
    page.wait_for_function("n => document.querySelectorAll('#chat [data-testid=\"bot\"]').length === n", arg=3)
    text = wait_status(page, "Described box (0, 0")
    assert described_box(text, "scene_1.png") == [0, 0, sc["width"], sc["height"]]


def test_example_names_are_shown_in_full(page: Any):
    labels = page.locator("#examples .caption-label")
    assert labels.all_inner_texts() == [f"scene_{n}.png" for n in range(1, 6)]
    for n in range(5):
        label, tile = labels.nth(n), page.locator("#examples button.thumbnail-item").nth(n)
        assert label.evaluate("e => e.scrollWidth <= e.clientWidth"), n  # no ellipsis
        lb, tb = label.bounding_box(), tile.bounding_box()
        assert tb["x"] <= lb["x"] and lb["x"] + lb["width"] <= tb["x"] + tb["width"], (n, lb, tb)


def test_corner_order_does_not_matter(page: Any):
    sc = pick_example(page, 2)
    obj = sc["objects"][0]
    select_box(page, sc, obj["box_xyxy"])
    text = wait_status(page, "Described box")
    forward = described_box(text, "scene_2.png")
    assert near(forward, obj["box_xyxy"]) and "Corners clicked top-left then bottom-right" in text
    select_box(page, sc, obj["box_xyxy"], reverse=True)
    page.wait_for_function("n => document.querySelectorAll('#chat [data-testid=\"bot\"]').length === n", arg=2)
    text = wait_status(page, "Described box")
    assert described_box(text, "scene_2.png") == forward
    assert "Corners clicked bottom-right then top-left" in text
    first, second = bot_replies(page)
    assert first == second  # greedy decoding of the same region
    # a follow-up question about the described box
    page.fill("#question textarea", "What color is it?")
    page.click("#ask")
    wait_status(page, "Answered.")
    assert len(bot_replies(page)) == 3 and user_messages(page)[-1].strip() == "What color is it?"


def test_qa_with_two_regions(page: Any, demo_cfg: tuple[str, bool]):
    page.get_by_label("QA").check()
    wait_status(page, "QA mode")
    # region 1 on scene 1, region 2 on another image
    picks = [(1, 0), (2, 0)]
    objs = []
    for n, i in picks:
        sc = pick_example(page, n)
        obj = sc["objects"][i]
        objs.append(obj)
        select_box(page, sc, obj["box_xyxy"])
        wait_status(page, "selected")
        page.click("#add")
        wait_status(page, f"Added region {len(objs)}")
    captions = page.locator("#regions .caption-label").all_inner_texts()
    assert captions == ["1 (new)", "2 (new)"]
    assert page.locator("#regions img").count() == 2
    page.fill("#question textarea", "Are they the same color?")
    page.click("#ask")
    text = wait_status(page, "Answered.")
    assert "image 1[IMG] image 2[IMG]" in text  # the app says it inserted the placeholders
    # one bubble: both regions, numbered, in one picture, and the question as typed
    assert [m.strip() for m in user_messages(page) if m.strip()] == ["Are they the same color?"]
    assert not any(IMG_TOKEN in m for m in user_messages(page))
    strip = page.locator('#chat [data-testid="user"] img')
    assert strip.count() == 1
    thumb_widths = page.locator("#regions img").evaluate_all("imgs => imgs.map(i => i.naturalWidth)")
    assert strip.evaluate("i => i.naturalWidth") == sum(thumb_widths) + 6
    chat_box, strip_box = page.locator("#chat").bounding_box(), strip.bounding_box()
    assert chat_box["y"] <= strip_box["y"] and strip_box["y"] + strip_box["height"] <= chat_box["y"] + \
        chat_box["height"], (chat_box, strip_box)  # in view, with the answer below it
    replies = bot_replies(page)
    assert len(replies) == 1 and replies[0].strip()
    if demo_cfg[1]:
        expected = "yes" if objs[0]["color"] == objs[1]["color"] else "no"
        assert expected in replies[0].lower(), (objs, replies[0])
    assert page.locator("#regions .caption-label").all_inner_texts() == ["1", "2"]
    assert page.input_value("#question textarea") == ""
    # a follow-up keeps the conversation
    page.fill("#question textarea", "Is image 1 large or small?")
    page.press("#question textarea", "Enter")
    page.wait_for_function("n => document.querySelectorAll('#chat [data-testid=\"bot\"]').length === n", arg=2)
    wait_status(page, "Answered.")
    assert user_messages(page)[-1].strip() == "Is image 1 large or small?"
    # an empty question, too many placeholders: visible errors, nothing lost
    page.fill("#question textarea", "   ")
    page.click("#ask")
    assert "empty" in wait_status(page, "Error")
    page.fill("#question textarea", "image[IMG] What is it?")
    page.click("#ask")
    assert "no new region" in wait_status(page, "placeholder")
    assert len(bot_replies(page)) == 2
    # restart clears everything
    page.click("#restart")
    wait_status(page, "Restarted")
    assert bot_replies(page) == [] and page.locator("#regions img").count() == 0
    page.fill("#question textarea", "Are they the same color?")
    page.click("#ask")
    assert "add a region first" in wait_status(page, "Error")


def test_unreadable_upload_shows_an_error_and_the_app_keeps_working(page: Any):
    with page.expect_file_chooser() as chooser:
        page.click("#upload")
    chooser.value.set_files(files=[{"name": "broken.png", "mimeType": "image/png", "buffer": b"not an image"}])
    text = wait_status(page, "Error")
    assert "not an image" in text and "broken.png" in text
    # the status line, in view and red, is where errors show: no toast titled "Warning" over the intro
    box, viewport = page.locator("#status").bounding_box(), page.viewport_size
    assert 0 <= box["y"] and box["y"] + box["height"] <= viewport["height"]
    assert page.locator("#status .error").evaluate("e => getComputedStyle(e).color") == "rgb(185, 28, 28)"
    page.wait_for_timeout(500)
    assert page.locator(".toast-body").count() == 0
    # still works: a real upload, then a Describe round on an example
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (120, 90), (200, 30, 30)).save(buf, format="PNG")
    with page.expect_file_chooser() as chooser:
        page.click("#upload")
    chooser.value.set_files(files=[{"name": "red.png", "mimeType": "image/png", "buffer": buf.getvalue()}])
    wait_status(page, "Loaded red.png (120×90)")
    page.click("#whole")
    assert described_box(wait_status(page, "Described box"), "red.png") == [0, 0, 120, 90]
    sc = pick_example(page, 3)
    select_box(page, sc, sc["objects"][0]["box_xyxy"])
    wait_status(page, "Described box")
    assert described_box(status(page), "scene_3.png")
    assert len(bot_replies(page)) == 2


def test_two_browser_sessions_keep_separate_state(browser: Any, server: str):
    (ctx_a, a), (ctx_b, b) = _open(browser, server), _open(browser, server)
    try:
        sa, sb = pick_example(a, 4), pick_example(b, 5)
        oa, ob = sa["objects"][0]["box_xyxy"], sb["objects"][1]["box_xyxy"]
        click_image(a, sa, oa[0], oa[1])
        wait_status(a, "First corner")
        b.get_by_label("QA").check()  # B's mode does not leak into A
        wait_status(b, "QA mode")
        b.get_by_label("Describe").check()
        wait_status(b, "Describe mode")
        click_image(b, sb, ob[0], ob[1])
        wait_status(b, "First corner")
        a.wait_for_timeout(100)
        b.wait_for_timeout(100)
        # both second corners at once: the queue serves both, each on its own image and box
        click_image(a, sa, oa[2], oa[3])
        click_image(b, sb, ob[2], ob[3])
        box_a = described_box(wait_status(a, "Described box"), "scene_4.png")
        box_b = described_box(wait_status(b, "Described box"), "scene_5.png")
        assert near(box_a, oa) and near(box_b, ob)
        assert len(bot_replies(a)) == 1 and len(bot_replies(b)) == 1
        assert "Described" in status(a) and "scene_5" not in status(a)
    finally:
        ctx_a.close()
        ctx_b.close()
