"""What one browser session holds (kept in ``gr.State``): the image, the clicks, the
conversation and its regions. Never the model, which every session shares (see
:mod:`.model`); no gradio, so that it is tested without a browser.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from PIL import Image

from click4caption.boxes import Box
from click4caption.errors import InputError
from click4caption.prompts import IMG_TOKEN
from click4caption_apps.demo.canvas import (
    Point,
    box_from_clicks,
    click_order,
    display_image,
    display_scale,
    draw_selection,
)

if TYPE_CHECKING:  # torch stays out of this module's imports
    import torch

    from click4caption.captioner import Region
    from click4caption.prompts import Conversation


# ============================================================================ two clicks -> a box
@dataclass(frozen=True)
class Selection:
    """Two clicked corners, in the order they were clicked."""

    first: Point
    second: Point

    @property
    def box(self) -> Box:
        return box_from_clicks(self.first, self.second)

    @property
    def order(self) -> str:
        """E.g. ``"bottom-right then top-left"``."""
        return click_order(self.first, self.second)


@dataclass(frozen=True)
class ClickState:
    """Where the two-click box selection stands: ``first`` is the pending corner."""

    first: Point | None = None

    @property
    def waiting_for_second(self) -> bool:
        return self.first is not None


def register_click(state: ClickState, point: Point) -> tuple[ClickState, Selection | None]:
    """Advance the click state machine.

    First click: remembered, no selection yet. Second click: the selection, and the
    machine is ready for a new first corner (so a third click starts a new box).
    """
    if state.first is None:
        return ClickState(first=point), None
    return ClickState(), Selection(state.first, point)


# ============================================================================ questions
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


# ============================================================================ the session
@dataclass
class RegionItem:
    """A region added for QA: its validated region, number, image name and thumbnail."""

    number: int
    region: "Region"
    source: str
    thumb: Image.Image


@dataclass
class Session:
    """One browser session's state: never the model."""

    image: Image.Image | None = None
    image_name: str = ""
    clicks: ClickState = field(default_factory=ClickState)
    box: Box | None = None  # the last completed selection on ``image``
    describe_box: Box | None = None  # a box waiting to be described
    describe_note: str = ""  # what the selection step had to say about that box
    conv: "Conversation | None" = None  # made lazily, by the captioner
    img_list: list["torch.Tensor"] = field(default_factory=list)  # soft tokens, one per [IMG] asked so far
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
