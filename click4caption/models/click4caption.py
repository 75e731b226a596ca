"""The Click4Caption model: ViT -> Q-Former with box corner tokens -> projection -> LLM.

Public methods keep upstream names and semantics (``encode_img_with_bbox``,
``forward(samples)``), so scripts written for the original port unchanged.
"""
from __future__ import annotations

import itertools
import logging
from typing import Any, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from click4caption.conversation import IMG_TOKEN, Conversation, vicuna_v0
from click4caption.models.prompt_encoder import PromptEncoder
from click4caption.models.vision import VisionEncoder

logger = logging.getLogger(__name__)

# random near-full box used for whole-image captions: corners within half a ViT patch
NEAR_FULL_BOX_JITTER = 7.0
# text pieces whose token ids are kept in training (conversation rows repeat them)
TOKEN_CACHE_SIZE = 4096


def length_buckets(lengths: Sequence[int], max_buckets: int = 3, call_cost: int = 64) -> list[list[int]]:
    """Split rows into at most ``max_buckets`` groups of similar length.

    Minimises the padded tokens of all groups plus ``call_cost`` tokens per group (a
    separate LLM call is not free); returns row indices, groups in order of length.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sorted_lengths = [lengths[i] for i in order]
    n = len(order)
    best: tuple[int, list[int]] = (sorted_lengths[-1] * n + call_cost, [])
    for splits in (s for k in range(1, max_buckets) for s in itertools.combinations(range(1, n), k)):
        bounds = [0, *splits, n]
        cost = sum(sorted_lengths[b - 1] * (b - a) + call_cost for a, b in zip(bounds, bounds[1:]))
        if cost < best[0]:
            best = (cost, list(splits))
    bounds = [0, *best[1], n]
    return [order[a:b] for a, b in zip(bounds, bounds[1:])]


class Click4Caption(nn.Module):
    """Composed from built parts (see :func:`click4caption.models.builder.build_click4caption`).

    Args:
        visual_encoder: ViT returning ``Bx(1+N)xC`` averaged block features.
        qformer: query-only ``Blip2QFormerModel`` of width D.
        query_tokens: learned queries ``1xQxD``.
        prompt_encoder: box corner encoder and image PE.
        llama_model / llama_tokenizer: the causal LM (width E) and its tokenizer.
        image_size: model input side S.
        delete_vit_cls_token: drop the CLS token before the Q-Former.
        add_img_pe: add the projected Fourier PE to the image tokens.
        max_txt_len: caption tokens kept in caption-mode training.
        end_sym: appended to every training caption (``###``).
    """

    def __init__(
        self,
        visual_encoder: VisionEncoder,
        qformer: nn.Module,
        query_tokens: nn.Parameter,
        prompt_encoder: PromptEncoder,
        llama_model: PreTrainedModel,
        llama_tokenizer: PreTrainedTokenizerBase,
        image_size: int = 224,
        delete_vit_cls_token: bool = True,
        add_img_pe: bool = True,
        max_txt_len: int = 32,
        end_sym: str = "###",
        box_attention_loss_weight: float = 0.0,
        box_attention_grid: int = 0,
        box_attention_whole_image: str = "cells",
    ) -> None:
        super().__init__()
        self.visual_encoder = visual_encoder
        self.ln_vision = nn.LayerNorm(visual_encoder.num_features)  # eps 1e-5, as LAVIS
        self.qformer = qformer
        self.query_tokens = query_tokens
        self.prompt_encoder = prompt_encoder
        self.llama_model = llama_model
        self.llama_tokenizer = llama_tokenizer
        self.llama_proj = nn.Linear(query_tokens.shape[-1], llama_model.config.hidden_size)
        self.img_size = image_size
        self.delete_vit_cls_token = delete_vit_cls_token
        self.add_img_pe = add_img_pe
        self.max_txt_len = max_txt_len
        self.end_sym = end_sym
        self.box_attention_loss_weight = box_attention_loss_weight
        self.box_attention_grid = box_attention_grid
        if box_attention_whole_image not in ("cells", "free"):
            raise ValueError(f"box_attention_whole_image must be 'cells' or 'free', got {box_attention_whole_image!r}")
        self.box_attention_whole_image = box_attention_whole_image
        self._attn_maps: list[torch.Tensor] | None = None
        self._ids_cache: dict[tuple[str, bool], torch.Tensor] = {}
        self._box_attn_loss: torch.Tensor | None = None
        if box_attention_loss_weight > 0:
            for layer in self.qformer.encoder.layer:
                if layer.has_cross_attention:
                    layer.crossattention.attention.register_forward_hook(self._record_attention)

    frozen_modules: tuple[str, ...] = ()

    def train(self, mode: bool = True) -> "Click4Caption":
        """Like ``nn.Module.train`` but frozen parts stay in eval mode (upstream's
        ``disabled_train``)."""
        super().train(mode)
        for name in self.frozen_modules:
            getattr(self, name).eval()
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
        """Random near-full boxes ``Bx1x2x2``: top-left in ``[0, 7)``, bottom-right ``S - [0, 7)``."""
        jitter = torch.rand(batch, 1, 2, 2, generator=generator) * NEAR_FULL_BOX_JITTER
        boxes = torch.empty(batch, 1, 2, 2)
        boxes[:, :, 0] = jitter[:, :, 0]
        boxes[:, :, 1] = self.img_size - jitter[:, :, 1]
        return boxes.to(self.device)

    def _record_attention(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._attn_maps is not None and isinstance(output, tuple) and output[1] is not None:
            self._attn_maps.append(output[1])

    def inside_box_mask(self, boxes: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """Which image tokens lie in each box: ``Nx2x2`` boxes -> ``NxT`` float mask.

        A patch is inside when its centre is; a box holding no centre gets the patch
        nearest to its own centre. A kept CLS token is never inside.
        """
        gh, gw = self.visual_encoder.grid_size
        s = float(self.img_size)
        ys = (torch.arange(gh, device=boxes.device, dtype=boxes.dtype) + 0.5) * s / gh
        xs = (torch.arange(gw, device=boxes.device, dtype=boxes.dtype) + 0.5) * s / gw
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        cx, cy = cx.reshape(1, -1), cy.reshape(1, -1)
        b = boxes.clip(0, s)
        x1, y1, x2, y2 = b[:, 0, 0:1], b[:, 0, 1:2], b[:, 1, 0:1], b[:, 1, 1:2]
        mask = (cx >= x1) & (cx <= x2) & (cy >= y1) & (cy <= y2)
        dist = (cx - (x1 + x2) / 2) ** 2 + (cy - (y1 + y2) / 2) ** 2
        nearest = torch.zeros_like(mask).scatter_(1, dist.argmin(dim=1, keepdim=True), True)
        mask = torch.where(mask.any(dim=1, keepdim=True), mask, nearest).to(boxes.dtype)
        if num_tokens == mask.shape[1] + 1:
            mask = torch.cat([mask.new_zeros(mask.shape[0], 1), mask], dim=1)
        return mask

    def query_cells(self, boxes: torch.Tensor) -> torch.Tensor:
        """Each learned query's share of the box: ``Nx2x2`` -> ``NxQx2x2``.

        With ``box_attention_grid`` g > 0 the box is cut into g x g cells, row-major, and
        query q gets cell ``q mod g*g``; with g = 0 every query gets the whole box.
        """
        g = self.box_attention_grid
        q = self.num_query_token
        if g <= 0:
            return boxes[:, None].expand(-1, q, -1, -1)
        cell = torch.arange(q, device=boxes.device) % (g * g)
        row, col = (cell // g).to(boxes.dtype), (cell % g).to(boxes.dtype)
        tl, size = boxes[:, None, 0], (boxes[:, 1] - boxes[:, 0])[:, None]  # Nx1x2
        start = torch.stack([col, row], dim=-1)[None] / g  # 1xQx2 (x, y)
        top_left = tl + start * size
        return torch.stack([top_left, top_left + size / g], dim=2)

    def attention_targets(self, boxes: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """Where each learned query should look: ``Nx2x2`` boxes -> ``NxQxT`` masks.

        Every query's cell of the box (:meth:`query_cells`); with
        ``box_attention_whole_image: free``, every query of a (near-)whole-image box may
        look anywhere in the image (the whole-image description must count the objects,
        which cells split).
        """
        n, q = boxes.shape[0], self.num_query_token
        cells = self.query_cells(boxes).reshape(n * q, 2, 2)
        mask = self.inside_box_mask(cells, num_tokens).reshape(n, q, -1)
        if self.box_attention_whole_image == "free" and self.box_attention_grid > 0:
            anywhere = self.inside_box_mask(boxes.new_tensor([[[0.0, 0.0], [self.img_size, self.img_size]]]),
                                            num_tokens)
            mask = torch.where(self.is_near_full(boxes)[:, None, None], anywhere[:, None], mask)
        return mask

    def box_attention_loss(self, maps: list[torch.Tensor], boxes: torch.Tensor) -> torch.Tensor:
        """Mean of ``-log`` (attention mass of each learned query inside its target).

        A training aid for models trained from scratch (the shapes model): it teaches
        the queries to look between the corners, each at its own cell of the box when
        ``box_attention_grid`` is set (so the box's layout reaches the LLM), see
        :meth:`attention_targets`. ``maps``: per cross-attention layer ``NxHx(Q+2)xT``.
        """
        n, q = boxes.shape[0], self.num_query_token
        mask = self.attention_targets(boxes, maps[0].shape[-1]).reshape(n, 1, q, -1)
        losses = [-(m[:, :, :q] * mask).sum(-1).clamp_min(1e-6).log().mean() for m in maps]
        return torch.stack(losses).mean()

    def is_near_full(self, boxes: torch.Tensor) -> torch.Tensor:
        """``Nx2x2`` boxes -> ``N`` bools: every corner within the near-full jitter of the border."""
        s, j = float(self.img_size), NEAR_FULL_BOX_JITTER
        return (boxes[:, 0] <= j).all(-1) & (boxes[:, 1] >= s - j).all(-1)

    # ------------------------------------------------------------------ vision
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """image ``Bx3xSxS`` -> image tokens for cross-attention ``BxTxC``.

        ViT multi-block mean -> ln_vision -> (drop CLS) -> (+ image PE). T is N, or
        1+N when the CLS token is kept. This is what callers may cache per image.
        """
        vit_dtype = self.visual_encoder.patch_embed.proj.weight.dtype
        vit_device = self.visual_encoder.patch_embed.proj.weight.device
        feats = self.visual_encoder(image.to(device=vit_device, dtype=vit_dtype))
        feats = feats.to(device=self.device, dtype=self.ln_vision.weight.dtype)
        embeds = self.ln_vision(feats)
        if self.delete_vit_cls_token:
            embeds = embeds[:, 1:]
        if self.add_img_pe:
            pe = self.prompt_encoder.image_pe(self.visual_encoder.grid_size, with_cls=not self.delete_vit_cls_token)
            embeds = embeds + pe.unsqueeze(0).to(embeds.dtype)
        return embeds

    def encode_regions(self, image_embeds: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Q-Former over paired image tokens and boxes.

        Args:
            image_embeds: ``NxTxC`` (one row per box).
            boxes: ``Nx2x2`` corners in model pixels.
        Returns:
            soft tokens ``NxQxE`` in the LLM's embedding dtype.
        """
        n = image_embeds.shape[0]
        queries = self.query_tokens.expand(n, -1, -1)
        corners = self.prompt_encoder.encode_boxes(boxes.to(self.device))
        tokens = torch.cat([queries, corners.to(queries.dtype)], dim=1)
        atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        record = self.training and self.box_attention_loss_weight > 0
        self._attn_maps = [] if record else None
        try:
            out = self.qformer(
                query_embeds=tokens,
                encoder_hidden_states=image_embeds,
                encoder_attention_mask=atts,
            ).last_hidden_state
            if record and self._attn_maps:
                self._box_attn_loss = self.box_attention_loss(self._attn_maps, boxes.to(self.device).float())
        finally:
            self._attn_maps = None
        soft = self.llama_proj(out[:, : self.num_query_token].to(self.llama_proj.weight.dtype))
        return soft.to(self.llama_model.get_input_embeddings().weight.dtype)

    def encode_img_with_bbox(
        self, image: torch.Tensor, boxes: torch.Tensor, image_embeds: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Upstream's entry point.

        Args:
            image: ``Bx3xSxS`` (ignored when ``image_embeds`` is given).
            boxes: ``BxRx2x2`` corners ((x1, y1), (x2, y2)) in model-input pixels.
            image_embeds: cached ``BxTxC`` from :meth:`encode_image` to skip the ViT.
        Returns:
            ``(soft_tokens (B*R)xQxE, atts (B*R)xQ, image_embeds BxTxC)``; rows are
            image-major (image 0's R boxes first).
        """
        if image_embeds is None:
            image_embeds = self.encode_image(image)
        bsz, num_regions = boxes.shape[:2]
        if image_embeds.shape[0] != bsz:
            raise ValueError(f"{image_embeds.shape[0]} images but boxes for {bsz}")
        cross = image_embeds.repeat_interleave(num_regions, dim=0)
        soft = self.encode_regions(cross, boxes.reshape(-1, 2, 2))
        atts = torch.ones(soft.shape[:-1], dtype=torch.long, device=soft.device)
        return soft, atts, image_embeds

    # ------------------------------------------------------------------ training
    def forward(self, samples: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Training loss.

        Caption mode (upstream): ``image`` ``Bx3xSxS``, ``text_input`` (B*R strings,
        image-major), optional ``bbox`` ``BxRx2x2`` (default: one random near-full box
        per image). Sequence ``[BOS][Q soft tokens][caption + end_sym]``, loss on the
        caption tokens only.

        Conversation mode (region instructions): ``image``, ``bbox`` ``BxKx2x2`` padded,
        ``num_boxes`` (B ints) and ``conversations`` (B lists of LLaVA-style turns whose
        human turns hold one ``[IMG]`` per box); loss on the assistant replies. With
        ``image_index`` (B ints), ``image`` holds U distinct images and record b uses
        ``image[image_index[b]]`` (one ViT pass per image however many records).
        """
        if "conversations" in samples:
            return self._forward_conversations(samples)
        image = samples["image"].to(self.device)
        boxes = samples.get("bbox")
        if boxes is None:
            boxes = self.random_near_full_boxes(image.shape[0])
        soft, atts, _ = self.encode_img_with_bbox(image, boxes.to(self.device))
        texts = [t + self.end_sym for t in samples["text_input"]]
        if len(texts) != soft.shape[0]:
            raise ValueError(f"{len(texts)} captions for {soft.shape[0]} regions")
        tok = self.llama_tokenizer
        tok.padding_side = "right"
        regress = tok(texts, return_tensors="pt", padding="longest", truncation=True,
                      max_length=self.max_txt_len, add_special_tokens=False).to(self.device)
        targets = regress.input_ids.masked_fill(regress.input_ids == tok.pad_token_id, -100)
        n = soft.shape[0]
        empty = torch.full((n, soft.shape[1] + 1), -100, dtype=torch.long, device=self.device)
        targets = torch.cat([empty, targets], dim=1)
        bos = torch.full((n, 1), tok.bos_token_id, dtype=torch.long, device=self.device)
        inputs = torch.cat([self.embed_tokens(bos), soft, self.embed_tokens(regress.input_ids)], dim=1)
        mask = torch.cat([atts[:, :1], atts, regress.attention_mask], dim=1)
        out = self.llama_model(inputs_embeds=inputs, attention_mask=mask, labels=targets, return_dict=True)
        return self._losses(out.loss)

    def _losses(self, lm_loss: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"loss": total}`` plus the parts when a box-attention loss was added."""
        aux, self._box_attn_loss = self._box_attn_loss, None
        if aux is None:
            return {"loss": lm_loss}
        return {"loss": lm_loss + self.box_attention_loss_weight * aux, "lm_loss": lm_loss.detach(),
                "box_attention_loss": aux.detach()}

    def _forward_conversations(self, samples: dict[str, Any]) -> dict[str, torch.Tensor]:
        image = samples["image"].to(self.device)
        boxes = samples["bbox"].to(self.device)
        counts = [int(c) for c in samples["num_boxes"]]
        image_embeds = self.encode_image(image)
        if samples.get("image_index") is not None:  # records sharing images: one ViT pass each
            image_embeds = image_embeds[torch.as_tensor(samples["image_index"], device=self.device)]
        rows = [b for b, c in enumerate(counts) for _ in range(c)]
        flat = torch.cat([boxes[b, :c] for b, c in enumerate(counts)]) if rows else boxes[:0, 0]
        soft = self.encode_regions(image_embeds[rows], flat) if rows else None
        seqs, labels, start = [], [], 0
        for b, turns in enumerate(samples["conversations"]):
            regions = soft[start:start + counts[b]] if soft is not None else None
            start += counts[b]
            emb, lab = self.conversation_training_row(turns, regions)
            seqs.append(emb)
            labels.append(lab)
        # rows of similar length go through the LLM together (less padding); the loss is
        # the mean over all reply tokens of the batch, as one padded call would give
        total = sum(int((lab[1:] != -100).sum()) for lab in labels)
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
        return self._losses(loss_sum / max(total, 1))

    def conversation_training_row(
        self, turns: Sequence[dict[str, str]], regions: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One LLaVA-style conversation -> (embeddings ``LxE``, labels ``L``).

        Text pieces are tokenised as :class:`~click4caption.conversation.Chat` does at
        inference (split at ``[IMG]``, BOS on the first piece only); each reply is the
        tokens of ``reply + "\\n###"`` that follow ``" Assistant:"``.
        """
        conv = vicuna_v0()
        pieces: list[tuple[str, bool]] = []  # (text, is_target)
        prompt = conv.system + conv.sep
        for turn in turns:
            role = turn["from"]
            if role in ("human", "user", conv.roles[0]):
                prompt += " " + conv.roles[0] + ": " + turn["value"] + "\n" + conv.sep
            elif role in ("gpt", "assistant", conv.roles[1]):
                pieces.append((prompt + " " + conv.roles[1] + ":", False))
                pieces.append((turn["value"] + "\n" + conv.sep, True))
                prompt = ""
            else:
                raise ValueError(f"unknown conversation role '{role}'")
        n_img = sum(p.count(IMG_TOKEN) for p, tgt in pieces if not tgt)
        n_regions = 0 if regions is None else regions.shape[0]
        if n_img != n_regions:
            raise ValueError(f"{n_img} {IMG_TOKEN} placeholders but {n_regions} regions")
        parts: list[tuple[torch.Tensor | None, bool]] = []  # (token ids, is_target) or (None, _) for a region
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
        """Token ids of one text piece (CPU), cached: training texts repeat a lot."""
        key = (text, bos)
        ids = self._ids_cache.get(key)
        if ids is None:
            ids = self.llama_tokenizer(text, return_tensors="pt", add_special_tokens=bos).input_ids[0]
            if len(self._ids_cache) >= TOKEN_CACHE_SIZE:
                self._ids_cache.clear()
            self._ids_cache[key] = ids
        return ids
