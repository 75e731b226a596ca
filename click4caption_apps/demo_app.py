"""The click-to-caption Gradio app behind ``demo.py``: Describe and QA modes.

Layout of this module:

- pure helpers, unit-tested without a browser (``tests/test_demo_logic.py``): the
  two-click state machine (:func:`register_click`), the box from two clicks in any
  order (:func:`box_from_clicks`), ``[IMG]`` placeholder insertion
  (:func:`prepare_question`), region thumbnails (:func:`crop_thumbnail`) and drawing
  the selection (:func:`draw_selection`);
- the example scenes shipped in ``assets/examples/`` come from
  :mod:`click4caption.shapes.examples`;
- :class:`DemoModel`: the ONE :class:`~click4caption.captioner.Captioner` of the app,
  shared by every browser session, with a lock so that model calls run one at a time
  (its :class:`~click4caption.conversation.Chat` keeps the ViT output of recent
  images, so a second box on the same image skips the ViT);
- :class:`Session`: what one browser session holds (``gr.State``): the image, the
  clicks, the conversation and its regions. No model in it;
- the event handlers and :func:`build_app`, which makes the ``gr.Blocks``.
"""

import atexit
import hashlib
import html
import logging
import math
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from PIL import Image, ImageDraw, ImageFont

from click4caption.boxes import Box
from click4caption.errors import Click4CaptionError, InputError
from click4caption.generation import GenerationSettings
from click4caption.prompts import IMG_TOKEN

if TYPE_CHECKING:  # gradio and torch are imported lazily: the pure helpers need neither
    import gradio as gr
    import torch

    from click4caption.captioner import Captioner
    from click4caption.prompts import Conversation

logger = logging.getLogger(__name__)

from click4caption.shapes.examples import ExampleScene, load_example_scenes  # noqa: F401 - demo.py's import
THUMB_SIDE = 96
DISPLAY_SIDE = 512  # the canvas shows images with this longer side (clicks are mapped back)

# colours used to draw on the canvas
FIRST_CLICK_COLOR = (255, 0, 0)
SELECTION_COLOR = (255, 0, 0)
REGION_COLOR = (0, 200, 255)

# generation controls (UI ranges)
MAX_BEAMS = 5
MAX_TEMPERATURE = 2.0
MIN_NEW_TOKENS, MAX_NEW_TOKENS_UI = 8, 1000

Point = tuple[int, int]


# ============================================================================ pure helpers
@dataclass(frozen=True)
class ClickState:
    """Where the two-click box selection stands: ``first`` is the pending corner."""

    first: Point | None = None

    @property
    def waiting_for_second(self) -> bool:
        return self.first is not None


def as_point(index: Any) -> Point:
    """``gr.SelectData.index`` of an image (``[x, y]`` in image pixels) -> ``(x, y)``.

    Raises:
        InputError: no coordinates (a click outside the picture).
    """
    if not isinstance(index, (list, tuple)) or len(index) != 2:
        raise InputError("click inside the picture")
    try:
        x, y = (int(round(float(v))) for v in index)
    except (TypeError, ValueError):
        raise InputError("click inside the picture") from None
    return x, y


def display_scale(width: int, height: int, side: int = DISPLAY_SIDE) -> float:
    """Factor from image pixels to canvas pixels: the canvas shows every image with
    its longer side ``side`` (small images are enlarged, large ones sent smaller)."""
    return side / max(width, height)


def to_image_point(point: Point, scale: float, width: int, height: int) -> Point:
    """A canvas click (canvas pixels) -> image pixels, inside ``[0, W] x [0, H]``."""
    x = min(max(int(round(point[0] / scale)), 0), width)
    y = min(max(int(round(point[1] / scale)), 0), height)
    return x, y


def box_from_clicks(a: Point, b: Point) -> tuple[Box, bool]:
    """Two clicked corners, in any order -> ``((x1, y1, x2, y2), swapped)``.

    The box spans both points (top-left = the smaller coordinates); ``swapped`` is
    True when the first click was not the top-left corner.
    """
    x1, x2 = sorted((a[0], b[0]))
    y1, y2 = sorted((a[1], b[1]))
    swapped = (x1, y1) != (a[0], a[1])
    return (float(x1), float(y1), float(x2), float(y2)), swapped


def register_click(state: ClickState, point: Point) -> tuple[ClickState, tuple[Box, bool] | None]:
    """Advance the click state machine.

    First click: remembered, no box yet. Second click: the box (see
    :func:`box_from_clicks`), and the machine is ready for a new first corner.
    """
    if state.first is None:
        return ClickState(first=point), None
    return ClickState(), box_from_clicks(state.first, point)


def region_name(number: int, total: int) -> str:
    """How a region is named in a prompt: ``image`` alone, else ``image <number>``."""
    return "image" if total == 1 else f"image {number}"


def prepare_question(question: str | None, num_new: int, num_before: int = 0) -> tuple[str, str | None]:
    """The prompt for one question, and a note when placeholders were inserted.

    Args:
        question: what the user typed.
        num_new: regions added since the last question (each needs one ``[IMG]``).
        num_before: regions already in the conversation (numbered first).

    A question without ``[IMG]`` gets one per new region, numbered in the
    conversation (``"image 1[IMG] image 2[IMG] " + question``, or ``"image[IMG] "``
    when the conversation has a single region). A question that has placeholders
    must have exactly one per new region. A follow-up with no new region is text.

    Raises:
        InputError: empty question, no region at all, or the wrong number of ``[IMG]``.
    """
    text = (question or "").strip()
    if not text:
        raise InputError("the question is empty: type a question, e.g. 'What color is it?'")
    if num_before + num_new == 0:
        raise InputError("add a region first: select a box on an image (or press 'Whole image'), "
                         "then press 'Add region'")
    count = text.count(IMG_TOKEN)
    if count == 0 and num_new > 0:
        total = num_before + num_new
        prefix = "".join(f"{region_name(num_before + i + 1, total)}{IMG_TOKEN} " for i in range(num_new))
        what = "the new region" if num_new == 1 else f"the {num_new} new regions"
        return prefix + text, f"No {IMG_TOKEN} in the question: added `{prefix.strip()}` for {what}."
    if count != num_new:
        if num_new == 0:
            raise InputError(f"the question has {count} {IMG_TOKEN} placeholder(s) but no new region was added "
                             f"(regions already asked about stay in the conversation: refer to them in words)")
        raise InputError(f"the question has {count} {IMG_TOKEN} placeholder(s) but {num_new} new region(s) were "
                         f"added: use one {IMG_TOKEN} per new region, or none to have them inserted")
    return text, None


def _pixel_box(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
    """A float box -> integer pixel bounds, at least 1 px wide and high, inside the image."""
    x1 = min(max(int(math.floor(box[0])), 0), width - 1)
    y1 = min(max(int(math.floor(box[1])), 0), height - 1)
    x2 = min(max(int(math.ceil(box[2])), x1 + 1), width)
    y2 = min(max(int(math.ceil(box[3])), y1 + 1), height)
    return x1, y1, x2, y2


def crop_thumbnail(image: Image.Image, box: Box, max_side: int = THUMB_SIDE) -> Image.Image:
    """The region ``box`` of ``image`` as an RGB thumbnail no larger than ``max_side``."""
    crop = image.convert("RGB").crop(_pixel_box(box, image.width, image.height))
    crop.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return crop


def line_width(image: Image.Image) -> int:
    """Outline width that stays visible on small and large images (upstream's rule)."""
    return max(2, (image.width + image.height) // 224)


def display_image(image: Image.Image, scale: float) -> Image.Image:
    """``image`` resized by ``scale`` for the canvas (RGB, a new image)."""
    if scale == 1.0:
        return image.convert("RGB").copy()
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.convert("RGB").resize(size, Image.Resampling.BICUBIC)


def draw_selection(image: Image.Image, first: Point | None = None, box: Box | None = None,
                   regions: Sequence[tuple[int, Box]] = (), scale: float = 1.0) -> Image.Image:
    """A copy of ``image`` with the added ``regions`` (numbered), the selected ``box``
    and the ``first`` clicked corner drawn on it. Coordinates are in original-image
    pixels, ``scale`` times smaller than ``image`` (the canvas, see :func:`display_image`)."""
    vis = image.convert("RGB").copy()

    def scaled(b: Box) -> Box:
        return (b[0] * scale, b[1] * scale, b[2] * scale, b[3] * scale)

    draw = ImageDraw.Draw(vis)
    lw = line_width(vis)
    font = ImageFont.load_default(size=max(12, 6 * lw)) if regions else None
    for number, rbox in regions:
        x1, y1, x2, y2 = _pixel_box(scaled(rbox), vis.width, vis.height)
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), outline=REGION_COLOR, width=max(1, lw - 1))
        draw.text((x1 + lw + 2, y1 + lw), str(number), fill=REGION_COLOR, font=font, stroke_width=1,
                  stroke_fill=(0, 0, 0))
    if box is not None:
        x1, y1, x2, y2 = _pixel_box(scaled(box), vis.width, vis.height)
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), outline=SELECTION_COLOR, width=lw)
    if first is not None:
        x, y = round(first[0] * scale), round(first[1] * scale)
        r = 2 * lw + 2
        draw.line((x - r, y, x + r, y), fill=FIRST_CLICK_COLOR, width=lw)
        draw.line((x, y - r, x, y + r), fill=FIRST_CLICK_COLOR, width=lw)
        draw.ellipse((x - lw, y - lw, x + lw, y + lw), outline=(255, 255, 255), width=1)
    return vis


def format_box(box: Box) -> str:
    return "(" + ", ".join(f"{v:g}" for v in box) + ")"


# ============================================================================ the model
@dataclass
class Turn:
    """One question/answer about to happen; ``conv`` and ``img_list`` are copies that
    the session adopts only when the answer is complete."""

    conv: "Conversation"
    img_list: list["torch.Tensor"]
    reply: str = ""


class DemoModel:
    """The app's single Captioner. Every model call goes through :meth:`stream_turn`,
    which holds a lock, so calls never overlap even outside Gradio's queue."""

    def __init__(self, captioner: "Captioner", name: str = "", device: str = "") -> None:
        self.captioner = captioner
        self.name = name
        self.device = device
        self.lock = threading.Lock()

    @property
    def cache_hits(self) -> int:
        return self.captioner.chat.cache_hits

    @property
    def cache_misses(self) -> int:
        return self.captioner.chat.cache_misses

    def stream_turn(self, conv: "Conversation", img_list: Sequence["torch.Tensor"], regions: Sequence[Any],
                    prompt: str, settings: "GenerationSettings") -> Iterator[tuple[str, Turn]]:
        """Encode ``regions``, ask ``prompt`` (one ``[IMG]`` per region) after ``conv`` and
        yield ``(reply so far, turn)``; ``conv`` and ``img_list`` are not modified.

        Raises:
            InputError: placeholder count, or the conversation no longer fits the context.
        """
        from click4caption.prompts import check_question

        check_question(prompt, len(regions)) if regions else _check_no_placeholder(prompt)
        with self.lock:
            soft = self.captioner.encode_regions(regions) if regions else []
            turn = Turn(conv.copy(), list(img_list) + list(soft))
            self.captioner.chat.ask(prompt, turn.conv)
            used = self.captioner.chat.context_length(turn.conv, turn.img_list)
            if used + settings.max_new_tokens > settings.max_length:
                raise InputError(
                    f"the conversation is full: {used} tokens plus {settings.max_new_tokens} new ones exceed the "
                    f"{settings.max_length}-token context. Press Restart for a new conversation "
                    f"(or lower 'Max new tokens')")
            for partial in self.captioner.stream(turn.conv, turn.img_list, settings):
                turn.reply = partial
                yield partial, turn


def _check_no_placeholder(prompt: str) -> None:
    if IMG_TOKEN in prompt:
        raise InputError(f"the question has {prompt.count(IMG_TOKEN)} {IMG_TOKEN} placeholder(s) but no new "
                         "region was added")


def settings_from_controls(num_beams: Any, temperature: Any, max_new_tokens: Any) -> "GenerationSettings":
    """UI controls -> settings; temperature 0 means greedy (or plain beam search).

    Raises:
        InputError: a value out of the UI's range (possible through the API).
    """
    try:
        beams, temp, new = int(num_beams), float(temperature), int(max_new_tokens)
    except (TypeError, ValueError):
        raise InputError("the generation settings must be numbers") from None
    if not 1 <= beams <= MAX_BEAMS:
        raise InputError(f"beams must be between 1 and {MAX_BEAMS}")
    if not (0.0 <= temp <= MAX_TEMPERATURE) or math.isnan(temp):
        raise InputError(f"temperature must be between 0 and {MAX_TEMPERATURE:g}")
    if not MIN_NEW_TOKENS <= new <= MAX_NEW_TOKENS_UI:
        raise InputError(f"max new tokens must be between {MIN_NEW_TOKENS} and {MAX_NEW_TOKENS_UI}")
    return GenerationSettings(num_beams=beams, temperature=temp, max_new_tokens=new)


# ============================================================================ per-session state
@dataclass
class RegionItem:
    """A region added for QA: its image, validated box, thumbnail and number."""

    number: int
    region: Any  # click4caption.captioner.Region
    source: str
    thumb: Image.Image


@dataclass
class Session:
    """One browser session's state (kept in ``gr.State``): never the model."""

    image: Image.Image | None = None
    image_name: str = ""
    clicks: ClickState = field(default_factory=ClickState)
    box: Box | None = None  # the last completed selection on ``image``
    describe_box: Box | None = None  # a box waiting to be described
    describe_note: str = ""  # what the selection step had to say about that box
    conv: Any = None  # Conversation, made lazily (keeps this importable without torch)
    img_list: list[Any] = field(default_factory=list)  # soft tokens, one per [IMG] asked so far
    regions: list[RegionItem] = field(default_factory=list)  # every region added (the gallery)
    pending: list[RegionItem] = field(default_factory=list)  # added since the last question
    messages: list[dict[str, Any]] = field(default_factory=list)  # the Chatbot's messages
    _display: Image.Image | None = field(default=None, repr=False)  # the image at canvas size

    def set_image(self, image: Image.Image, name: str) -> None:
        self.image, self.image_name = image, name
        self._display = display_image(image, self.scale)  # resized once, drawn on per click
        self.clicks, self.box, self.describe_box = ClickState(), None, None

    def clear_conversation(self) -> None:
        self.conv, self.img_list, self.regions, self.pending, self.messages = None, [], [], [], []
        self.clicks, self.box, self.describe_box = ClickState(), None, None

    def regions_on_image(self) -> list[tuple[int, Box]]:
        """Added regions that lie on the current image (drawn on the canvas)."""
        return [(r.number, r.region.box) for r in self.regions if r.region.image is self.image]

    @property
    def scale(self) -> float:
        return display_scale(self.image.width, self.image.height) if self.image is not None else 1.0

    def canvas(self) -> Image.Image | None:
        """What the canvas shows: the image at display scale with the selection drawn."""
        if self.image is None:
            return None
        if self._display is None:
            self._display = display_image(self.image, self.scale)
        return draw_selection(self._display, self.clicks.first, None if self.clicks.first else self.box,
                              self.regions_on_image(), self.scale)


# ============================================================================ chat media
class ThumbStore:
    """Region thumbnails as PNG files (the Chatbot shows files), named by content."""

    def __init__(self, folder: str | Path | None = None) -> None:
        if folder is None:  # our own temporary folder, removed when the app exits
            folder = tempfile.mkdtemp(prefix="click4caption-demo-")
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def save(self, image: Image.Image) -> str:
        digest = hashlib.sha1(image.tobytes() + repr(image.size).encode()).hexdigest()[:16]
        path = self.folder / f"region-{digest}.png"
        if not path.exists():
            image.save(path)
        return str(path)


# ============================================================================ the app
TITLE = "Click4Caption"
INTRO = (
    "Pick an image (an example scene below, or upload one), then **click the top-left corner and the "
    "bottom-right corner** of a region. **Describe** mode describes every box you draw; in **QA** mode add one "
    "or more regions (from one image or several) and ask about them, with `[IMG]` marking each region "
    "(left out, the app inserts them: `image 1[IMG] image 2[IMG] Are they the same color?`)."
)
CSS = """
#status {min-height: 2.4em}
#status .error {color: #b91c1c; font-weight: 600}
#canvas img {cursor: crosshair}
"""


def _error(msg: str) -> str:
    return f'<span class="error">⚠ Error: {html.escape(msg)}</span>'


def _region_gallery(session: Session) -> list[tuple[Image.Image, str]]:
    return [(r.thumb, str(r.number) + (" (new)" if r in session.pending else ""))
            for r in session.regions]


def build_app(model: DemoModel, examples: Sequence[ExampleScene] | None = None,
              thumbs: ThumbStore | None = None) -> "gr.Blocks":
    """The Gradio Blocks of the demo; call ``.queue()`` and ``.launch()`` on it."""
    import gradio as gr

    from click4caption.captioner import Captioner
    from click4caption.prompts import DESCRIBE_PROMPT
    from click4caption.images import load_image

    examples = list(load_example_scenes() if examples is None else examples)
    thumbs = thumbs or ThumbStore()

    def info_text() -> str:
        return (f"Model: `{model.name or 'click4caption'}` on {model.device or 'cpu'} · images encoded by the ViT: "
                f"{model.cache_misses} · reused from the cache: {model.cache_hits}")

    def fail(err: Exception) -> str:
        """A visible error: a toast and the status line. Unexpected errors are logged."""
        if isinstance(err, Click4CaptionError):
            msg = str(err)
            logger.info("user error: %s", msg)
        else:
            logger.exception("unexpected error in the demo")
            msg = f"internal error ({type(err).__name__}: {err}); the app keeps running"
        gr.Warning(html.escape(msg))
        return _error(msg)

    # ------------------------------------------------------------ image loading
    def load_into(session: Session | None, image: Image.Image, name: str) -> tuple[Any, Session, str]:
        session = session or Session()
        session.set_image(image, name)
        hint = "click the **top-left corner** of a region"
        return session.canvas(), session, f"Loaded **{name}** ({image.width}×{image.height}): {hint}."

    def on_upload(file: Any, session: Session | None):
        session = session or Session()
        try:
            if file is None:
                raise InputError("no file was uploaded")
            path = file if isinstance(file, str) else getattr(file, "name", None) or str(file)
            name = Path(path).name
            try:
                image = load_image(path)
            except InputError as err:  # name the file as the user knows it, not the server's copy
                raise InputError(str(err).replace(str(path), name)) from None
            return load_into(session, image, name)
        except Exception as err:  # noqa: BLE001 - shown to the user, app keeps working
            return gr.skip(), session, fail(err)

    def on_example(session: Session | None, evt: gr.SelectData):
        session = session or Session()
        try:
            scene = examples[int(evt.index)]
            return load_into(session, load_image(scene.path), scene.name)
        except Exception as err:  # noqa: BLE001
            return gr.skip(), session, fail(err)

    # ------------------------------------------------------------ selecting boxes
    def selection_done(session: Session, box: Box, mode: str, note: str = "") -> str:
        region = Captioner.region(session.image, box)  # validates (InputError on an empty box)
        session.box = region.box
        fixes = " ".join(w[0].upper() + w[1:] + "." for w in region.warnings)
        extra = f" {note}" if note else ""
        extra += f" {fixes}" if fixes else ""
        if mode == "Describe":
            session.describe_box, session.describe_note = region.box, extra.strip()
            return f"Box {format_box(region.box)} on **{session.image_name}**: describing…{extra}"
        return (f"Box {format_box(region.box)} on **{session.image_name}** selected: press **Add region** "
                f"to use it in a question.{extra}")

    def on_click(session: Session | None, mode: str, evt: gr.SelectData):
        session = session or Session()
        session.describe_box = None
        try:
            if session.image is None:
                raise InputError("pick an example scene or upload an image first")
            point = to_image_point(as_point(evt.index), session.scale, session.image.width, session.image.height)
            session.clicks, done = register_click(session.clicks, point)
            if done is None:
                session.box = None
                return session.canvas(), session, (
                    f"First corner at ({point[0]}, {point[1]}): now click the **bottom-right corner**.")
            box, swapped = done
            note = "(The corners were clicked bottom-right first: the box spans both clicks.)" if swapped else ""
            try:
                status = selection_done(session, box, mode, note)
            except Click4CaptionError:
                session.box = None
                raise
            return session.canvas(), session, status
        except Exception as err:  # noqa: BLE001
            return session.canvas() if session.image is not None else gr.skip(), session, fail(err)

    def on_whole(session: Session | None, mode: str):
        session = session or Session()
        session.describe_box = None
        try:
            if session.image is None:
                raise InputError("pick an example scene or upload an image first")
            session.clicks = ClickState()
            status = selection_done(session, (-1, -1, -1, -1), mode, "(whole image)")
            return session.canvas(), session, status
        except Exception as err:  # noqa: BLE001
            return gr.skip(), session, fail(err)

    # ------------------------------------------------------------ model calls (streamed)
    def stream_into_chat(session: Session, regions: list[Any], prompt: str, shown: list[dict[str, Any]],
                         settings: Any) -> Iterator[tuple[list[dict[str, Any]], bool]]:
        """Yield ``(chat messages, finished)`` while the reply grows; the session adopts
        the new conversation only when the reply is complete."""
        conv = session.conv if session.conv is not None else model.captioner.chat.new_conversation()
        base = session.messages + shown
        yield base + [{"role": "assistant", "content": ""}], False
        turn = None
        for partial, turn in model.stream_turn(conv, session.img_list, regions, prompt, settings):
            yield base + [{"role": "assistant", "content": partial}], False
        assert turn is not None
        session.conv, session.img_list = turn.conv, turn.img_list
        session.messages = base + [{"role": "assistant", "content": turn.reply or "(empty reply)"}]
        yield session.messages, True

    def run_describe(session: Session | None, beams: Any, temperature: Any, max_new: Any):
        session = session or Session()
        box, session.describe_box = session.describe_box, None
        if box is None or session.image is None:
            yield gr.skip(), session, gr.skip(), gr.skip()
            return
        try:
            settings = settings_from_controls(beams, temperature, max_new)
            region = Captioner.region(session.image, box)
            thumb = crop_thumbnail(session.image, region.box)
            # each box is a new conversation (follow-up questions are about this box)
            session.conv, session.img_list, session.pending = None, [], []
            shown = [{"role": "user", "content": {"path": thumbs.save(thumb),
                                                  "alt_text": f"box {format_box(region.box)}"}},
                     {"role": "user", "content": DESCRIBE_PROMPT}]
            done = (f"Described box {format_box(region.box)} of **{session.image_name}**. Click two corners for "
                    f"another box, or ask a follow-up question about this one. {session.describe_note}").strip()
            for chat, finished in stream_into_chat(session, [region], DESCRIBE_PROMPT, shown, settings):
                yield chat, session, (done if finished else "Describing…"), info_text()
        except Exception as err:  # noqa: BLE001
            yield session.messages, session, fail(err), info_text()

    def on_add(session: Session | None):
        session = session or Session()
        try:
            if session.image is None:
                raise InputError("pick an example scene or upload an image first")
            if session.box is None:
                raise InputError("select a box first: click its top-left and bottom-right corners "
                                 "(or press 'Whole image')")
            region = Captioner.region(session.image, session.box)
            item = RegionItem(len(session.regions) + 1, region, session.image_name,
                              crop_thumbnail(session.image, region.box))
            session.regions.append(item)
            session.pending.append(item)
            session.box = None
            n = len(session.pending)
            status = (f"Added region **{item.number}** {format_box(region.box)} of **{item.source}** "
                      f"({n} new region{'s' if n > 1 else ''} for the next question). Add more, or ask a question.")
            return session.canvas(), _region_gallery(session), session, status
        except Exception as err:  # noqa: BLE001
            return gr.skip(), gr.skip(), session, fail(err)

    def run_ask(question: str, session: Session | None, mode: str, beams: Any, temperature: Any, max_new: Any):
        session = session or Session()
        try:
            settings = settings_from_controls(beams, temperature, max_new)
            before = len(session.img_list)
            if mode == "Describe" and before == 0 and (question or "").strip():
                raise InputError("describe a box first (click its two corners), then ask follow-up questions "
                                 "about it; or switch to QA mode to ask about several regions")
            prompt, note = prepare_question(question, len(session.pending), before)
            shown = [{"role": "user", "content": {"path": thumbs.save(r.thumb), "alt_text": f"region {r.number}"}}
                     for r in session.pending]
            shown.append({"role": "user", "content": prompt})
            pending = list(session.pending)
            done = "Answered." + (f" {note}" if note else "")
            for chat, finished in stream_into_chat(session, [r.region for r in pending], prompt, shown, settings):
                if finished:  # committed: the new regions are in the conversation now
                    session.pending = []
                    yield chat, session, done, info_text(), "", _region_gallery(session)
                else:
                    yield chat, session, "Answering…", info_text(), gr.skip(), gr.skip()
        except Exception as err:  # noqa: BLE001
            yield session.messages, session, fail(err), info_text(), gr.skip(), gr.skip()

    # ------------------------------------------------------------ resets
    def on_restart(_session: Session | None):
        session = Session()
        return None, session, [], [], "", "Restarted: pick an image.", info_text()

    def on_mode(mode: str, session: Session | None):
        session = session or Session()
        session.clear_conversation()
        qa = mode == "QA"
        hint = ("QA mode: select a box, press **Add region** (repeat for more regions), then ask a question."
                if qa else "Describe mode: click two corners to describe a region.")
        return (session.canvas() if session.image is not None else gr.skip(), session, [],
                gr.update(value=[], visible=qa), gr.update(visible=qa), hint)

    # ------------------------------------------------------------ layout
    model_queue = dict(concurrency_id="model", concurrency_limit=1)
    with gr.Blocks(title=TITLE) as app:
        state = gr.State(None)
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        with gr.Row():
            with gr.Column(scale=5):
                canvas = gr.Image(label="Image: click two corners", type="pil", interactive=False, height=420,
                                  format="png", elem_id="canvas", buttons=[],
                                  placeholder="Pick an example scene below or upload an image")
                with gr.Row():
                    upload = gr.UploadButton("Upload an image", file_types=["image"], file_count="single",
                                             type="filepath", elem_id="upload")
                    whole = gr.Button("Whole image", elem_id="whole")
                    add = gr.Button("Add region", variant="primary", elem_id="add", visible=False)
                gallery = gr.Gallery(value=[(load_image(s.path), s.name) for s in examples],
                                     label="Example scenes (click one)", columns=5, height=150, format="png",
                                     allow_preview=False, object_fit="contain", elem_id="examples",
                                     interactive=False, buttons=[])
                mode = gr.Radio(["Describe", "QA"], value="Describe", label="Mode", elem_id="mode")
                with gr.Accordion("Generation settings", open=False):
                    beams = gr.Slider(1, MAX_BEAMS, value=1, step=1, label="Beams", elem_id="beams")
                    temperature = gr.Slider(0.0, MAX_TEMPERATURE, value=0.0, step=0.1,
                                            label="Temperature (0 = greedy)", elem_id="temperature")
                    max_new = gr.Slider(MIN_NEW_TOKENS, MAX_NEW_TOKENS_UI, value=GenerationSettings().max_new_tokens, step=1,
                                        label="Maximum new tokens", elem_id="max_new_tokens")
            with gr.Column(scale=6):
                status = gr.Markdown("Pick an example scene or upload an image.", elem_id="status")
                chatbot = gr.Chatbot(label="Chat", height=420, elem_id="chat", feedback_options=None,
                                     buttons=["copy"])
                regions = gr.Gallery(label="Regions for QA (numbered as in the question)", columns=6, height=150,
                                     fit_columns=False, allow_preview=False, object_fit="contain",
                                     elem_id="regions", visible=False, interactive=False, buttons=[])
                with gr.Row():
                    question = gr.Textbox(show_label=False, scale=5, elem_id="question", lines=1, max_lines=4,
                                          placeholder="Ask about the regions, e.g. 'Are they the same color?' "
                                                      "([IMG] placeholders are optional)")
                    ask = gr.Button("Ask", variant="primary", scale=1, min_width=80, elem_id="ask")
                restart = gr.Button("Restart", elem_id="restart")
                info = gr.Markdown(info_text(), elem_id="model-info")

        gen = [beams, temperature, max_new]
        upload.upload(on_upload, [upload, state], [canvas, state, status])
        gallery.select(on_example, [state], [canvas, state, status])
        canvas.select(on_click, [state, mode], [canvas, state, status]).then(
            run_describe, [state] + gen, [chatbot, state, status, info], **model_queue)
        whole.click(on_whole, [state, mode], [canvas, state, status]).then(
            run_describe, [state] + gen, [chatbot, state, status, info], **model_queue)
        add.click(on_add, [state], [canvas, regions, state, status])
        ask_outputs = [chatbot, state, status, info, question, regions]
        question.submit(run_ask, [question, state, mode] + gen, ask_outputs, **model_queue)
        ask.click(run_ask, [question, state, mode] + gen, ask_outputs, **model_queue)
        restart.click(on_restart, [state], [canvas, state, chatbot, regions, question, status, info])
        mode.change(on_mode, [mode, state], [canvas, state, chatbot, regions, add, status])
    return app
