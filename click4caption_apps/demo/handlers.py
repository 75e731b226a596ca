"""Every event of the demo as a method of :class:`DemoHandlers`, which holds what the
sessions share (the locked captioner, the example scenes, the thumbnail files). A
method takes the session and the event's values and returns plain values and
``gr.update``/``gr.skip`` objects, so tests call it directly with a fake event (any
object with ``.index``); :mod:`.layout` only wires them to components.

No ``from __future__ import annotations`` here: Gradio reads the annotations at run
time (``gr.SelectData`` marks the event argument; the API endpoints' types make their
documentation).
"""
import atexit
import hashlib
import html
import logging
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import gradio as gr
from PIL import Image

from click4caption.captioner import Captioner, Region
from click4caption.errors import Click4CaptionError, InputError
from click4caption.generation import GenerationSettings
from click4caption.images import load_image
from click4caption.prompts import DESCRIBE_PROMPT, DESCRIBE_QUESTION
from click4caption.shapes.examples import ExampleScene, load_example_scenes
from click4caption_apps.demo.canvas import (
    as_point,
    crop_thumbnail,
    format_box,
    region_strip,
    to_image_point,
)
from click4caption_apps.demo.model import LockedCaptioner
from click4caption_apps.demo.session import ClickState, RegionItem, Session, prepare_question, register_click

logger = logging.getLogger(__name__)

# generation controls: the UI's ranges (the defaults are the captioner's settings)
MAX_BEAMS = 5
MAX_TEMPERATURE = 2.0
MIN_NEW_TOKENS, MAX_NEW_TOKENS_UI = 8, 1000

DESCRIBE, QA = "Describe", "QA"  # the modes
SELECT_HINT = "click one corner of a region, then the **opposite corner**"

Chat = list[dict[str, Any]]


def settings_from_controls(num_beams: Any, temperature: Any, max_new_tokens: Any,
                           base: GenerationSettings | None = None) -> GenerationSettings:
    """UI controls -> ``base`` with those three changed; temperature 0 means greedy
    (or plain beam search).

    Raises:
        InputError: a value out of the UI's range (possible through a crafted request).
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
    return (base or GenerationSettings()).replace(num_beams=beams, temperature=temp, max_new_tokens=new)


def error_status(msg: str) -> str:
    """The status line for an error, in red. The status line is the one place errors
    show: Gradio 6 titles every toast it can show without ending the event "Warning",
    and a toast covered the intro."""
    return f'<span class="error">⚠ Error: {html.escape(msg)}</span>'


class ThumbStore:
    """Region pictures as PNG files (the Chatbot shows files), named by content so that
    the same picture is written once."""

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


def _load_named(path: str, name: str) -> Image.Image:
    """Load ``path``, naming the file in errors as the user knows it (not the server's copy)."""
    try:
        return load_image(path)
    except InputError as err:
        raise InputError(str(err).replace(str(path), name)) from None


def _region_gallery(session: Session) -> list[tuple[Image.Image, str]]:
    return [(r.thumb, str(r.number) + (" (new)" if r in session.pending else "")) for r in session.regions]


class DemoHandlers:
    """The demo's events, one method each, and the two API endpoints.

    Args:
        model: the captioner every session shares.
        examples: the example scenes (default: the shipped ones).
        thumbs: where region pictures for the chat are written (default: a temporary folder).
    """

    def __init__(self, model: LockedCaptioner, examples: Sequence[ExampleScene] | None = None,
                 thumbs: ThumbStore | None = None) -> None:
        self.model = model
        self.examples = list(load_example_scenes() if examples is None else examples)
        self.thumbs = thumbs or ThumbStore()

    # ------------------------------------------------------------ shared pieces
    @property
    def settings(self) -> GenerationSettings:
        """The captioner's settings: the UI's initial values and the API's settings."""
        return self.model.captioner.settings

    def info_text(self) -> str:
        m = self.model
        return (f"Model: `{m.name or 'click4caption'}` on {m.device or 'cpu'} · images encoded by the ViT: "
                f"{m.cache_misses} · reused from the cache: {m.cache_hits}")

    def example_gallery(self) -> list[tuple[Image.Image, str]]:
        """The example scenes as the gallery shows them: the picture and its name."""
        return [(load_image(s.path), s.name) for s in self.examples]

    def fail(self, err: Exception) -> str:
        """The status line for ``err``. Unexpected errors are logged with their
        traceback; the app keeps running."""
        if isinstance(err, Click4CaptionError):
            msg = str(err)
            logger.info("user error: %s", msg)
        else:
            logger.exception("unexpected error in the demo")
            msg = f"internal error ({type(err).__name__}: {err}); the app keeps running"
        return error_status(msg)

    @staticmethod
    def _image_of(session: Session) -> Image.Image:
        """The session's image.

        Raises:
            InputError: none loaded yet.
        """
        if session.image is None:
            raise InputError("pick an example scene or upload an image first")
        return session.image

    def _load_into(self, session: Session, image: Image.Image, name: str) -> tuple[Any, Session, str]:
        session.set_image(image, name)
        return session.canvas(), session, f"Loaded **{name}** ({image.width}×{image.height}): {SELECT_HINT}."

    def _selected(self, session: Session, box: Sequence[float], mode: str, note: str) -> str:
        """Validate the selected ``box`` and say what happens next; in Describe mode the
        box waits for :meth:`describe`.

        Raises:
            InputError: an empty box.
        """
        region = Captioner.region(session.image, box)
        session.box = region.box
        fixes = " ".join(w[0].upper() + w[1:] + "." for w in region.warnings)
        extra = " ".join(part for part in (note, fixes) if part)
        where = f"Box {format_box(region.box)} on **{session.image_name}**"
        if mode == DESCRIBE:
            session.describe_box, session.describe_note = region.box, extra
            return f"{where}: describing… {extra}".strip()
        return f"{where} selected: press **Add region** to use it in a question. {extra}".strip()

    def _chat_picture(self, image: Image.Image, alt: str) -> dict[str, str]:
        return {"path": self.thumbs.save(image), "alt_text": alt}

    def _stream_into_chat(self, session: Session, regions: list[Region], prompt: str, shown: dict[str, Any],
                          settings: GenerationSettings) -> Iterator[tuple[Chat, bool]]:
        """Yield ``(chat messages, finished)`` while the reply grows; ``shown`` is the
        user's bubble. The session adopts the new conversation only when the reply is
        complete."""
        conv = session.conv if session.conv is not None else self.model.new_conversation()
        base = session.messages + [shown]
        yield base + [{"role": "assistant", "content": ""}], False
        turn = None
        for partial, turn in self.model.stream_turn(conv, session.img_list, regions, prompt, settings):
            yield base + [{"role": "assistant", "content": partial}], False
        assert turn is not None
        session.conv, session.img_list = turn.conv, turn.img_list
        session.messages = base + [{"role": "assistant", "content": turn.reply or "(empty reply)"}]
        yield session.messages, True

    # ------------------------------------------------------------ images
    def upload(self, file: Any, session: Session | None) -> tuple[Any, Session, str]:
        """An uploaded file -> the canvas (outputs: canvas, state, status)."""
        session = session or Session()
        try:
            if file is None:
                raise InputError("no file was uploaded")
            path = file if isinstance(file, str) else getattr(file, "name", None) or str(file)
            name = Path(path).name
            return self._load_into(session, _load_named(path, name), name)
        except Exception as err:  # noqa: BLE001 - shown to the user, the app keeps working
            return gr.skip(), session, self.fail(err)

    def select_example(self, session: Session | None, evt: gr.SelectData) -> tuple[Any, Session, str]:
        """A click on an example scene (outputs: canvas, state, status)."""
        session = session or Session()
        try:
            scene = self.examples[int(evt.index)]
            return self._load_into(session, load_image(scene.path), scene.name)
        except Exception as err:  # noqa: BLE001
            return gr.skip(), session, self.fail(err)

    # ------------------------------------------------------------ selecting boxes
    def click(self, session: Session | None, mode: str, evt: gr.SelectData) -> tuple[Any, Session, str]:
        """A click on the canvas: the first corner, or the second (then the box is
        selected, and in Describe mode described by :meth:`describe`, chained after this)."""
        session = session or Session()
        session.describe_box = None
        try:
            image = self._image_of(session)
            point = to_image_point(as_point(evt.index), session.scale, image.width, image.height)
            session.clicks, selection = register_click(session.clicks, point)
            if selection is None:
                session.box = None
                return session.canvas(), session, (
                    f"First corner at ({point[0]}, {point[1]}): now click the **opposite corner**.")
            try:
                status = self._selected(session, selection.box, mode, f"(Corners clicked {selection.order}.)")
            except Click4CaptionError:
                session.box = None
                raise
            return session.canvas(), session, status
        except Exception as err:  # noqa: BLE001
            return session.canvas() if session.image is not None else gr.skip(), session, self.fail(err)

    def whole_image(self, session: Session | None, mode: str) -> tuple[Any, Session, str]:
        """The whole-image button: the ``-1`` box (outputs as :meth:`click`)."""
        session = session or Session()
        session.describe_box = None
        try:
            self._image_of(session)
            session.clicks = ClickState()
            return session.canvas(), session, self._selected(session, (-1, -1, -1, -1), mode, "(whole image)")
        except Exception as err:  # noqa: BLE001
            return gr.skip(), session, self.fail(err)

    # ------------------------------------------------------------ model calls (streamed)
    def describe(self, session: Session | None, beams: Any, temperature: Any, max_new: Any
                 ) -> Iterator[tuple[Any, Session, Any, Any]]:
        """Describe the box the last click or whole-image press selected, if any, in a new
        conversation (outputs: chat, state, status, info)."""
        session = session or Session()
        box, session.describe_box = session.describe_box, None
        if box is None or session.image is None:
            yield gr.skip(), session, gr.skip(), gr.skip()
            return
        try:
            settings = settings_from_controls(beams, temperature, max_new, self.settings)
            region = Captioner.region(session.image, box)
            # each box is a new conversation (follow-up questions are about this box)
            session.conv, session.img_list, session.pending = None, [], []
            shown = {"role": "user", "content": [
                self._chat_picture(crop_thumbnail(session.image, region.box), f"box {format_box(region.box)}"),
                DESCRIBE_QUESTION]}
            done = (f"Described box {format_box(region.box)} of **{session.image_name}**. Click two corners for "
                    f"another box, or ask a follow-up question about this one. {session.describe_note}").strip()
            for chat, finished in self._stream_into_chat(session, [region], DESCRIBE_PROMPT, shown, settings):
                yield chat, session, (done if finished else "Describing…"), self.info_text()
        except Exception as err:  # noqa: BLE001
            yield session.messages, session, self.fail(err), self.info_text()

    def add_region(self, session: Session | None) -> tuple[Any, Any, Session, str]:
        """Add the selected box to the next question (outputs: canvas, regions, state, status)."""
        session = session or Session()
        try:
            image = self._image_of(session)
            if session.box is None:
                raise InputError("select a box first: click two opposite corners of it (or press 'Whole image')")
            region = Captioner.region(image, session.box)
            item = RegionItem(len(session.regions) + 1, region, session.image_name, crop_thumbnail(image, region.box))
            session.regions.append(item)
            session.pending.append(item)
            session.box = None
            n = len(session.pending)
            status = (f"Added region **{item.number}** {format_box(region.box)} of **{item.source}** "
                      f"({n} new region{'s' if n > 1 else ''} for the next question). Add more, or ask a question.")
            return session.canvas(), _region_gallery(session), session, status
        except Exception as err:  # noqa: BLE001
            return gr.skip(), gr.skip(), session, self.fail(err)

    def ask(self, question: str, session: Session | None, mode: str, beams: Any, temperature: Any, max_new: Any
            ) -> Iterator[tuple[Any, Session, Any, Any, Any, Any]]:
        """Ask a question about the new regions and the conversation so far. The chat
        shows the new regions (numbered) and the question as typed; the prompt gets the
        ``[IMG]`` placeholders (outputs: chat, state, status, info, question, regions)."""
        session = session or Session()
        try:
            settings = settings_from_controls(beams, temperature, max_new, self.settings)
            before = len(session.img_list)
            if mode == DESCRIBE and before == 0 and (question or "").strip():
                raise InputError("describe a box first (click two opposite corners), then ask follow-up "
                                 "questions about it; or switch to QA mode to ask about several regions")
            prompt, note = prepare_question(question, len(session.pending), before)
            pending = list(session.pending)
            content: list[Any] = []
            if pending:
                names = ", ".join(str(r.number) for r in pending)
                strip = region_strip([(r.number, r.thumb) for r in pending])
                content.append(self._chat_picture(strip, f"region{'s' if len(pending) > 1 else ''} {names}"))
            content.append((question or "").strip())
            done = "Answered." + (f" {note}" if note else "")
            shown = {"role": "user", "content": content}
            for chat, finished in self._stream_into_chat(session, [r.region for r in pending], prompt, shown,
                                                         settings):
                if finished:  # committed: the new regions are in the conversation now
                    session.pending = []
                    yield chat, session, done, self.info_text(), "", _region_gallery(session)
                else:
                    yield chat, session, "Answering…", self.info_text(), gr.skip(), gr.skip()
        except Exception as err:  # noqa: BLE001
            yield session.messages, session, self.fail(err), self.info_text(), gr.skip(), gr.skip()

    # ------------------------------------------------------------ resets
    def restart(self, session: Session | None) -> tuple[Any, Session, Chat, list[Any], str, str, str]:
        """A fresh session (outputs: canvas, state, chat, regions, question, status, info)."""
        return None, Session(), [], [], "", "Restarted: pick an image.", self.info_text()

    def change_mode(self, mode: str, session: Session | None) -> tuple[Any, Session, Chat, Any, Any, str]:
        """Describe <-> QA: the conversation starts over (outputs: canvas, state, chat,
        regions, add button, status)."""
        session = session or Session()
        session.clear_conversation()
        qa = mode == QA
        hint = ("QA mode: select a box, press **Add region** (repeat for more regions), then ask a question."
                if qa else "Describe mode: click two opposite corners of a region to describe it.")
        return (session.canvas() if session.image is not None else gr.skip(), session, [],
                gr.update(value=[], visible=qa), gr.update(visible=qa), hint)

    # ------------------------------------------------------------ the API (for scripts)
    def _api_regions(self, image: Any, boxes: Any) -> list[Region]:
        """The API's image (a file the client uploaded) and boxes -> validated regions.

        Raises:
            InputError: no file, an unreadable image, no boxes, or a bad box.
        """
        path = image.get("path") if isinstance(image, dict) else None
        if not isinstance(path, str):
            raise InputError("image must be a file: pass gradio_client.handle_file(path_or_url)")
        picture = _load_named(path, image.get("orig_name") or Path(path).name)
        if not isinstance(boxes, list) or not boxes:
            raise InputError("boxes must be a non-empty list of [x1, y1, x2, y2] in the image's pixels")
        return [Captioner.region(picture, b) for b in boxes]

    def _api_call(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run an API call; its errors reach the client as one line, never a traceback."""
        try:
            return fn()
        except Click4CaptionError as err:
            logger.info("API %s: %s", what, err)
            raise gr.Error(str(err), title="Error", print_exception=False) from None
        except Exception as err:  # noqa: BLE001 - the client gets one line, the log the traceback
            logger.exception("unexpected error in the API's %s", what)
            raise gr.Error(f"internal error ({type(err).__name__}: {err})", print_exception=False) from None

    def api_describe(self, image: gr.FileData, boxes: list[list[float]]) -> list[str]:
        """Describe each box of an image: image = gradio_client.handle_file(path); boxes =
        [[x1, y1, x2, y2], ...] in the image's pixels (any corner order, -1 = the border).
        Returns one description per box, in order."""
        def run() -> list[str]:
            regions = self._api_regions(image, boxes)
            return self.model.describe(regions[0].image, [r.box for r in regions])
        return self._api_call("describe", run)

    def api_ask(self, image: gr.FileData, boxes: list[list[float]], question: str) -> str:
        """Ask one question about boxes of an image: image and boxes as for /describe;
        the question has one [IMG] per box, in order, or none and they are inserted
        ("image 1[IMG] image 2[IMG] " + question). Returns the answer."""
        def run() -> str:
            regions = self._api_regions(image, boxes)
            prompt, _ = prepare_question(question, len(regions))
            return self.model.ask(regions, prompt)
        return self._api_call("ask", run)
