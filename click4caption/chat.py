"""The inference engine: regions in, replies out.

:class:`Chat` is upstream's ``Chat`` (upload regions, ask, answer) with a content-keyed
ViT cache and batched generation: :meth:`Chat.answer_batch` answers many conversations
with ONE ``generate`` call (left padding, attention mask and positions from the mask,
per-row stopping on the stop string), giving the same tokens as answering them one at a
time. The prompt format is :mod:`click4caption.prompts`'; the model never imports this
module.
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
from click4caption.generation import GenerationSettings
from click4caption.prompts import IMG_TOKEN, Conversation, extract_reply, vicuna_v0

if TYPE_CHECKING:
    from click4caption.models.click4caption import Click4Caption

logger = logging.getLogger(__name__)


class StopOnText(StoppingCriteria):
    """Stops each sequence once its newly generated text contains ``stop``.

    Works for any tokenizer, however it splits ``###`` (LLaMA has one token and a
    two-token form): no hard-coded ids. A row is decoded only when its last token can
    end the stop string (its text holds one of the string's characters, or is empty or a
    partial byte), so long batches cost little.
    """

    def __init__(self, tokenizer: Any, prompt_len: int, stop: str, window: int = 8) -> None:
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        self.stop = stop
        self.window = window
        self._may_end: dict[int, bool] = {}

    def may_end(self, token_id: int) -> bool:
        if token_id not in self._may_end:
            text = self.tokenizer.decode([token_id], skip_special_tokens=True)
            self._may_end[token_id] = not text.strip() or "\ufffd" in text or any(c in text for c in self.stop)
        return self._may_end[token_id]

    def stopped(self, new_ids: Sequence[int]) -> bool:
        """Whether the stop string is in the text of the last ``window`` of ``new_ids``."""
        if not new_ids or not self.may_end(int(new_ids[-1])):
            return False
        return self.stop in self.tokenizer.decode(list(new_ids[-self.window:]), skip_special_tokens=True)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        rows = input_ids[:, max(self.prompt_len, input_ids.shape[1] - self.window):].tolist()  # the window only
        return torch.tensor([self.stopped(row) for row in rows], dtype=torch.bool, device=input_ids.device)


class StopOnEvent(StoppingCriteria):
    """Stops every sequence once ``event`` is set (a closed stream, a cancelled request)."""

    def __init__(self, event: Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _image_key(tensor: torch.Tensor) -> str:
    return hashlib.sha1(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()


class Chat:
    """Upload regions, ask, answer: upstream's ``Chat`` with a content-keyed ViT cache and
    batched answers.

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
    def encode_boxes(self, image: Image.Image | torch.Tensor, boxes: torch.Tensor | Sequence[Sequence[float]]
                     ) -> torch.Tensor:
        """Soft tokens for R boxes of one image: one (cached) ViT pass, one Q-Former batch.

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

    def upload_img(self, image: Image.Image | torch.Tensor | str, img_list: list[torch.Tensor],
                   tl_x: float, tl_y: float, br_x: float, br_y: float) -> str:
        """Add one region (corners in model-input pixels) to ``img_list`` (upstream's call)."""
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
        with torch.no_grad():
            return int(self.get_context_emb(probe, img_list).shape[1])

    # -------------------------------------------------------------- answers
    def _contexts(self, convs: Sequence[Conversation], img_lists: Sequence[Sequence[torch.Tensor]],
                  settings: GenerationSettings) -> list[torch.Tensor]:
        """Open the assistant turn of every conversation and embed it (``LxE`` each), the
        oldest tokens dropped past ``max_length``. On an error no conversation is changed."""
        contexts: list[torch.Tensor] = []
        opened: list[Conversation] = []
        try:
            for conv, img_list in zip(convs, img_lists, strict=True):
                conv.append_message(conv.roles[1], None)
                opened.append(conv)
                embs = self.get_context_emb(conv, img_list)[0]
                total = embs.shape[0] + settings.max_new_tokens
                if total > settings.max_length:
                    logger.warning("conversation is %d tokens with %d new: over the %d-token context; the oldest "
                                   "%d tokens are dropped", embs.shape[0], settings.max_new_tokens,
                                   settings.max_length, total - settings.max_length)
                    embs = embs[total - settings.max_length:]
                contexts.append(embs)
        except BaseException:
            for conv in opened:
                conv.messages.pop()
            raise
        return contexts

    def _generate_kwargs(self, contexts: Sequence[torch.Tensor], settings: GenerationSettings) -> dict[str, Any]:
        """Left-padded ``inputs_embeds`` ``BxLxE`` with its attention mask (positions follow
        from the mask), stopping per row, and the decoding settings."""
        width = max(c.shape[0] for c in contexts)
        embs = contexts[0].new_zeros(len(contexts), width, contexts[0].shape[-1])
        mask = torch.zeros(len(contexts), width, dtype=torch.long, device=embs.device)
        for i, c in enumerate(contexts):
            embs[i, width - c.shape[0]:] = c
            mask[i, width - c.shape[0]:] = 1
        tok = self.model.llama_tokenizer
        return dict(inputs_embeds=embs, attention_mask=mask,
                    stopping_criteria=StoppingCriteriaList([StopOnText(tok, 0, self.stop)]),
                    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **settings.generate_kwargs())

    def _finish(self, conv: Conversation, row: torch.Tensor, stop: StopOnText) -> tuple[str, torch.Tensor]:
        """One generated row -> (reply, its tokens up to where generation stopped)."""
        ids = row.tolist()
        eos = self.model.llama_tokenizer.eos_token_id
        for t, token in enumerate(ids):
            if token == eos or stop.stopped(ids[max(0, t + 1 - stop.window):t + 1]):
                ids = ids[:t + 1]
                break
        text = self.model.llama_tokenizer.decode(ids, skip_special_tokens=True)
        reply = extract_reply(text, self.stop)
        conv.messages[-1][1] = reply
        return reply, torch.as_tensor(ids, dtype=torch.long)

    @torch.no_grad()
    def answer_batch(self, convs: Sequence[Conversation], img_lists: Sequence[Sequence[torch.Tensor]],
                     settings: GenerationSettings | None = None) -> list[tuple[str, torch.Tensor]]:
        """Answer every conversation's last question with one ``generate`` call; store and
        return each ``(reply, token ids)``. Greedy and beam-search tokens are those of
        :meth:`answer` on each conversation alone.

        Raises:
            InputError: a conversation's ``[IMG]`` count differs from its regions.
        """
        settings = settings or GenerationSettings()
        if not convs:
            return []
        contexts = self._contexts(convs, img_lists, settings)
        kwargs = self._generate_kwargs(contexts, settings)
        try:
            out = self.model.llama_model.generate(**kwargs)
        except BaseException:
            for conv in convs:
                conv.messages.pop()
            raise
        stop = kwargs["stopping_criteria"][0]
        return [self._finish(conv, row, stop) for conv, row in zip(convs, out)]

    def answer(self, conv: Conversation, img_list: Sequence[torch.Tensor],
               settings: GenerationSettings | None = None) -> tuple[str, torch.Tensor]:
        """Generate the assistant's reply to the last question and store it in ``conv``.
        Returns ``(reply, token ids)`` like upstream."""
        return self.answer_batch([conv], [img_list], settings)[0]

    def stream_answer(self, conv: Conversation, img_list: Sequence[torch.Tensor],
                      settings: GenerationSettings | None = None) -> Iterator[str]:
        """Yield the reply as it grows (greedy or sampled; with beams, one final yield).
        When the reader stops early, generation stops and the partial reply is stored."""
        settings = settings or GenerationSettings()
        if settings.num_beams > 1:
            reply, _ = self.answer(conv, img_list, settings)
            yield reply
            return
        kwargs = self._generate_kwargs(self._contexts([conv], [img_list], settings), settings)
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
