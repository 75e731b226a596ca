"""The Vicuna v0 conversation template and :class:`Chat`, the inference engine.

Prompt format (exactly upstream's): system ``""`` then ``###``; each finished turn is
``" " + role + ": " + message + "\\n###"``; the open assistant turn is ``" Assistant:"``.
Soft tokens of the i-th uploaded region replace the i-th ``[IMG]``.
"""
from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from threading import Event, Thread
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from click4caption.errors import InputError
from click4caption.prompts import (  # noqa: F401 (re-exported)
    DESCRIBE_PROMPT, DESCRIBE_QUESTION, IMG_TOKEN, Conversation, extract_reply, vicuna_v0,
)

if TYPE_CHECKING:
    from click4caption.models.click4caption import Click4Caption

logger = logging.getLogger(__name__)

# generation defaults (upstream Chat.answer); greedy by default here so results repeat
MAX_NEW_TOKENS = 300
MAX_CONTEXT_TOKENS = 2000
TOP_P = 0.9


class StopOnText(StoppingCriteria):
    """Stops each sequence once its newly generated text contains ``stop``.

    Works for any tokenizer, however it splits ``###`` (LLaMA has one token and a
    two-token form): no hard-coded ids.
    """

    def __init__(self, tokenizer: Any, prompt_len: int, stop: str, window: int = 8) -> None:
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        self.stop = stop
        self.window = window

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        new = input_ids[:, self.prompt_len:][:, -self.window:]
        done = [self.stop in self.tokenizer.decode(row, skip_special_tokens=True) for row in new]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class StopOnEvent(StoppingCriteria):
    """Stops every sequence once ``event`` is set (a closed stream, a cancelled request)."""

    def __init__(self, event: Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _image_key(tensor: torch.Tensor) -> str:
    return hashlib.sha1(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()


class Chat:
    """Upload regions, ask, answer: upstream's ``Chat`` with a content-keyed ViT cache.

    Args:
        model: a built :class:`Click4Caption`.
        vis_processor: PIL image -> ``3xSxS`` tensor.
        device: where inputs go (defaults to the model's device).
        cache_size: images whose ViT output is kept (keyed by pixel content).
    """

    def __init__(self, model: "Click4Caption", vis_processor: Any, device: str | torch.device | None = None,
                 cache_size: int = 8) -> None:
        self.model = model
        self.vis_processor = vis_processor
        self.device = torch.device(device) if device is not None else model.device
        self.cache_size = cache_size
        self._cache: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        self.cache_hits = 0
        self.cache_misses = 0

    @property
    def image_size(self) -> int:
        return self.model.img_size

    @property
    def stop(self) -> str:
        """The stop string of generation: the model's ``end_sym`` (also the turn separator)."""
        return self.model.end_sym

    def new_conversation(self) -> Conversation:
        """An empty conversation whose separator is the model's ``end_sym``."""
        return vicuna_v0(self.stop)

    # -------------------------------------------------------------- images
    def preprocess(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        """PIL image or ``3xSxS`` / ``1x3xSxS`` tensor -> ``1x3xSxS`` on the device."""
        if isinstance(image, Image.Image):
            image = self.vis_processor(image.convert("RGB"))
        if image.dim() == 3:
            image = image.unsqueeze(0)
        return image.to(self.device)

    @torch.no_grad()
    def image_embeds(self, image: torch.Tensor) -> torch.Tensor:
        """Cached :meth:`Click4Caption.encode_image` of a ``1x3xSxS`` tensor."""
        key = _image_key(image)
        if key in self._cache:
            self._cache.move_to_end(key)
            self.cache_hits += 1
            return self._cache[key]
        self.cache_misses += 1
        embeds = self.model.encode_image(image)
        self._cache[key] = embeds
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return embeds

    @torch.no_grad()
    def encode_boxes(self, image: Image.Image | torch.Tensor, boxes: torch.Tensor | Sequence[Sequence[float]]) -> torch.Tensor:
        """Soft tokens for R boxes of one image with one ViT pass.

        Args:
            boxes: ``Rx4`` (x1, y1, x2, y2) or ``Rx2x2`` in MODEL-INPUT pixels.
        Returns:
            ``RxQxE``.
        """
        tensor = self.preprocess(image)
        boxes_t = torch.as_tensor(boxes, dtype=torch.float32).reshape(1, -1, 2, 2).to(self.device)
        embeds = self.image_embeds(tensor)
        soft, _, _ = self.model.encode_img_with_bbox(tensor, boxes_t, image_embeds=embeds)
        return soft

    def upload_img(self, image: Image.Image | torch.Tensor | str, conv: Conversation, img_list: list[torch.Tensor],
                   tl_x: float, tl_y: float, br_x: float, br_y: float) -> str:
        """Upstream signature: add one region (corners in model-input pixels) to ``img_list``."""
        if isinstance(image, str):
            from click4caption.images import load_image

            image = load_image(image)
        soft = self.encode_boxes(image, [[tl_x, tl_y, br_x, br_y]])
        img_list.append(soft[0:1])
        return "Received."

    # -------------------------------------------------------------- text
    def ask(self, text: str, conv: Conversation) -> None:
        conv.append_message(conv.roles[0], text)

    def get_context_emb(self, conv: Conversation, img_list: Sequence[torch.Tensor]) -> torch.Tensor:
        """Prompt text with soft tokens spliced at each ``[IMG]`` -> ``1xLxE``.

        Raises:
            InputError: the number of ``[IMG]`` differs from the number of regions.
        """
        prompt = conv.get_prompt()
        segs = prompt.split(IMG_TOKEN)
        if len(segs) != len(img_list) + 1:
            raise InputError(f"the question has {len(segs) - 1} {IMG_TOKEN} placeholder(s) but "
                             f"{len(img_list)} region(s) were given")
        tok = self.model.llama_tokenizer
        embs: list[torch.Tensor] = []
        for i, seg in enumerate(segs):
            if i > 0:
                embs.append(img_list[i - 1].reshape(1, -1, img_list[i - 1].shape[-1]))
            ids = torch.as_tensor([tok.encode(seg, add_bos=i == 0)], dtype=torch.long, device=self.device)
            embs.append(self.model.embed_tokens(ids))
        return torch.cat(embs, dim=1)

    def context_length(self, conv: Conversation, img_list: Sequence[torch.Tensor]) -> int:
        """Tokens the next answer's prompt would take (with the open assistant turn).

        Raises:
            InputError: the number of ``[IMG]`` differs from the number of regions.
        """
        probe = conv.copy()
        probe.append_message(probe.roles[1], None)
        return int(self.get_context_emb(probe, img_list).shape[1])

    def _generation_inputs(self, conv: Conversation, img_list: Sequence[torch.Tensor], max_new_tokens: int,
                           num_beams: int, temperature: float, do_sample: bool | None, top_p: float,
                           max_length: int, min_length: int = 1, repetition_penalty: float = 1.0,
                           length_penalty: float = 1.0) -> dict[str, Any]:
        conv.append_message(conv.roles[1], None)
        try:
            embs = self.get_context_emb(conv, img_list)
        except InputError:
            conv.messages.pop()
            raise
        total = embs.shape[1] + max_new_tokens
        if total > max_length:
            logger.warning("conversation is %d tokens with %d new: over the %d-token context; the oldest "
                           "%d tokens are dropped", embs.shape[1], max_new_tokens, max_length, total - max_length)
            embs = embs[:, total - max_length:]
        if do_sample is None:
            do_sample = temperature > 0
        kwargs: dict[str, Any] = dict(
            inputs_embeds=embs,
            attention_mask=torch.ones(embs.shape[:2], dtype=torch.long, device=embs.device),
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            min_length=min_length,
            repetition_penalty=repetition_penalty,
            length_penalty=length_penalty,
            do_sample=do_sample,
            stopping_criteria=StoppingCriteriaList([StopOnText(self.model.llama_tokenizer, 0, self.stop)]),
            pad_token_id=self.model.llama_tokenizer.pad_token_id,
            eos_token_id=self.model.llama_tokenizer.eos_token_id,
        )
        if do_sample:
            kwargs.update(temperature=max(temperature, 1e-5), top_p=top_p)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs

    @torch.no_grad()
    def answer(self, conv: Conversation, img_list: Sequence[torch.Tensor], max_new_tokens: int = MAX_NEW_TOKENS,
               num_beams: int = 1, min_length: int = 1, top_p: float = TOP_P, repetition_penalty: float = 1.0,
               length_penalty: float = 1.0, temperature: float = 1.0, max_length: int = MAX_CONTEXT_TOKENS,
               do_sample: bool | None = None) -> tuple[str, Any]:
        """Generate the assistant's reply and store it in ``conv``.

        ``do_sample=None`` samples when ``temperature > 0`` and decodes greedily (or with
        beams) at 0. Returns ``(reply, token ids)`` like upstream.
        """
        kwargs = self._generation_inputs(conv, img_list, max_new_tokens, num_beams, temperature, do_sample,
                                         top_p, max_length, min_length, repetition_penalty, length_penalty)
        out = self.model.llama_model.generate(**kwargs)
        tokens = out[0]
        text = self.model.llama_tokenizer.decode(tokens, skip_special_tokens=True)
        reply = extract_reply(text, self.stop)
        conv.messages[-1][1] = reply
        return reply, tokens.cpu().numpy()

    def stream_answer(self, conv: Conversation, img_list: Sequence[torch.Tensor], max_new_tokens: int = MAX_NEW_TOKENS,
                      num_beams: int = 1, temperature: float = 0.0, top_p: float = TOP_P,
                      max_length: int = MAX_CONTEXT_TOKENS) -> Iterator[str]:
        """Yield the reply as it grows (greedy/sampled; beams fall back to one final yield)."""
        if num_beams > 1:
            reply, _ = self.answer(conv, img_list, max_new_tokens=max_new_tokens, num_beams=num_beams,
                                   temperature=temperature, top_p=top_p, max_length=max_length)
            yield reply
            return
        kwargs = self._generation_inputs(conv, img_list, max_new_tokens, 1, temperature, None, top_p, max_length)
        streamer = TextIteratorStreamer(self.model.llama_tokenizer, skip_special_tokens=True, timeout=600)
        kwargs["streamer"] = streamer
        stop = Event()
        kwargs["stopping_criteria"].append(StopOnEvent(stop))
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with torch.no_grad():
                    self.model.llama_model.generate(**kwargs)
            except BaseException as err:  # surfaced in the caller's thread
                errors.append(err)
                streamer.end()

        thread = Thread(target=run, daemon=True)
        thread.start()
        text = ""
        try:
            for piece in streamer:
                text += piece
                yield extract_reply(text, self.stop)
        except GeneratorExit:  # the reader went away: stop generating, free the model
            stop.set()
            thread.join()
            conv.messages[-1][1] = extract_reply(text, self.stop)
            raise
        thread.join()
        if errors:
            conv.messages[-1][1] = extract_reply(text, self.stop) or ""
            raise errors[0]
        reply = extract_reply(text, self.stop)
        conv.messages[-1][1] = reply
        yield reply
