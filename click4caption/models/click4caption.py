"""The Click4Caption model: ViT -> Q-Former with box corner tokens -> projection -> LLM.

Public methods keep upstream names and semantics (``encode_img_with_bbox``,
``forward(samples)``), so scripts written for the original port unchanged.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import random
from typing import Any, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel

from click4caption.boxes import NEAR_FULL_BOX_JITTER
from click4caption.errors import ConfigError, InputError
from click4caption.models.box_attention import BoxAttentionAid, ObjectBoxes
from click4caption.models.object_centres import centre_loss
from click4caption.models.prompt_encoder import PromptEncoder
from click4caption.models.vision import VisionEncoder
from click4caption.prompts import IMG_TOKEN, PROMPT_IMAGE_PLACEHOLDER, conversation_pieces
from click4caption.tokenizer import TextTokenizer

logger = logging.getLogger(__name__)

#: text pieces whose token ids training keeps (conversation rows repeat them)
TOKEN_CACHE_SIZE = 4096


class Click4Caption(nn.Module):
    """Composed from built parts (see :func:`click4caption.models.builder.build_model`).

    Args:
        visual_encoder: ViT returning ``Bx(1+N)xC`` averaged block features.
        ln_vision: LayerNorm over the C-wide features.
        qformer: query-only ``Blip2QFormerModel`` of width D.
        query_tokens: learned queries ``1xQxD``.
        prompt_encoder: box corner encoder and image PE.
        llama_proj: ``Linear(D -> E)``, query outputs to soft tokens.
        llama_model / llama_tokenizer: the causal LM (width E) and its tokenizer.
        image_size: model input side S.
        delete_vit_cls_token: drop the CLS token before the Q-Former.
        add_img_pe: add the projected Fourier PE to the image tokens.
        max_txt_len: caption tokens kept in caption-mode training.
        end_sym: ends every training caption and reply, separates conversation turns and
            stops generation (``###``): one value for training and inference.
        prompt_list: training prompts (upstream's ``prompt_path`` / ``prompt_template``):
            when set, each caption-mode batch wraps its soft tokens in one drawn at random.
        box_attention: the optional training aid whose loss is added in training
            (:class:`~click4caption.models.box_attention.BoxAttentionAid`).
        object_centre_weight: factor of the training aid that makes the image tokens mark
            the objects' centres where the data lists them
            (:func:`~click4caption.models.object_centres.centre_loss`); 0: off.
    """

    def __init__(
        self,
        visual_encoder: VisionEncoder,
        ln_vision: nn.LayerNorm,
        qformer: nn.Module,
        query_tokens: nn.Parameter,
        prompt_encoder: PromptEncoder,
        llama_proj: nn.Linear,
        llama_model: PreTrainedModel,
        llama_tokenizer: TextTokenizer,
        image_size: int,
        delete_vit_cls_token: bool,
        add_img_pe: bool,
        max_txt_len: int,
        end_sym: str,
        prompt_list: Sequence[str] = (),
        box_attention: BoxAttentionAid | None = None,
        object_centre_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.visual_encoder = visual_encoder
        self.ln_vision = ln_vision
        self.qformer = qformer
        self.query_tokens = query_tokens
        self.prompt_encoder = prompt_encoder
        self.llama_proj = llama_proj
        self.llama_model = llama_model
        self.llama_tokenizer = llama_tokenizer
        self.box_attention = box_attention
        if object_centre_weight < 0:
            raise ConfigError(f"object_centre_weight must be >= 0, got {object_centre_weight}")
        self.object_centre_weight = object_centre_weight
        # how images become tokens, and how text is cut and ended
        self.img_size, self.delete_vit_cls_token, self.add_img_pe = image_size, delete_vit_cls_token, add_img_pe
        self.max_txt_len, self.end_sym, self.prompt_list = max_txt_len, end_sym, list(prompt_list)
        self.frozen_parts: tuple[str, ...] = ()
        self._ids_cache: dict[tuple[str, bool], torch.Tensor] = {}

    def freeze(self, parts: Sequence[str]) -> None:
        """No gradients for the named parts (top-level attribute names, e.g.
        ``visual_encoder``), which also stay in eval mode in :meth:`train`."""
        for name, param in self.named_parameters():
            param.requires_grad = not any(name == p or name.startswith(p + ".") for p in parts)
        self.frozen_parts = tuple(parts)

    def train(self, mode: bool = True) -> "Click4Caption":
        """Like ``nn.Module.train`` but frozen parts stay in eval mode (upstream's
        ``disabled_train``)."""
        super().train(mode)
        for name in self.frozen_parts:
            part = getattr(self, name)
            if isinstance(part, nn.Module):
                part.eval()
        return self

    def place(self, device: torch.device, vit_dtype: torch.dtype | None = None,
              llm_dtype: torch.dtype | None = None) -> "Click4Caption":
        """Move every part to ``device``; the ViT in ``vit_dtype`` and the LLM in
        ``llm_dtype`` when given. An 8-bit LLM stays where bitsandbytes put it."""
        quantized = getattr(self.llama_model, "is_loaded_in_8bit", False)
        for name, child in self.named_children():
            if name == "llama_model":
                if not quantized:
                    child.to(device=device, dtype=llm_dtype)
            elif name == "visual_encoder":
                child.to(device=device, dtype=vit_dtype)
            else:
                child.to(device)
        self.query_tokens.data = self.query_tokens.data.to(device)
        return self

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return self.query_tokens.device

    @property
    def num_query_token(self) -> int:
        return self.query_tokens.shape[1]

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``BxL`` -> LLM input embeddings ``BxLxE``."""
        return self.llama_model.get_input_embeddings()(ids)

    def random_near_full_boxes(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Random near-full boxes ``Bx1x2x2``: top-left in ``[0, 7)``, bottom-right ``S - [0, 7)``.

        Drawn in upstream's order (all top-left jitters, then all bottom-right ones), so the
        same seed gives the same boxes.
        """
        top_left = NEAR_FULL_BOX_JITTER * torch.rand(batch, 1, 1, 2, generator=generator)
        bottom_right = self.img_size - NEAR_FULL_BOX_JITTER * torch.rand(batch, 1, 1, 2, generator=generator)
        return torch.cat([top_left, bottom_right], dim=2).to(self.device)

    # ------------------------------------------------------------------ vision
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """image ``Bx3xSxS`` -> image tokens for cross-attention ``BxTxC``.

        ViT multi-block mean -> ln_vision -> (drop CLS) -> (+ image PE). T is N, or
        1+N when the CLS token is kept. This is what callers may cache per image.
        """
        return self.add_image_pe(self.image_tokens(image))

    def image_tokens(self, image: torch.Tensor) -> torch.Tensor:
        """image ``Bx3xSxS`` -> ``BxTxC``: :meth:`encode_image` before the image PE."""
        vit_dtype = self.visual_encoder.patch_embed.proj.weight.dtype
        vit_device = self.visual_encoder.patch_embed.proj.weight.device
        feats = self.visual_encoder(image.to(device=vit_device, dtype=vit_dtype))
        feats = feats.to(device=self.device, dtype=self.ln_vision.weight.dtype)
        embeds = self.ln_vision(feats)
        if self.delete_vit_cls_token:
            embeds = embeds[:, 1:]
        return embeds

    def add_image_pe(self, embeds: torch.Tensor) -> torch.Tensor:
        """``BxTxC`` image tokens plus the image PE when ``add_img_pe`` (else unchanged)."""
        if self.add_img_pe:
            pe = self.prompt_encoder.image_pe(self.visual_encoder.grid_size, with_cls=not self.delete_vit_cls_token)
            embeds = embeds + pe.unsqueeze(0).to(embeds.dtype)
        return embeds

    def encode_regions(self, image_embeds: torch.Tensor, boxes: torch.Tensor,
                       objects: ObjectBoxes | None = None) -> torch.Tensor:
        """Q-Former over paired image tokens and boxes.

        Args:
            image_embeds: ``NxTxC`` (one row per box).
            boxes: ``Nx2x2`` corners in model pixels.
            objects: training only, for the box-attention aid: the boxes of every object
                in each row's image (``NxMx2x2`` zero-padded, ``N`` counts), where known.
        Returns:
            soft tokens ``NxQxE`` in the LLM's embedding dtype.
        """
        n = image_embeds.shape[0]
        queries = self.query_tokens.expand(n, -1, -1)
        corners = self.prompt_encoder.encode_boxes(boxes.to(self.device))
        tokens = torch.cat([queries, corners.to(queries.dtype)], dim=1)
        atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        aid = self.box_attention if self.training else None
        with aid.record(boxes.to(self.device), objects) if aid is not None else contextlib.nullcontext():
            out = self.qformer(
                query_embeds=tokens,
                encoder_hidden_states=image_embeds,
                encoder_attention_mask=atts,
            ).last_hidden_state
        soft = self.llama_proj(out[:, : self.num_query_token].to(self.llama_proj.weight.dtype))
        return soft.to(self.llama_model.get_input_embeddings().weight.dtype)

    def encode_img_with_bbox(
        self, image: torch.Tensor, boxes: torch.Tensor, image_embeds: torch.Tensor | None = None,
        objects: ObjectBoxes | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Upstream's entry point.

        Args:
            image: ``Bx3xSxS`` (ignored when ``image_embeds`` is given).
            boxes: ``BxRx2x2`` corners ((x1, y1), (x2, y2)) in model-input pixels.
            image_embeds: cached ``BxTxC`` from :meth:`encode_image` to skip the ViT.
            objects: training only: object boxes of each image (``BxMx2x2``, ``B`` counts),
                for the box-attention aid (:meth:`encode_regions`).
        Returns:
            ``(soft_tokens (B*R)xQxE, atts (B*R)xQ, image_embeds BxTxC)``; rows are
            image-major (image 0's R boxes first).
        """
        if image_embeds is None:
            image_embeds = self.encode_image(image)
        bsz, num_regions = boxes.shape[:2]
        if image_embeds.shape[0] != bsz:
            raise InputError(f"{image_embeds.shape[0]} images but boxes for {bsz}")
        cross = image_embeds.repeat_interleave(num_regions, dim=0)
        if objects is not None:  # per image -> per row
            objects = (objects[0].repeat_interleave(num_regions, dim=0), objects[1].repeat_interleave(num_regions, dim=0))
        soft = self.encode_regions(cross, boxes.reshape(-1, 2, 2), objects)
        atts = torch.ones(soft.shape[:-1], dtype=torch.long, device=soft.device)
        return soft, atts, image_embeds

    # ------------------------------------------------------------------ training
    def forward(self, samples: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Training loss.

        Caption mode (upstream): ``image`` ``Bx3xSxS``, ``text_input``, optional ``bbox``
        ``BxRx2x2`` (default: one random near-full box per image). ``text_input`` is
        either B*R strings, image-major, or upstream's collated layout: R sequences of B
        captions (region r of every image), transposed as upstream does. Sequence
        ``[BOS][prompt before][Q soft tokens][prompt after][caption + end_sym]`` (the
        prompt only with ``prompt_list``), loss on the caption tokens only.

        Conversation mode (region instructions): ``image``, ``bbox`` ``BxKx2x2`` padded,
        ``num_boxes`` (B ints) and ``conversations`` (B lists of LLaVA-style turns whose
        human turns hold one ``[IMG]`` per box); loss on the assistant replies. With
        ``image_index`` (B ints), ``image`` holds U distinct images and record b uses
        ``image[image_index[b]]`` (one ViT pass per image however many records).

        Both modes: optional ``objects`` ``BxMx2x2`` (zero-padded) and ``num_objects`` (B
        ints), the boxes of every object in each image or record, read by the
        box-attention aid only (``box_attention_whole_image: objects``).
        """
        if "conversations" in samples:
            return self._forward_conversations(samples)
        image = samples["image"].to(self.device)
        boxes = samples.get("bbox")
        if boxes is None:
            boxes = self.random_near_full_boxes(image.shape[0])
        objects = self._object_boxes(samples)
        tokens = self.image_tokens(image)
        centre = self._centre_loss(tokens, objects)
        soft, atts, _ = self.encode_img_with_bbox(image, boxes.to(self.device), image_embeds=self.add_image_pe(tokens),
                                                  objects=objects if self.box_attention is not None else None)
        texts = caption_rows(samples["text_input"], image.shape[0], boxes.shape[1])
        if self.prompt_list:
            soft, atts = self.prompt_wrap(soft, atts, random.choice(self.prompt_list))
        tok = self.llama_tokenizer
        ids, text_mask = self.pad_right([tok.encode(t + self.end_sym)[: self.max_txt_len] for t in texts])
        targets = ids.masked_fill(ids == tok.pad_token_id, -100)
        n = soft.shape[0]
        empty = torch.full((n, soft.shape[1] + 1), -100, dtype=torch.long, device=self.device)
        targets = torch.cat([empty, targets], dim=1)
        bos = torch.full((n, 1), tok.bos_token_id, dtype=torch.long, device=self.device)
        inputs = torch.cat([self.embed_tokens(bos), soft, self.embed_tokens(ids)], dim=1)
        mask = torch.cat([atts[:, :1], atts, text_mask], dim=1)
        out = self.llama_model(inputs_embeds=inputs, attention_mask=mask, labels=targets, return_dict=True)
        return self._losses(out.loss, centre)

    def pad_right(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token id rows -> ``(ids NxL, attention mask NxL)``, right-padded with the pad id."""
        width = max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), width), self.llama_tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return ids.to(self.device), mask.to(self.device)

    def prompt_wrap(self, soft: torch.Tensor, atts: torch.Tensor, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Upstream's ``prompt_wrap``: ``prompt`` split at ``<ImageHere>``, both parts
        tokenised without BOS and put around every row's soft tokens.

        Args:
            soft: ``NxQxE``; atts: ``NxQ``.
        Returns:
            ``(NxLxE, NxL)`` with ``L = len(before) + Q + len(after)``.
        """
        before, after = prompt.split(PROMPT_IMAGE_PLACEHOLDER)
        tok = self.llama_tokenizer
        parts = []
        for text in (before, after):
            ids = torch.as_tensor(tok.encode(text), dtype=torch.long, device=self.device)
            parts.append(self.embed_tokens(ids[None]).expand(soft.shape[0], -1, -1).to(soft.dtype))
        wrapped = torch.cat([parts[0], soft, parts[1]], dim=1)
        return wrapped, atts[:, :1].expand(-1, wrapped.shape[1])

    def _losses(self, lm_loss: torch.Tensor, centre: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``{"loss": total}`` plus the parts when a training aid's loss was added
        (``centre``: :meth:`_centre_loss`'s)."""
        taken = self.box_attention.take_loss() if self.box_attention is not None else None
        total, parts = (lm_loss, {}) if taken is None else (lm_loss + taken[0], taken[1])
        if centre is not None:
            total, parts["centre_loss"] = total + self.object_centre_weight * centre, centre.detach()
        if not parts:
            return {"loss": lm_loss}
        return {"loss": total, "lm_loss": lm_loss.detach(), **parts}

    def _centre_loss(self, tokens: torch.Tensor, objects: ObjectBoxes | None) -> torch.Tensor | None:
        """The object-centre aid's loss on image tokens ``NxTxC`` (before the PE) whose rows
        match ``objects``; None when the aid is off or no row lists objects."""
        if not self.object_centre_weight or objects is None:
            return None
        return centre_loss(tokens, objects[0], objects[1], self.visual_encoder.grid_size, self.img_size)

    def _object_boxes(self, samples: dict[str, Any]) -> ObjectBoxes | None:
        """A batch's optional ``objects`` (``BxMx2x2``) and ``num_objects`` (``B``): the
        boxes of every object in each image or record, for the training aids."""
        if (self.box_attention is None and not self.object_centre_weight) or samples.get("objects") is None:
            return None
        return samples["objects"].to(self.device), torch.as_tensor(samples["num_objects"], device=self.device)

    def _forward_conversations(self, samples: dict[str, Any]) -> dict[str, torch.Tensor]:
        image = samples["image"].to(self.device)
        boxes = samples["bbox"].to(self.device)
        counts = [int(c) for c in samples["num_boxes"]]
        tokens = self.image_tokens(image)
        if samples.get("image_index") is not None:  # records sharing images: one ViT pass each
            tokens = tokens[torch.as_tensor(samples["image_index"], device=self.device)]
        rows = [b for b, c in enumerate(counts) for _ in range(c)]
        flat = torch.cat([boxes[b, :c] for b, c in enumerate(counts)]) if rows else boxes[:0, 0]
        objects = self._object_boxes(samples)
        centre = self._centre_loss(tokens, objects)
        image_embeds = self.add_image_pe(tokens)
        if self.box_attention is None:
            objects = None
        if objects is not None and rows:  # per record -> per row
            index = torch.as_tensor(rows, device=self.device)
            objects = (objects[0][index], objects[1][index])
        soft = self.encode_regions(image_embeds[rows], flat, objects) if rows else None
        seqs, labels, start = [], [], 0
        for b, turns in enumerate(samples["conversations"]):
            regions = soft[start:start + counts[b]] if soft is not None else None
            start += counts[b]
            emb, lab = self.conversation_training_row(turns, regions)
            seqs.append(emb)
            labels.append(lab)
        # rows of similar length go through the LLM together (less padding); the loss is
        # the mean over all reply tokens of the batch, as one padded call gives
        total = torch.stack([(lab[1:] != -100).sum() for lab in labels]).sum()  # on the device: no sync
        loss_sum = seqs[0].new_zeros((), dtype=torch.float32)
        for bucket in length_buckets([s.shape[0] for s in seqs]):
            width = max(seqs[i].shape[0] for i in bucket)
            inputs = seqs[0].new_zeros(len(bucket), width, seqs[0].shape[-1])
            targets = torch.full((len(bucket), width), -100, dtype=torch.long, device=self.device)
            mask = torch.zeros(len(bucket), width, dtype=torch.long, device=self.device)
            for k, i in enumerate(bucket):
                inputs[k, : seqs[i].shape[0]] = seqs[i]
                targets[k, : seqs[i].shape[0]] = labels[i]
                mask[k, : seqs[i].shape[0]] = 1
            logits = self.llama_model(inputs_embeds=inputs, attention_mask=mask, return_dict=True).logits
            loss_sum = loss_sum + nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets[:, 1:].reshape(-1),
                ignore_index=-100, reduction="sum")
        return self._losses(loss_sum / total.clamp_min(1), centre)

    def conversation_training_row(
        self, turns: Sequence[dict[str, str]], regions: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One LLaVA-style conversation -> (embeddings ``LxE``, labels ``L``).

        The text is the inference template's (:func:`~click4caption.prompts.conversation_pieces`),
        tokenised as the chat engine does (split at ``[IMG]``, BOS on the first piece only);
        each reply ``reply + "\\n" + end_sym`` is a target, everything else -100.

        Raises:
            InputError: the number of ``[IMG]`` differs from the number of regions.
        """
        pieces = conversation_pieces(turns, self.end_sym)
        n_img = sum(text.count(IMG_TOKEN) for text, is_target in pieces if not is_target)
        n_regions = 0 if regions is None else regions.shape[0]
        if n_img != n_regions:
            raise InputError(f"{n_img} {IMG_TOKEN} placeholders but {n_regions} regions")
        parts: list[tuple[torch.Tensor | None, bool]] = []  # (ids, is_target); None: a region
        first = True
        for text, is_target in pieces:
            segs = [text] if is_target else text.split(IMG_TOKEN)
            for j, seg in enumerate(segs):
                if j > 0:
                    parts.append((None, False))
                parts.append((self._token_ids(seg, first), is_target))
                first = False
        ids_all = torch.cat([ids for ids, _ in parts if ids is not None]).to(self.device)
        emb_all = self.embed_tokens(ids_all[None])[0]  # one lookup for the whole row
        embs: list[torch.Tensor] = []
        labs: list[torch.Tensor] = []
        region_i, offset = 0, 0
        for ids, is_target in parts:
            if ids is None:
                embs.append(regions[region_i])
                labs.append(torch.full((regions.shape[1],), -100, dtype=torch.long))
                region_i += 1
                continue
            embs.append(emb_all[offset:offset + len(ids)])
            labs.append(ids if is_target else torch.full_like(ids, -100))
            offset += len(ids)
        return torch.cat(embs), torch.cat(labs).to(self.device)

    def _token_ids(self, text: str, bos: bool) -> torch.Tensor:
        """Token ids of one text piece (on the CPU), cached: training texts repeat a lot."""
        key = (text, bos)
        ids = self._ids_cache.get(key)
        if ids is None:
            ids = torch.as_tensor(self.llama_tokenizer.encode(text, add_bos=bos), dtype=torch.long)
            if len(self._ids_cache) >= TOKEN_CACHE_SIZE:
                self._ids_cache.clear()
            self._ids_cache[key] = ids
        return ids


def length_buckets(lengths: Sequence[int], max_buckets: int = 3, call_cost: int = 64) -> list[list[int]]:
    """Split rows into at most ``max_buckets`` groups of similar length.

    Minimises the padded tokens of all groups plus ``call_cost`` tokens per group (a
    separate LLM call is not free); returns row indices, groups in order of length.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sorted_lengths = [lengths[i] for i in order]
    n = len(order)
    best: tuple[int, list[int]] = (sorted_lengths[-1] * n + call_cost, [])
    for splits in (c for k in range(1, max_buckets) for c in itertools.combinations(range(1, n), k)):
        bounds = [0, *splits, n]
        cost = sum(sorted_lengths[b - 1] * (b - a) + call_cost for a, b in zip(bounds, bounds[1:]))
        if cost < best[0]:
            best = (cost, list(splits))
    bounds = [0, *best[1], n]
    return [order[a:b] for a, b in zip(bounds, bounds[1:])]


def caption_rows(text_input: Sequence[Any], batch: int, num_regions: int) -> list[str]:
    """Captions of a caption-mode batch, one per region, image-major.

    ``text_input`` is ``B*R`` strings (image-major), or upstream's collated layout: ``R``
    sequences of ``B`` captions (what the default collate makes of per-image lists),
    transposed with ``zip(*...)`` as upstream does.

    Raises:
        InputError: the counts do not fit ``B`` images with ``R`` regions each.
    """
    items = list(text_input)
    if items and all(isinstance(t, str) for t in items):
        texts = items
    elif items and all(isinstance(t, (list, tuple)) for t in items):
        if len(items) != num_regions or any(len(t) != batch for t in items):
            raise InputError(f"text_input holds {len(items)} lists of {[len(t) for t in items]} captions; "
                             f"upstream's collated layout is {num_regions} lists (regions) of {batch} (images)")
        texts = [caption for per_image in zip(*items) for caption in per_image]
    else:
        raise InputError("text_input must be a list of captions or upstream's collated lists of captions")
    if len(texts) != batch * num_regions:
        raise InputError(f"{len(texts)} captions for {batch} image(s) x {num_regions} region(s)")
    return texts
