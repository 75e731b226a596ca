"""Numerical parity with the upstream Click4Caption computation.

Small random checkpoints are written in the upstream formats (``eva_vit_g.pth``: a plain
EVA state dict; ``click4caption.pth``: ``{'model': ...}`` in LAVIS / Click4Caption names,
with the extra buffers upstream saves), loaded through our config and loaders, and every
stage is compared, in float32, with an independent plain-torch reference of the upstream
computation that reads the weights by their UPSTREAM names:

- EVA ViT-g blocks (pre-norm, fused qkv with q/v biases and a zero k bias, exact GELU MLP,
  LayerNorm eps 1e-6), mean of the chosen blocks, ``ln_vision`` (eps 1e-5), CLS handling;
- SAM ``PositionEmbeddingRandom`` for the image PE (cell centres, row-major) and the corners;
- the LAVIS BERT Q-Former query path (eps 1e-12, cross-attention on layers ``i % 2 == 0``);
- ``llama_proj`` on the query outputs, the caption-mode training loss, the Vicuna v0
  prompt text, and greedy decoding until ``###``.

The key lists of the reference are checked against the full-size manifests, so the
reference reads exactly the names the real files hold.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml

RTOL = 1e-4  # relative error allowed everywhere (float32)

# tiny sizes; 3 Q-Former layers so that layers 0 and 2 cross-attend and layer 1 does not
IMG, PATCH = 32, 8
VIT_DIM, VIT_DEPTH, VIT_HEADS, VIT_MLP = 32, 3, 2, 48
QF_DIM, QF_LAYERS, QF_HEADS, QF_FFN, CROSS_FREQ = 16, 3, 2, 24, 2
NUM_QUERY = 4
MAX_TXT_LEN = 8


# --------------------------------------------------------------------------- upstream names
def upstream_vit_shapes(dim: int, depth: int, mlp: int, patch: int, img: int) -> dict[str, list[int]]:
    """Key -> shape of BLIP-2's ``eva_vit_g.pth`` layout, in state_dict order."""
    n = (img // patch) ** 2
    out = {"cls_token": [1, 1, dim], "pos_embed": [1, n + 1, dim],
           "patch_embed.proj.weight": [dim, 3, patch, patch], "patch_embed.proj.bias": [dim]}
    for i in range(depth):
        b = f"blocks.{i}."
        out.update({
            b + "norm1.weight": [dim], b + "norm1.bias": [dim],
            b + "attn.q_bias": [dim], b + "attn.v_bias": [dim],
            b + "attn.qkv.weight": [3 * dim, dim],
            b + "attn.proj.weight": [dim, dim], b + "attn.proj.bias": [dim],
            b + "norm2.weight": [dim], b + "norm2.bias": [dim],
            b + "mlp.fc1.weight": [mlp, dim], b + "mlp.fc1.bias": [mlp],
            b + "mlp.fc2.weight": [dim, mlp], b + "mlp.fc2.bias": [dim],
        })
    return out


def upstream_ckpt_shapes(vit_dim: int, d: int, layers: int, ffn: int, freq: int, num_query: int,
                         llm_dim: int, llm_layers: int, llm_head_dim: int) -> dict[str, list[int]]:
    """Key -> shape of the ``'model'`` dict a Click4Caption checkpoint holds, in state_dict order."""
    out: dict[str, list[int]] = {"query_tokens": [1, num_query, d], "ln_vision.weight": [vit_dim],
                                 "ln_vision.bias": [vit_dim],
                                 "Qformer.bert.embeddings.position_ids": [1, 512],
                                 "Qformer.bert.embeddings.LayerNorm.weight": [d],
                                 "Qformer.bert.embeddings.LayerNorm.bias": [d]}
    for i in range(layers):
        p = f"Qformer.bert.encoder.layer.{i}."
        for kind in ("attention", "crossattention") if i % freq == 0 else ("attention",):
            width = vit_dim if kind == "crossattention" else d
            out.update({
                f"{p}{kind}.self.query.weight": [d, d], f"{p}{kind}.self.query.bias": [d],
                f"{p}{kind}.self.key.weight": [d, width], f"{p}{kind}.self.key.bias": [d],
                f"{p}{kind}.self.value.weight": [d, width], f"{p}{kind}.self.value.bias": [d],
                f"{p}{kind}.output.dense.weight": [d, d], f"{p}{kind}.output.dense.bias": [d],
                f"{p}{kind}.output.LayerNorm.weight": [d], f"{p}{kind}.output.LayerNorm.bias": [d],
            })
        out.update({
            p + "intermediate_query.dense.weight": [ffn, d], p + "intermediate_query.dense.bias": [ffn],
            p + "output_query.dense.weight": [d, ffn], p + "output_query.dense.bias": [d],
            p + "output_query.LayerNorm.weight": [d], p + "output_query.LayerNorm.bias": [d],
        })
    for i in range(llm_layers):  # persistent in transformers 4.28, so upstream saved it
        out[f"llama_model.model.layers.{i}.self_attn.rotary_emb.inv_freq"] = [llm_head_dim // 2]
    out.update({
        "llama_proj.weight": [llm_dim, d], "llama_proj.bias": [llm_dim],
        "coordinate_pe_layer.positional_encoding_gaussian_matrix": [2, d // 2],
        "coordinate_type_emb.0.weight": [1, d], "coordinate_type_emb.1.weight": [1, d],
        "img_embs_pe_proj.weight": [vit_dim, d], "img_embs_pe_proj.bias": [vit_dim],
    })
    return out


@pytest.mark.parametrize("size,llm", [("7b", (4096, 32, 128)), ("13b", (5120, 40, 128))])
def test_reference_key_names_are_the_manifests(size: str, llm: tuple[int, int, int], manifests_dir: Path) -> None:
    """The reference below reads exactly the keys (and shapes, and order) of the real files."""
    manifest = json.loads((manifests_dir / f"click4caption_ckpt_{size}.json").read_text())
    ours = upstream_ckpt_shapes(1408, 768, 12, 3072, 2, 32, *llm)
    assert list(ours.items()) == list(manifest.items())
    vit_manifest = json.loads((manifests_dir / "eva_vit_g.json").read_text())
    assert list(upstream_vit_shapes(1408, 39, 6144, 14, 224).items()) == list(vit_manifest.items())


# --------------------------------------------------------------------------- reference math
def ref_layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def ref_gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def ref_linear(x: torch.Tensor, sd: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def ref_heads_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Scaled dot-product attention over ``heads`` heads, no mask: ``BxNxC`` in and out."""
    b, n, c = q.shape
    dh = c // heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], t.shape[1], heads, dh).transpose(1, 2)

    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(dh)
    ctx = torch.softmax(scores, dim=-1) @ split(v)
    return ctx.transpose(1, 2).reshape(b, n, c)


def ref_vit_features(vit: dict[str, torch.Tensor], image: torch.Tensor, blocks: list[int] | None) -> torch.Tensor:
    """EVA ViT-g (BLIP-2 packaging): mean of the chosen blocks' outputs ``Bx(1+N)xC``, CLS first.

    ``blocks=None`` is upstream's ``visual_encoder(image)``: the last block's output."""
    bsz = image.shape[0]
    g = IMG // PATCH
    # patch embedding as a matmul over row-major patches
    patches = image.reshape(bsz, 3, g, PATCH, g, PATCH).permute(0, 2, 4, 1, 3, 5).reshape(bsz, g * g, -1)
    x = patches @ vit["patch_embed.proj.weight"].reshape(VIT_DIM, -1).T + vit["patch_embed.proj.bias"]
    x = torch.cat([vit["cls_token"].expand(bsz, -1, -1), x], dim=1) + vit["pos_embed"]
    feats = []
    for i in range(VIT_DEPTH):
        p = f"blocks.{i}."
        h = ref_layer_norm(x, vit[p + "norm1.weight"], vit[p + "norm1.bias"], 1e-6)
        bias = torch.cat([vit[p + "attn.q_bias"], torch.zeros_like(vit[p + "attn.q_bias"]), vit[p + "attn.v_bias"]])
        q, k, v = (h @ vit[p + "attn.qkv.weight"].T + bias).chunk(3, dim=-1)
        x = x + ref_linear(ref_heads_attention(q, k, v, VIT_HEADS), vit, p + "attn.proj")
        h = ref_layer_norm(x, vit[p + "norm2.weight"], vit[p + "norm2.bias"], 1e-6)
        x = x + ref_linear(ref_gelu(ref_linear(h, vit, p + "mlp.fc1")), vit, p + "mlp.fc2")
        if blocks is None or i in blocks:
            feats.append(x)
    if blocks is None:
        return feats[-1]
    return torch.stack(feats).mean(0)


def ref_fourier(points01: torch.Tensor, gauss: torch.Tensor) -> torch.Tensor:
    """SAM PositionEmbeddingRandom._pe_encoding: ``[sin, cos](2 pi (2p - 1) @ G)``."""
    proj = 2 * math.pi * ((2 * points01 - 1) @ gauss)
    return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)


def ref_image_pe(sd: dict[str, torch.Tensor], with_cls: bool) -> torch.Tensor:
    """Image PE: grid of cell centres (row-major, points as (x, y)), projected to the ViT width."""
    g = IMG // PATCH
    pts = torch.tensor([[(j + 0.5) / g, (i + 0.5) / g] for i in range(g) for j in range(g)])
    pe = ref_fourier(pts, sd["coordinate_pe_layer.positional_encoding_gaussian_matrix"])
    if with_cls:
        pe = torch.cat([pe.mean(0, keepdim=True), pe], dim=0)
    return ref_linear(pe, sd, "img_embs_pe_proj")


def ref_image_embeds(vit: dict[str, torch.Tensor], sd: dict[str, torch.Tensor], image: torch.Tensor,
                     variant: "Variant") -> torch.Tensor:
    x = ref_vit_features(vit, image, variant.blocks)
    x = ref_layer_norm(x, sd["ln_vision.weight"], sd["ln_vision.bias"], 1e-5)
    if variant.delete_cls:
        x = x[:, 1:]
    if variant.add_pe:
        x = x + ref_image_pe(sd, with_cls=not variant.delete_cls)
    return x


def ref_corner_tokens(sd: dict[str, torch.Tensor], boxes: torch.Tensor) -> torch.Tensor:
    """``BxRx2x2`` boxes in model pixels -> ``(B*R)x2xD``: clip to [0, S], /S, Fourier, + type emb."""
    coords = boxes.clip(0, IMG).reshape(-1, 2, 2) / IMG
    tokens = ref_fourier(coords, sd["coordinate_pe_layer.positional_encoding_gaussian_matrix"])
    return tokens + torch.stack([sd["coordinate_type_emb.0.weight"][0], sd["coordinate_type_emb.1.weight"][0]])


QF_EPS = 1e-12  # BERT's LayerNorm eps


def ref_bert_attention(sd: dict[str, torch.Tensor], name: str, x: torch.Tensor, ctx_in: torch.Tensor) -> torch.Tensor:
    """LAVIS ``BertAttention`` (``name`` = ``...layer.N.attention`` or ``...crossattention``):
    ``self.{query,key,value}``, then ``output``: dense + residual + LayerNorm."""
    q = ref_linear(x, sd, f"{name}.self.query")
    k = ref_linear(ctx_in, sd, f"{name}.self.key")
    v = ref_linear(ctx_in, sd, f"{name}.self.value")
    out = ref_linear(ref_heads_attention(q, k, v, QF_HEADS), sd, f"{name}.output.dense")
    return ref_layer_norm(out + x, sd[f"{name}.output.LayerNorm.weight"], sd[f"{name}.output.LayerNorm.bias"], QF_EPS)


def ref_qformer(sd: dict[str, torch.Tensor], tokens: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
    """LAVIS ``BertModel(query_embeds=...)``: every input token is a query token."""
    p = "Qformer.bert."
    h = ref_layer_norm(tokens, sd[p + "embeddings.LayerNorm.weight"], sd[p + "embeddings.LayerNorm.bias"], QF_EPS)
    for i in range(QF_LAYERS):
        lp = f"{p}encoder.layer.{i}."
        h = ref_bert_attention(sd, lp + "attention", h, h)
        if i % CROSS_FREQ == 0:
            h = ref_bert_attention(sd, lp + "crossattention", h, image_embeds)
        inter = ref_gelu(ref_linear(h, sd, lp + "intermediate_query.dense"))
        h = ref_layer_norm(ref_linear(inter, sd, lp + "output_query.dense") + h,
                           sd[lp + "output_query.LayerNorm.weight"], sd[lp + "output_query.LayerNorm.bias"], QF_EPS)
    return h


def ref_soft_tokens(vit, sd, image, boxes, variant) -> tuple[torch.Tensor, torch.Tensor]:
    """upstream ``encode_img_with_bbox``: (soft tokens ``(B*R)xQxE``, image embeds)."""
    embeds = ref_image_embeds(vit, sd, image, variant)
    cross = embeds.repeat_interleave(boxes.shape[1], dim=0)
    queries = sd["query_tokens"].expand(cross.shape[0], -1, -1)
    tokens = torch.cat([queries, ref_corner_tokens(sd, boxes)], dim=1)
    out = ref_qformer(sd, tokens, cross)
    return ref_linear(out[:, :NUM_QUERY], sd, "llama_proj"), embeds


def ref_caption_loss(llm, tok, soft: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """Upstream caption mode: ``[BOS][soft][caption + '###']``, right padding, -100 on BOS,
    soft tokens and padding, captions cut at ``max_txt_len`` tokens; mean token CE."""
    emb = llm.get_input_embeddings()
    ids = [tok(c + "###", add_special_tokens=False).input_ids[:MAX_TXT_LEN] for c in captions]
    width = max(len(i) for i in ids)
    rows, masks, labels = [], [], []
    for s, t in zip(soft, ids):
        pad = width - len(t)
        padded = torch.tensor(t + [tok.pad_token_id] * pad)
        rows.append(torch.cat([emb(torch.tensor([tok.bos_token_id])), s, emb(padded)]))
        masks.append(torch.tensor([1] * (1 + s.shape[0] + len(t)) + [0] * pad))
        labels.append(torch.tensor([-100] * (1 + s.shape[0]) + t + [-100] * pad))
    logits = llm(inputs_embeds=torch.stack(rows), attention_mask=torch.stack(masks)).logits
    labels_t = torch.stack(labels)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels_t[:, 1:].reshape(-1),
                           ignore_index=-100)


def ref_prompt(turns: list[tuple[str, str | None]]) -> str:
    """Upstream CONV_VISION.get_prompt(): system '' + '###', then the turns."""
    text = "" + "###"
    for role, message in turns:
        text += f" {role}: {message}\n###" if message else f" {role}:"
    return text


def ref_greedy(llm, tok, prompt: str, softs: list[torch.Tensor], max_new: int) -> list[int]:
    """Upstream Chat: split at [IMG], BOS on the first piece only, soft tokens in the gaps;
    then greedy decoding (full recompute each step) until EOS or '###' appears."""
    emb = llm.get_input_embeddings()
    segs = prompt.split("[IMG]")
    assert len(segs) == len(softs) + 1
    parts = []
    for i, seg in enumerate(segs):
        parts.append(emb(torch.tensor(tok(seg, add_special_tokens=i == 0).input_ids)))
        if i < len(softs):
            parts.append(softs[i].reshape(-1, softs[i].shape[-1]))
    x = torch.cat(parts)
    out: list[int] = []
    for _ in range(max_new):
        nxt = int(llm(inputs_embeds=x[None]).logits[0, -1].argmax())
        out.append(nxt)
        if nxt == tok.eos_token_id or "###" in tok.decode(out, skip_special_tokens=True):
            break
        x = torch.cat([x, emb(torch.tensor([nxt]))])
    return out


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float((ours.double() - ref.double()).norm() / ref.double().norm())


# --------------------------------------------------------------------------- fixtures
@dataclass(frozen=True)
class Variant:
    name: str
    delete_cls: bool
    add_pe: bool
    blocks: list[int] | None
    sentencepiece: bool = True  # a LLaMA tokenizer.model (Vicuna's kind) or a word-level tokenizer.json


VARIANTS = [
    Variant("release", delete_cls=True, add_pe=True, blocks=[0, 2]),  # as eval_configs/click4caption_eval.yaml
    Variant("release_wordlevel_tokenizer", delete_cls=True, add_pe=True, blocks=[0, 2], sentencepiece=False),
    Variant("cls_kept_last_block", delete_cls=False, add_pe=True, blocks=None),
]


class SentencePieceReference:
    """Upstream's tokenizer (transformers 4.28's slow ``LlamaTokenizer``, then ``[PAD]``
    added) on text without special tokens, written with sentencepiece alone: every text is
    ``sp.encode(text)`` (dummy prefix included), BOS prepended on request; decoding is
    ``sp.decode`` of the non-special ids. Shares nothing with the project's tokenizer."""

    def __init__(self, folder: Path) -> None:
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
        self.bos_token_id, self.eos_token_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_token_id = json.loads((folder / "added_tokens.json").read_text())["[PAD]"]
        self.special = {self.bos_token_id, self.eos_token_id, self.sp.unk_id(), self.pad_token_id}

    def __call__(self, text: str, add_special_tokens: bool = True) -> Any:
        from types import SimpleNamespace

        return SimpleNamespace(input_ids=([self.bos_token_id] if add_special_tokens else []) + self.sp.encode(text))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.sp.decode([int(i) for i in ids if int(i) not in self.special])


def random_upstream_weights(seed: int, llm_layers: int, llm_dim: int, llm_head_dim: int
                            ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)

    def fill(name: str, shape: list[int]) -> torch.Tensor:
        if name.endswith("position_ids"):
            return torch.arange(shape[-1]).reshape(shape)
        if name.endswith("inv_freq"):
            return 1.0 / (10000 ** (torch.arange(0, 2 * shape[0], 2).float() / (2 * shape[0])))
        if name.endswith("positional_encoding_gaussian_matrix"):
            return torch.randn(shape, generator=gen)
        r = torch.randn(shape, generator=gen)
        if any(name.endswith(s) for s in ("LayerNorm.weight", "norm1.weight", "norm2.weight", "ln_vision.weight")):
            return 1.0 + 0.2 * r
        return 0.3 * r

    vit = {k: fill(k, s) for k, s in upstream_vit_shapes(VIT_DIM, VIT_DEPTH, VIT_MLP, PATCH, IMG).items()}
    shapes = upstream_ckpt_shapes(VIT_DIM, QF_DIM, QF_LAYERS, QF_FFN, CROSS_FREQ, NUM_QUERY,
                                  llm_dim, llm_layers, llm_head_dim)
    return vit, {k: fill(k, s) for k, s in shapes.items()}


@dataclass
class Upstream:
    variant: Variant
    vit: dict[str, torch.Tensor]
    sd: dict[str, torch.Tensor]
    model: Any   # ours, built by load_config + build_model from the files
    llm: Any     # a separately loaded copy of the same HF LLaMA folder, for the reference
    tok: Any


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda v: v.name)
def upstream(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Upstream:
    from transformers import AutoTokenizer, LlamaForCausalLM

    from click4caption.config import load_config
    from click4caption.models.builder import build_model
    from tests.tiny import write_tiny_llm

    variant: Variant = request.param
    root = tmp_path_factory.mktemp(f"upstream_{variant.name}")
    llm_dir = write_tiny_llm(root / "llm", seed=3, sentencepiece=variant.sentencepiece)
    tok = SentencePieceReference(llm_dir) if variant.sentencepiece else AutoTokenizer.from_pretrained(llm_dir)
    llm = LlamaForCausalLM.from_pretrained(llm_dir, dtype=torch.float32).eval()
    # larger weights than the HF init (std 0.02), so that the next token depends on the
    # whole context (soft tokens, BOS placement) and '###' gets generated now and then
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in llm.parameters():
            if p.dim() == 2:
                p.copy_(0.4 * torch.randn(p.shape, generator=gen))
        for piece in ("###", " ###"):  # make the stop sequence a likely next token
            for i in tok(piece, add_special_tokens=False).input_ids:
                llm.lm_head.weight[i] *= 1.1 if variant.sentencepiece else 1.5
    llm.save_pretrained(llm_dir)
    cfg = llm.config
    vit, sd = random_upstream_weights(7, cfg.num_hidden_layers, cfg.hidden_size,
                                      cfg.hidden_size // cfg.num_attention_heads)
    torch.save(vit, root / "eva_vit_g.pth")
    torch.save({"model": sd, "optimizer": None, "epoch": 3}, root / "click4caption.pth")
    doc = {
        "model": {
            "arch": "click4caption", "model_type": "pretrain_vicuna",
            "vit_model": "custom",
            "vit": {"embed_dim": VIT_DIM, "depth": VIT_DEPTH, "num_heads": VIT_HEADS, "patch_size": PATCH,
                    "mlp_dim": VIT_MLP},
            "qformer": {"hidden_size": QF_DIM, "num_layers": QF_LAYERS, "num_heads": QF_HEADS,
                        "intermediate_size": QF_FFN, "cross_attention_freq": CROSS_FREQ},
            "image_size": IMG, "num_query_token": NUM_QUERY, "max_txt_len": MAX_TXT_LEN, "end_sym": "###",
            "freeze_vit": True, "freeze_qformer": False,
            "delete_vit_cls_token": variant.delete_cls, "add_img_pe": variant.add_pe,
            "use_vit_multiblock_feat": variant.blocks,
            "vit_ckpt": str(root / "eva_vit_g.pth"), "ckpt": str(root / "click4caption.pth"),
            "llama_model": str(llm_dir),
        },
        "datasets": {"cc_sbu_align": {"vis_processor": {"train": {"name": "blip2_image_eval", "image_size": IMG}},
                                      "text_processor": {"train": {"name": "blip_caption"}}}},
        "run": {"task": "image_text_pretrain"},
    }
    (root / "eval.yaml").write_text(yaml.safe_dump(doc))
    torch.manual_seed(12345)  # a different Gaussian matrix would be drawn at init: it must not survive
    model = build_model(load_config(root / "eval.yaml").model, device="cpu").eval()
    return Upstream(variant, vit, sd, model, llm, tok)


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(2, 3, IMG, IMG, generator=gen)
    boxes = torch.tensor([
        [[[2.0, 3.0], [20.5, 30.0]], [[-5.0, 4.0], [40.0, 31.0]], [[0.0, 0.0], [32.0, 32.0]]],
        [[[10.0, 12.0], [14.0, 13.0]], [[16.0, 1.0], [31.0, 9.5]], [[7.0, 7.0], [25.0, 25.0]]],
    ])  # 2 images x 3 boxes; the second box of image 0 reaches outside and is clipped
    return image, boxes


# --------------------------------------------------------------------------- the checks
@torch.no_grad()
def test_vit_features_match(upstream: Upstream, inputs) -> None:
    image, _ = inputs
    ours = upstream.model.visual_encoder(image)
    ref = ref_vit_features(upstream.vit, image, upstream.variant.blocks)
    assert ours.shape == (2, 1 + (IMG // PATCH) ** 2, VIT_DIM)
    assert rel_err(ours, ref) < RTOL


@torch.no_grad()
def test_image_tokens_match(upstream: Upstream, inputs) -> None:
    """ViT mean -> ln_vision -> CLS dropped or kept -> + image PE (CLS gets the grid mean)."""
    image, _ = inputs
    ours = upstream.model.encode_image(image)
    ref = ref_image_embeds(upstream.vit, upstream.sd, image, upstream.variant)
    n = (IMG // PATCH) ** 2
    assert ours.shape == (2, n if upstream.variant.delete_cls else n + 1, VIT_DIM)
    assert rel_err(ours, ref) < RTOL


@torch.no_grad()
def test_gaussian_matrix_comes_from_the_checkpoint(upstream: Upstream) -> None:
    g = upstream.model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
    assert torch.equal(g, upstream.sd["coordinate_pe_layer.positional_encoding_gaussian_matrix"])


@torch.no_grad()
def test_soft_tokens_match(upstream: Upstream, inputs) -> None:
    image, boxes = inputs
    soft, atts, embeds = upstream.model.encode_img_with_bbox(image, boxes)
    ref_soft, ref_embeds = ref_soft_tokens(upstream.vit, upstream.sd, image, boxes, upstream.variant)
    assert soft.shape == (6, NUM_QUERY, upstream.llm.config.hidden_size)
    assert atts.shape == (6, NUM_QUERY) and bool((atts == 1).all())
    assert rel_err(soft, ref_soft) < RTOL
    assert rel_err(embeds, ref_embeds) < RTOL
    # the cached image tokens give the same soft tokens (the ViT is skipped)
    again, _, _ = upstream.model.encode_img_with_bbox(image, boxes, image_embeds=embeds)
    assert rel_err(again, ref_soft) < RTOL


@torch.no_grad()
def test_training_loss_matches(upstream: Upstream, inputs) -> None:
    image, boxes = inputs
    captions = ["A red circle.", "Yes", "Two blue squares and a small green triangle on the left",
                "big", "The yellow star is at the top right", "no"]
    model = upstream.model
    model.eval()  # no dropout, so the numbers are comparable
    ours = model({"image": image, "bbox": boxes, "text_input": captions})["loss"]
    ref_soft, _ = ref_soft_tokens(upstream.vit, upstream.sd, image, boxes, upstream.variant)
    ref = ref_caption_loss(upstream.llm, upstream.tok, ref_soft, captions)
    # the long caption really is cut at max_txt_len tokens
    assert len(upstream.tok(captions[2] + "###", add_special_tokens=False).input_ids) > MAX_TXT_LEN
    assert abs(float(ours) - float(ref)) / abs(float(ref)) < RTOL


def ref_reply(tok, tokens: list[int]) -> str:
    return tok.decode(tokens, skip_special_tokens=True).split("###")[0].split("Assistant:")[-1].strip()


def test_prompt_text_matches() -> None:
    from click4caption.prompts import vicuna_v0

    conv = vicuna_v0()
    conv.append_message(conv.roles[0], "image[IMG] What is it?")
    conv.append_message(conv.roles[1], None)
    assert conv.get_prompt() == ref_prompt([("Human", "image[IMG] What is it?"), ("Assistant", None)])
    assert conv.get_prompt() == "### Human: image[IMG] What is it?\n### Assistant:"
    conv.messages[-1][1] = "A red circle."
    conv.append_message(conv.roles[0], "image 1[IMG] image 2[IMG] Write a story that combines image 1 and image 2.")
    conv.append_message(conv.roles[1], None)
    assert conv.get_prompt() == (
        "### Human: image[IMG] What is it?\n### Assistant: A red circle.\n###"
        " Human: image 1[IMG] image 2[IMG] Write a story that combines image 1 and image 2.\n### Assistant:")


@torch.no_grad()
def test_greedy_tokens_match_for_every_box(upstream: Upstream, inputs) -> None:
    """Describe-style single questions, one per box: the same greedy tokens and reply."""
    from click4caption.chat import Chat, GenerationSettings
    from click4caption.prompts import vicuna_v0

    image, boxes = inputs
    tok = upstream.tok
    chat = Chat(upstream.model, vis_processor=None, device="cpu")
    question = "image[IMG] Tell me what it is and write a description for it."
    max_new = 10
    ref_runs = []
    for b in range(boxes.shape[0]):
        for r in range(boxes.shape[1]):
            conv = vicuna_v0()
            chat.ask(question, conv)
            reply, tokens = chat.answer(conv, [chat.encode_boxes(image[b], boxes[b, r:r + 1])],
                                        GenerationSettings(max_new_tokens=max_new))
            soft, _ = ref_soft_tokens(upstream.vit, upstream.sd, image[b:b + 1], boxes[b:b + 1, r:r + 1],
                                      upstream.variant)
            ref = ref_greedy(upstream.llm, tok, ref_prompt([("Human", question), ("Assistant", None)]), [soft],
                             max_new)
            assert tokens.tolist() == ref, f"box {b},{r}"
            assert reply == ref_reply(tok, ref)
            assert conv.messages[-1] == ["Assistant", reply]
            ref_runs.append(ref)
    # the check is sensitive: the box changes the answer, and both ends of decoding occur
    assert len({tuple(r) for r in ref_runs}) > 1
    assert any("###" in tok.decode(r, skip_special_tokens=True) for r in ref_runs), "no run stopped at ###"
    assert any(len(r) == max_new for r in ref_runs), "every run stopped early"


@torch.no_grad()
def test_two_turn_conversation_matches(upstream: Upstream, inputs) -> None:
    from click4caption.chat import Chat, GenerationSettings
    from click4caption.prompts import vicuna_v0

    image, boxes = inputs
    model, tok = upstream.model, upstream.tok
    chat = Chat(model, vis_processor=None, device="cpu")
    conv = vicuna_v0()
    img_list = [chat.encode_boxes(image[0], boxes[0, :1])]
    q1 = "image[IMG] What is it?"
    chat.ask(q1, conv)
    reply1, tokens1 = chat.answer(conv, img_list, GenerationSettings(max_new_tokens=6))

    ref_soft, _ = ref_soft_tokens(upstream.vit, upstream.sd, image[:1], boxes[:1, :1], upstream.variant)
    prompt1 = ref_prompt([("Human", q1), ("Assistant", None)])
    ref_tokens1 = ref_greedy(upstream.llm, tok, prompt1, [ref_soft], 6)
    assert tokens1.tolist() == ref_tokens1
    assert reply1 == ref_reply(tok, ref_tokens1)

    # a second turn with a second region: the whole history goes in, replies included
    img_list.append(chat.encode_boxes(image[1], boxes[1, 2:3]))
    q2 = "image 2[IMG] Is it red?"
    chat.ask(q2, conv)
    _, tokens2 = chat.answer(conv, img_list, GenerationSettings(max_new_tokens=5))
    turns = [("Human", q1), ("Assistant", reply1), ("Human", q2), ("Assistant", None)]
    assert conv.messages[:3] == [list(t) for t in turns[:3]]
    ref_soft2, _ = ref_soft_tokens(upstream.vit, upstream.sd, image[1:], boxes[1:, 2:3], upstream.variant)
    ref_tokens2 = ref_greedy(upstream.llm, tok, ref_prompt(turns), [ref_soft, ref_soft2], 5)
    assert tokens2.tolist() == ref_tokens2
