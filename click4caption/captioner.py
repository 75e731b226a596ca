"""High-level inference API used by the CLI, the demo and the evaluators.

It takes images and boxes as users give them (original-image pixels, any corner order,
``-1`` for the border) and questions with ``[IMG]`` placeholders. Many regions are one
batched job: one ViT pass per image, each image's boxes through the Q-Former as one
batch, and the questions generated ``settings.batch_size`` at a time in one ``generate``
call each (a batch that runs out of GPU memory is split and retried).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from PIL import Image

from click4caption.boxes import Box, normalize_box, to_model_pixels
from click4caption.chat import Chat
from click4caption.cpu import flush_denormals
from click4caption.generation import GenerationSettings
from click4caption.config import Config
from click4caption.errors import Click4CaptionError, InputError
from click4caption.images import load_image
from click4caption.processors import Blip2ImageEvalProcessor, build_processor
from click4caption.prompts import DESCRIBE_PROMPT, Conversation, check_question

logger = logging.getLogger(__name__)


@dataclass
class Region:
    """One region: a PIL image and a validated box in its pixels."""

    image: Image.Image
    box: Box
    warnings: list[str] = field(default_factory=list)


@dataclass
class Question:
    """A conversation whose last turn is a question waiting for its answer."""

    conv: Conversation
    img_list: list[torch.Tensor]


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

        flush_denormals(device)
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

    def new_conversation(self) -> Conversation:
        return self.chat.new_conversation()

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
        """Soft tokens per region (``1xQxE`` each): one ViT pass and one Q-Former batch per
        distinct image."""
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

    # ---------------------------------------------------------------- answering
    def answer_all(self, questions: Sequence[Question], settings: GenerationSettings | None = None
                   ) -> list[str | Click4CaptionError]:
        """Answer every question, ``settings.batch_size`` in one ``generate`` call (similar
        prompt lengths together); each answer is stored in its conversation. A batch out of
        GPU memory is split and retried; a question that does not fit alone gets its error
        in its place, the others are still answered."""
        s = settings or self.settings
        if s.batch_size < 1:
            raise InputError(f"batch size must be >= 1, got {s.batch_size}")
        order = sorted(range(len(questions)), key=lambda i: -len(questions[i].conv.get_prompt()))
        answers: list[str | Click4CaptionError] = [""] * len(questions)
        for start in range(0, len(order), s.batch_size):
            chunk = order[start:start + s.batch_size]
            for i, answer in zip(chunk, self._answer_splitting([questions[i] for i in chunk], s)):
                answers[i] = answer
        return answers

    def _answer_splitting(self, questions: Sequence[Question], settings: GenerationSettings
                          ) -> list[str | Click4CaptionError]:
        try:
            done = self.chat.answer_batch([q.conv for q in questions], [q.img_list for q in questions], settings)
            return [reply for reply, _ in done]
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(questions) == 1:
                return [InputError(f"out of GPU memory answering one question of {settings.max_new_tokens} new "
                                   "tokens at most: lower --max_new_tokens or the number of regions")]
            half = len(questions) // 2
            logger.warning("out of GPU memory generating %d answers at once: retrying as %d and %d",
                           len(questions), half, len(questions) - half)
            return (self._answer_splitting(questions[:half], settings)
                    + self._answer_splitting(questions[half:], settings))

    def question(self, regions: Sequence[Region], text: str, conv: Conversation | None = None,
                 img_list: list[torch.Tensor] | None = None) -> Question:
        """``text`` (one ``[IMG]`` per region, in order) asked after ``conv``, the regions encoded.

        Raises:
            InputError: an empty question or the wrong number of placeholders.
        """
        check_question(text, len(regions))
        conv = conv if conv is not None else self.new_conversation()
        img_list = img_list if img_list is not None else []
        img_list.extend(self.encode_regions(regions))
        self.chat.ask(text, conv)
        return Question(conv, img_list)

    def ask(self, regions: Sequence[Region], question: str, conv: Conversation | None = None,
            img_list: list[torch.Tensor] | None = None, settings: GenerationSettings | None = None) -> str:
        """One question about ``regions`` (one ``[IMG]`` each, in order), after ``conv``."""
        answer = self.answer_all([self.question(regions, question, conv, img_list)], settings)[0]
        if isinstance(answer, Click4CaptionError):
            raise answer
        return answer

    def describe(self, image: Image.Image | str, boxes: Sequence[Sequence[float]],
                 settings: GenerationSettings | None = None) -> list[str]:
        """The Describe question for each box of one image (one ViT pass, batched)."""
        if isinstance(image, str):
            image = load_image(image)
        return self.describe_regions([self.region(image, b) for b in boxes], settings)

    def describe_regions(self, regions: Sequence[Region], settings: GenerationSettings | None = None) -> list[str]:
        """The Describe question for each region, each in its own conversation, generated
        in batches; the regions may come from several images.

        Raises:
            Click4CaptionError: a region could not be described (out of memory alone).
        """
        questions = [Question(self.new_conversation(), [soft]) for soft in self.encode_regions(regions)]
        for q in questions:
            self.chat.ask(DESCRIBE_PROMPT, q.conv)
        answers = self.answer_all(questions, settings)
        for answer in answers:
            if isinstance(answer, Click4CaptionError):
                raise answer
        return answers  # type: ignore[return-value]

    def stream(self, conv: Conversation, img_list: list[torch.Tensor], settings: GenerationSettings | None = None
               ) -> Iterator[str]:
        """Stream the reply to the last question in ``conv``."""
        yield from self.chat.stream_answer(conv, img_list, settings or self.settings)

    # ---------------------------------------------------------------- batch files
    def run_items(self, items: Sequence[Any], settings: GenerationSettings | None = None) -> list[dict[str, Any]]:
        """Batch lines ``{"image", "boxes", "question"?}`` -> each line plus ``answer`` (or
        ``captions`` without a question), ``warnings`` when boxes were fixed up, or
        ``error`` for a bad line. Every question and box of every line is generated
        together, in batches."""
        results: list[dict[str, Any]] = []
        questions: list[Question] = []
        slots: list[tuple[int, int | None]] = []  # (line, caption index or None for an answer)
        images: dict[str, Image.Image] = {}
        for n, item in enumerate(items):
            try:
                result, regions = self._parse_item(item, images)
                if "question" in result and result["question"] is not None:
                    questions.append(self.question(regions, result["question"]))
                    slots.append((n, None))
                else:
                    result["captions"] = [""] * len(regions)
                    for j, soft in enumerate(self.encode_regions(regions)):
                        q = Question(self.new_conversation(), [soft])
                        self.chat.ask(DESCRIBE_PROMPT, q.conv)
                        questions.append(q)
                        slots.append((n, j))
            except Click4CaptionError as err:
                result = dict(item) if isinstance(item, dict) else {"input": item}
                result["error"] = str(err)
            results.append(result)
        for (n, j), answer in zip(slots, self.answer_all(questions, settings)):
            if isinstance(answer, Click4CaptionError):
                results[n]["error"] = str(answer)
            elif j is None:
                results[n]["answer"] = answer
            else:
                results[n]["captions"][j] = answer
        for result in results:
            if "error" in result:
                result.pop("captions", None)
                result.pop("answer", None)
        return results

    def run_item(self, item: dict[str, Any], settings: GenerationSettings | None = None) -> dict[str, Any]:
        """One batch line (see :meth:`run_items`).

        Raises:
            InputError / Click4CaptionError: for a bad line.
        """
        result = self.run_items([item], settings)[0]
        if "error" in result:
            raise InputError(result["error"])
        return result

    def _parse_item(self, item: Any, images: dict[str, Image.Image]) -> tuple[dict[str, Any], list[Region]]:
        if not isinstance(item, dict):
            raise InputError("each line must be a JSON object")
        if "image" not in item or not isinstance(item["image"], str):
            raise InputError("missing \"image\" (a path)")
        boxes = item.get("boxes")
        if not isinstance(boxes, list) or not boxes:
            raise InputError("\"boxes\" must be a non-empty list of [x1, y1, x2, y2]")
        if item["image"] not in images:
            images[item["image"]] = load_image(item["image"])
        image = images[item["image"]]
        regions = [self.region(image, b) for b in boxes]
        result = dict(item)
        warnings = [w for r in regions for w in r.warnings]
        if warnings:
            result["warnings"] = warnings
        return result, regions
