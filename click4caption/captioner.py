"""High-level inference API used by the CLI, the demo and the evaluator.

It takes images and boxes as users give them (original-image pixels, any corner
order, ``-1`` for the border) and questions with ``[IMG]`` placeholders.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from PIL import Image

from click4caption.boxes import Box, normalize_box, to_model_pixels
from click4caption.config import Config
from click4caption.conversation import (
    DESCRIBE_PROMPT, MAX_CONTEXT_TOKENS, MAX_NEW_TOKENS, TOP_P, Chat, Conversation, vicuna_v0,
)
from click4caption.errors import InputError
from click4caption.images import load_image
from click4caption.processors import Blip2ImageEvalProcessor, build_processor
from click4caption.prompts import check_question

logger = logging.getLogger(__name__)


@dataclass
class GenerationSettings:
    """Decoding settings. Greedy by default (``do_sample`` off), so answers repeat."""

    num_beams: int = 1
    temperature: float = 1.0
    do_sample: bool = False
    top_p: float = TOP_P
    max_new_tokens: int = MAX_NEW_TOKENS
    max_length: int = MAX_CONTEXT_TOKENS

    def kwargs(self) -> dict[str, Any]:
        return dict(num_beams=self.num_beams, temperature=self.temperature if self.do_sample else 0.0,
                    do_sample=self.do_sample, top_p=self.top_p, max_new_tokens=self.max_new_tokens,
                    max_length=self.max_length)


@dataclass
class Region:
    """One region: a PIL image and a validated box in its pixels."""

    image: Image.Image
    box: Box
    warnings: list[str] = field(default_factory=list)


class Captioner:
    """Describe boxes and answer questions about regions with a built model."""

    def __init__(self, model: Any, vis_processor: Any | None = None, device: str | torch.device | None = None,
                 settings: GenerationSettings | None = None) -> None:
        self.model = model
        self.vis_processor = vis_processor or Blip2ImageEvalProcessor(model.img_size)
        self.chat = Chat(model, self.vis_processor, device=device)
        self.settings = settings or GenerationSettings()

    @classmethod
    def from_config(cls, cfg: Config, device: str | torch.device = "cpu",
                    settings: GenerationSettings | None = None) -> "Captioner":
        """Build the model named by an eval config (upstream layout)."""
        from click4caption.models.builder import build_model

        model = build_model(cfg.model, device=device, for_training=False)
        model.eval()
        processor = None
        for ds in cfg.datasets.values():
            proc_cfg = ds.vis_processor.eval or ds.vis_processor.train
            if proc_cfg is not None:
                processor = build_processor(proc_cfg)
                break
        if processor is not None and getattr(processor, "image_size", model.img_size) != model.img_size:
            raise InputError(f"vis_processor image_size {processor.image_size} differs from model.image_size "
                             f"{model.img_size}")
        return cls(model, processor, device=device, settings=settings)

    @property
    def image_size(self) -> int:
        return self.model.img_size

    # ---------------------------------------------------------------- regions
    @staticmethod
    def region(image: Image.Image | str, box: Sequence[float]) -> Region:
        """Validate a box (original pixels) on an image (PIL or path)."""
        if isinstance(image, str):
            image = load_image(image)
        norm, warnings = normalize_box(box, image.width, image.height)
        for w in warnings:
            logger.warning(w)
        return Region(image, norm, warnings)

    def encode_regions(self, regions: Sequence[Region]) -> list[torch.Tensor]:
        """Soft tokens per region (``1xQxE`` each); one ViT pass per distinct image."""
        out: list[torch.Tensor | None] = [None] * len(regions)
        by_image: dict[int, list[int]] = {}
        for i, r in enumerate(regions):
            by_image.setdefault(id(r.image), []).append(i)
        for idxs in by_image.values():
            img = regions[idxs[0]].image
            boxes = [to_model_pixels(regions[i].box, img.width, img.height, self.image_size) for i in idxs]
            soft = self.chat.encode_boxes(img, boxes)
            for j, i in enumerate(idxs):
                out[i] = soft[j:j + 1]
        return out  # type: ignore[return-value]

    # ---------------------------------------------------------------- asking
    def ask(self, regions: Sequence[Region], question: str, conv: Conversation | None = None,
            img_list: list[torch.Tensor] | None = None, settings: GenerationSettings | None = None) -> str:
        """One question about ``regions`` (one ``[IMG]`` each, in order)."""
        check_question(question, len(regions))
        conv = conv if conv is not None else self.chat.new_conversation()
        img_list = img_list if img_list is not None else []
        img_list.extend(self.encode_regions(regions))
        self.chat.ask(question, conv)
        reply, _ = self.chat.answer(conv, img_list, **(settings or self.settings).kwargs())
        return reply

    def describe(self, image: Image.Image | str, boxes: Sequence[Sequence[float]],
                 settings: GenerationSettings | None = None) -> list[str]:
        """The Describe question for each box of one image (one ViT pass)."""
        if isinstance(image, str):
            image = load_image(image)
        return self.describe_regions([self.region(image, b) for b in boxes], settings)

    def describe_regions(self, regions: Sequence[Region], settings: GenerationSettings | None = None) -> list[str]:
        """The Describe question for each region, each in its own conversation."""
        captions = []
        for soft in self.encode_regions(regions):
            conv = self.chat.new_conversation()
            self.chat.ask(DESCRIBE_PROMPT, conv)
            reply, _ = self.chat.answer(conv, [soft], **(settings or self.settings).kwargs())
            captions.append(reply)
        return captions

    def stream(self, conv: Conversation, img_list: list[torch.Tensor], settings: GenerationSettings | None = None
               ) -> Iterator[str]:
        """Stream the reply to the last question in ``conv``."""
        s = settings or self.settings
        temperature = s.temperature if s.do_sample else 0.0
        yield from self.chat.stream_answer(conv, img_list, max_new_tokens=s.max_new_tokens, num_beams=s.num_beams,
                                           temperature=temperature, top_p=s.top_p, max_length=s.max_length)

    # ---------------------------------------------------------------- batch
    def run_item(self, item: dict[str, Any]) -> dict[str, Any]:
        """One batch line: ``{"image", "boxes", "question"?}`` -> the line plus ``answer``
        (or ``captions`` without a question), ``warnings`` when boxes were fixed up.

        Raises:
            InputError / Click4CaptionError: for a bad line (the caller records it).
        """
        if not isinstance(item, dict):
            raise InputError("each line must be a JSON object")
        if "image" not in item or not isinstance(item["image"], str):
            raise InputError("missing \"image\" (a path)")
        boxes = item.get("boxes")
        if not isinstance(boxes, list) or not boxes:
            raise InputError("\"boxes\" must be a non-empty list of [x1, y1, x2, y2]")
        image = load_image(item["image"])
        regions = [self.region(image, b) for b in boxes]
        out = dict(item)
        warnings = [w for r in regions for w in r.warnings]
        if "question" in item and item["question"] is not None:
            out["answer"] = self.ask(regions, item["question"])
        else:
            out["captions"] = self.describe_regions(regions)
        if warnings:
            out["warnings"] = warnings
        return out
