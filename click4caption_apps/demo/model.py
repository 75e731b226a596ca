"""The ONE captioner of the app, shared by every browser session and by the API, behind
a lock so that model calls run one at a time even outside Gradio's queue (its
:class:`~click4caption.chat.Chat` keeps the ViT output of recent images, so a second
box on the same image skips the ViT)."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

from PIL import Image

from click4caption.errors import InputError
from click4caption.prompts import IMG_TOKEN, check_question

if TYPE_CHECKING:  # torch is imported by the captioner, not here
    import torch

    from click4caption.captioner import Captioner, Region
    from click4caption.generation import GenerationSettings
    from click4caption.prompts import Conversation


@dataclass
class Turn:
    """One question/answer under way; ``conv`` and ``img_list`` are copies that the
    session adopts only when the answer is complete (a failed turn leaves no trace)."""

    conv: "Conversation"
    img_list: list["torch.Tensor"]
    reply: str = ""


class LockedCaptioner:
    """A :class:`~click4caption.captioner.Captioner` whose every model call holds
    :attr:`lock`; ``name`` and ``device`` are shown in the app's footer line."""

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

    def new_conversation(self) -> "Conversation":
        return self.captioner.new_conversation()

    def stream_turn(self, conv: "Conversation", img_list: Sequence["torch.Tensor"], regions: Sequence["Region"],
                    prompt: str, settings: "GenerationSettings") -> Iterator[tuple[str, Turn]]:
        """Encode ``regions``, ask ``prompt`` (one ``[IMG]`` per region) after ``conv`` and
        yield ``(reply so far, turn)``; ``conv`` and ``img_list`` are not modified.

        Raises:
            InputError: placeholder count, or the conversation no longer fits the context.
        """
        if regions:
            check_question(prompt, len(regions))
        elif IMG_TOKEN in prompt:
            raise InputError(f"the question has {prompt.count(IMG_TOKEN)} {IMG_TOKEN} placeholder(s) but no new "
                             "region was added")
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

    def describe(self, image: Image.Image, boxes: Sequence[Sequence[float]]) -> list[str]:
        """The Describe answer for each box of ``image``, in one batched call, with the
        captioner's own settings (the API's defaults are the library's)."""
        with self.lock:
            return self.captioner.describe(image, boxes)

    def ask(self, regions: Sequence["Region"], question: str) -> str:
        """One question (one ``[IMG]`` per region) in a new conversation."""
        with self.lock:
            return self.captioner.ask(regions, question)
