"""Each model part alone, at tiny sizes (and the full sizes on the meta device): shapes,
the box-encoding math against numbers worked out by hand, the ViT cache of ``Chat``, stop
sequences, the context cap, and the input handling (boxes, images, processors)."""
from __future__ import annotations

import logging
import math
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from click4caption.boxes import normalize_box, to_model_pixels
from click4caption.config import QFormerSize
from click4caption.chat import Chat, GenerationSettings, StopOnText
from click4caption.prompts import extract_reply, vicuna_v0
from click4caption.errors import ConfigError, InputError
from click4caption.images import MAX_IMAGE_PIXELS, load_image, to_rgb
from click4caption.models.prompt_encoder import PositionEmbeddingRandom, PromptEncoder
from click4caption.models.qformer import build_qformer, init_query_tokens
from click4caption.config import ViTSize
from click4caption.models.vision import EVA_CLIP_G, VisionEncoder
from click4caption.processors import CLIP_MEAN, CLIP_STD, Blip2ImageEvalProcessor, BlipCaptionProcessor

R2 = math.sqrt(0.5)


# --------------------------------------------------------------------------- vision encoder
def test_vision_encoder_shapes_and_blocks() -> None:
    vit = VisionEncoder(ViTSize(32, 3, 2, 8, 48), image_size=32, feature_blocks=[0, 2]).eval()
    out = vit(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 1 + 16, 32)
    assert vit.grid_size == (4, 4) and vit.feature_blocks == [0, 2]
    assert VisionEncoder(ViTSize(32, 3, 2, 8, 48), 32).feature_blocks == [2]  # default: the last block
    with pytest.raises(ConfigError, match="out of range"):
        VisionEncoder(ViTSize(32, 3, 2, 8, 48), 32, feature_blocks=[3])


def test_eva_vit_g_variant_at_full_size() -> None:
    assert EVA_CLIP_G == ViTSize(embed_dim=1408, depth=39, num_heads=16, patch_size=14, mlp_dim=6144)
    with torch.device("meta"):
        vit = VisionEncoder(EVA_CLIP_G, 224, [9, 19, 29, 38])
    assert len(vit.blocks) == 39 and vit.grid_size == (16, 16)
    blk = vit.blocks[0]
    assert blk.mlp.fc1.out_features == 6144 and blk.attn.num_heads == 16
    assert blk.norm1.eps == 1e-6 and blk.norm2.eps == 1e-6
    assert isinstance(vit.norm, torch.nn.Identity)  # no final norm in BLIP-2's ViT-g
    names = {k for k, _ in vit.named_parameters()}
    assert {"blocks.0.attn.q_bias", "blocks.0.attn.v_bias", "blocks.0.attn.qkv.weight"} <= names
    assert "blocks.0.attn.k_bias" not in names


def test_qformer_layers_and_norms_at_full_size() -> None:
    with torch.device("meta"):
        qf = build_qformer(QFormerSize(), vision_dim=1408)
    layers = qf.encoder.layer
    assert len(layers) == 12
    assert [i for i, layer in enumerate(layers) if layer.has_cross_attention] == [0, 2, 4, 6, 8, 10]
    assert layers[0].crossattention.attention.key.in_features == 1408
    assert qf.layernorm.eps == 1e-12 and layers[5].output_query.LayerNorm.eps == 1e-12
    assert layers[3].intermediate_query.dense.out_features == 3072
    q = init_query_tokens(32, 768)
    assert q.shape == (1, 32, 768) and 0.015 < float(q.detach().std()) < 0.025


def test_tiny_model_parts(tiny_model) -> None:
    m = tiny_model
    assert m.ln_vision.eps == 1e-5  # LAVIS LayerNorm default
    image = torch.randn(2, 3, 32, 32)
    embeds = m.encode_image(image)
    assert embeds.shape == (2, 16, 32)  # CLS dropped, 4x4 grid, ViT width 32
    boxes = torch.tensor([[[[0.0, 0.0], [32.0, 32.0]], [[4.0, 4.0], [12.0, 20.0]]],
                          [[[1.0, 2.0], [3.0, 4.0]], [[8.0, 8.0], [30.0, 31.0]]]])
    with torch.no_grad():
        soft, atts, cached = m.encode_img_with_bbox(image, boxes)
        assert soft.shape == (4, m.num_query_token, m.llama_model.config.hidden_size)
        assert atts.shape == (4, m.num_query_token)
        # rows are image-major: image 0's boxes first
        for b in range(2):
            for r in range(2):
                one, _, _ = m.encode_img_with_bbox(image[b:b + 1], boxes[b:b + 1, r:r + 1])
                assert torch.allclose(soft[2 * b + r], one[0], atol=1e-5)
        with pytest.raises(InputError, match="images but boxes"):
            m.encode_img_with_bbox(image, boxes[:1], image_embeds=cached)


# --------------------------------------------------------------------------- box encoding by hand
def hand_encoder(image_size: int = 224) -> PromptEncoder:
    enc = PromptEncoder(embed_dim=4, vision_dim=4, image_size=image_size)
    with torch.no_grad():
        enc.pe_layer.positional_encoding_gaussian_matrix.copy_(torch.tensor([[0.25, 0.5], [1.0, -0.125]]))
        enc.corner_type_emb[0].weight.copy_(torch.tensor([[10.0, 0.0, 0.0, 0.0]]))
        enc.corner_type_emb[1].weight.copy_(torch.tensor([[0.0, 0.0, 0.0, 20.0]]))
        enc.image_pe_proj.weight.copy_(torch.eye(4))
        enc.image_pe_proj.bias.zero_()
    return enc


def test_box_encoding_by_hand() -> None:
    """G = [[0.25, 0.5], [1, -0.125]], S = 224. Corner (112, 56): (x/S, y/S) = (0.5, 0.25),
    2c - 1 = (0, -0.5), @ G = (-0.5, 0.0625), * 2 pi = (-pi, pi/8): sin = (0, 0.38268),
    cos = (-1, 0.92388). Corner (224, 224): 2c - 1 = (1, 1), @ G = (1.25, 0.375), * 2 pi =
    (2.5 pi, 0.75 pi): sin = (1, 0.70711), cos = (0, -0.70711). Then + the corner-type
    embeddings (10, 0, 0, 0) and (0, 0, 0, 20)."""
    enc = hand_encoder()
    tokens = enc.encode_boxes(torch.tensor([[[112.0, 56.0], [224.0, 224.0]]]))
    expected = torch.tensor([[[10.0, 0.382683, -1.0, 0.923880], [1.0, R2, 0.0, 20.0 - R2]]])
    assert tokens.shape == (1, 2, 4)
    assert torch.allclose(tokens, expected, atol=1e-5)


def test_box_corners_are_clipped_to_the_image() -> None:
    """(0, 0): 2c - 1 = (-1, -1), @ G = (-1.25, -0.375): sin = (-1, -0.70711), cos = (0, -0.70711)."""
    enc = hand_encoder()
    outside = enc.encode_boxes(torch.tensor([[[-50.0, -3.0], [500.0, 300.0]]]))
    expected = torch.tensor([[[10.0 - 1.0, -R2, 0.0, -R2], [1.0, R2, 0.0, 20.0 - R2]]])
    assert torch.allclose(outside, expected, atol=1e-5)
    inside = enc.encode_boxes(torch.tensor([[[0.0, 0.0], [224.0, 224.0]]]))
    assert torch.equal(outside, inside)


def test_image_positional_embedding_by_hand() -> None:
    """2x2 grid, row-major, points (x, y): cell 1 is (0.75, 0.25): 2c - 1 = (0.5, -0.5),
    @ G = (-0.375, 0.3125), * 2 pi = (-0.75 pi, 0.625 pi): sin = (-0.70711, 0.92388),
    cos = (-0.70711, -0.38268). A kept CLS token gets the mean of the grid."""
    enc = hand_encoder()
    pe = enc.image_pe((2, 2), with_cls=False)
    assert pe.shape == (4, 4)
    assert torch.allclose(pe[1], torch.tensor([-R2, 0.923880, -R2, -0.382683]), atol=1e-5)
    # cell 0 is (0.25, 0.25): 2c - 1 = (-0.5, -0.5), @ G = (-0.625, -0.1875)
    assert torch.allclose(pe[0], torch.tensor([math.sin(-1.25 * math.pi), math.sin(-0.375 * math.pi),
                                               math.cos(-1.25 * math.pi), math.cos(-0.375 * math.pi)]), atol=1e-5)
    with_cls = enc.image_pe((2, 2), with_cls=True)
    assert with_cls.shape == (5, 4)
    assert torch.allclose(with_cls[0], pe.mean(0), atol=1e-6) and torch.equal(with_cls[1:], pe)


def test_gaussian_matrix_is_a_stored_buffer_and_loaded_not_redrawn(tiny_files) -> None:
    from click4caption.config import load_config
    from click4caption.models.builder import build_model

    pe = PositionEmbeddingRandom(8)
    assert "positional_encoding_gaussian_matrix" in pe.state_dict()
    assert not any(True for _ in pe.parameters())  # a buffer, never trained
    stored = torch.load(tiny_files["ckpt"], weights_only=True)["model"][
        "coordinate_pe_layer.positional_encoding_gaussian_matrix"]
    cfg = load_config(tiny_files["yaml"]).model
    for seed in (1, 2):
        torch.manual_seed(seed)  # a fresh draw at init differs with the seed
        assert not torch.equal(PositionEmbeddingRandom(stored.shape[1]).positional_encoding_gaussian_matrix, stored)
        model = build_model(cfg)
        assert torch.equal(model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix, stored)


def test_random_near_full_boxes(tiny_model) -> None:
    """Whole-image captions get a box with corners within 7 px (half a ViT-g patch) of the border."""
    s = tiny_model.img_size
    boxes = tiny_model.random_near_full_boxes(4000, generator=torch.Generator().manual_seed(0))
    assert boxes.shape == (4000, 1, 2, 2)
    tl, br = boxes[:, 0, 0], boxes[:, 0, 1]
    assert float(tl.min()) >= 0 and float(tl.max()) < 7
    assert float(br.max()) <= s and float(br.min()) > s - 7
    assert abs(float(tl.mean()) - 3.5) < 0.2 and abs(float((s - br).mean()) - 3.5) < 0.2
    assert float(tl.min()) < 0.1 and float(tl.max()) > 6.9  # the whole range is used
    assert not torch.equal(tl[:, 0], tl[:, 1])  # x and y drawn separately


# --------------------------------------------------------------------------- training forward
def test_caption_loss_trains_only_the_trainable_parts(tiny_files) -> None:
    from click4caption.config import load_config
    from click4caption.models.builder import build_model
    from click4caption.training.freezing import frozen_parts

    cfg = load_config(tiny_files["yaml"]).model
    model = build_model(cfg, for_training=True)
    assert all(p.requires_grad for p in model.parameters())  # the builder composes; training freezes
    model.freeze(frozen_parts(cfg))  # as the trainer does (freeze_vit, LLM frozen; ln_vision trained with
    model.train()                    # multi-block features, as upstream)
    assert model.training and not model.visual_encoder.training and not model.llama_model.training
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"ln_vision", "qformer", "query_tokens", "prompt_encoder", "llama_proj"}
    image = torch.randn(2, 3, 32, 32)
    out = model({"image": image, "text_input": ["A red circle.", "Two squares."]})  # random near-full boxes
    assert out["loss"].ndim == 0 and math.isfinite(float(out["loss"].detach()))
    out["loss"].backward()
    assert model.query_tokens.grad is not None and float(model.query_tokens.grad.abs().sum()) > 0
    assert model.prompt_encoder.corner_type_emb[0].weight.grad is not None
    assert model.prompt_encoder.image_pe_proj.weight.grad is not None
    assert all(p.grad is None for p in model.visual_encoder.parameters())
    assert all(p.grad is None for p in model.llama_model.parameters())
    with pytest.raises(InputError, match="captions for"):
        model({"image": image, "bbox": torch.zeros(2, 2, 2, 2), "text_input": ["only one"]})


# --------------------------------------------------------------------------- Chat: ViT cache
def test_chat_vit_cache_hits_by_content_and_is_bounded(tiny_model, monkeypatch) -> None:
    calls: list[int] = []
    real = tiny_model.encode_image

    def counting(image):
        calls.append(1)
        return real(image)

    monkeypatch.setattr(tiny_model, "encode_image", counting)
    chat = Chat(tiny_model, Blip2ImageEvalProcessor(32), cache_size=2)
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 255, (40, 50, 3), dtype=np.uint8) for _ in range(3)]
    a, b, c = (Image.fromarray(x) for x in arrays)
    box = [[2.0, 2.0, 20.0, 30.0]]

    soft_a = chat.encode_boxes(a, box)
    assert (chat.cache_misses, chat.cache_hits, len(calls)) == (1, 0, 1)
    again = chat.encode_boxes(Image.fromarray(arrays[0].copy()), box)  # same pixels, new object: a hit
    assert (chat.cache_misses, chat.cache_hits, len(calls)) == (1, 1, 1)
    assert torch.equal(again, soft_a)
    chat.encode_boxes(a, [[0.0, 0.0, 32.0, 32.0]])  # another box on the same image: still no ViT pass
    assert len(calls) == 1
    chat.encode_boxes(b, box)  # a different image: a miss
    assert (chat.cache_misses, len(calls)) == (2, 2)
    chat.encode_boxes(a, box)  # a is the most recently used now
    chat.encode_boxes(c, box)  # cache size 2: b, the least recently used, goes
    assert (chat.cache_misses, len(calls)) == (3, 3) and len(chat._cache) == 2
    chat.encode_boxes(a, box)
    assert len(calls) == 3  # a stayed
    chat.encode_boxes(b, box)
    assert len(calls) == 4  # b was evicted
    # a cached result is the same as a fresh one
    fresh = Chat(tiny_model, Blip2ImageEvalProcessor(32), cache_size=0).encode_boxes(a, box)
    assert torch.allclose(fresh, soft_a, atol=1e-6)


# --------------------------------------------------------------------------- stop sequences, replies
class FakeTokenizer:
    """id -> text, so that '###' can come as one token or split as '##' + '#'."""

    pieces = {0: "", 1: "Hello", 2: " world", 3: "###", 4: "##", 5: "#", 6: "\n", 7: " ###"}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(self.pieces[int(i)] for i in ids)


@pytest.mark.parametrize("ids,stop", [
    ([1, 2], False),
    ([1, 2, 3], True),       # '###' as one token
    ([1, 6, 4], False),      # '##' alone is not the stop sequence
    ([1, 6, 4, 5], True),    # '###' as two tokens
    ([5, 1, 5, 1, 5], False),
    ([1, 7], True),          # ' ###'
])
def test_stop_on_text(ids: list[int], stop: bool) -> None:
    crit = StopOnText(FakeTokenizer(), prompt_len=0, stop="###")
    assert crit(torch.tensor([ids]), None).tolist() == [stop]


def test_stop_on_text_per_row_and_after_the_prompt() -> None:
    crit = StopOnText(FakeTokenizer(), prompt_len=2, stop="###")
    rows = torch.tensor([[3, 1, 2, 2], [1, 1, 4, 5], [1, 1, 1, 3]])
    # row 0's '###' is in the prompt (first 2 ids), so it does not count
    assert crit(rows, None).tolist() == [False, True, True]


def test_stop_on_text_with_the_tiny_tokenizer(tiny_model) -> None:
    tok = tiny_model.llama_tokenizer
    crit = StopOnText(tok, prompt_len=0, stop="###")
    for text in ("A red circle.###", "A red circle.\n###", "A red circle ###"):
        ids = torch.tensor([tok.encode(text)])
        assert crit(ids, None).tolist() == [True], text
    ids = torch.tensor([tok.encode("A red circle.")])
    assert crit(ids, None).tolist() == [False]


@pytest.mark.parametrize("text,reply", [
    ("A red circle.###", "A red circle."),
    ("A red circle.\n### Human: more", "A red circle."),
    ("Assistant: A red circle.###", "A red circle."),
    (" Assistant:  Two squares. \n### Human: more", "Two squares."),
    ("### Human: the stop sequence comes first", ""),  # text after the first '###' is never a reply
    ("no stop at all", "no stop at all"),
    ("###", ""),
])
def test_extract_reply(text: str, reply: str) -> None:
    assert extract_reply(text) == reply


# --------------------------------------------------------------------------- Chat: context
class GenerateSpy:
    """Stands in for ``llama_model.generate``: records the kwargs, returns fixed tokens."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens
        self.kwargs: dict = {}

    def __call__(self, **kwargs):
        self.kwargs = kwargs
        return torch.tensor([self.tokens])


def chat_with_spy(model, monkeypatch, reply: str) -> tuple[Chat, GenerateSpy, torch.Tensor]:
    """A Chat whose LLM "generates" ``reply``, and the soft tokens of one whole-image region."""
    spy = GenerateSpy(model.llama_tokenizer.encode(reply))
    monkeypatch.setattr(model.llama_model, "generate", spy)
    chat = Chat(model, Blip2ImageEvalProcessor(32))
    return chat, spy, chat.encode_boxes(torch.zeros(3, 32, 32), [[0.0, 0.0, 32.0, 32.0]])


def asked(chat: Chat, question: str):
    conv = vicuna_v0()
    chat.ask(question, conv)
    return conv


def test_context_is_capped_with_a_warning(tiny_model, monkeypatch, caplog) -> None:
    chat, spy, soft = chat_with_spy(tiny_model, monkeypatch, "A red circle.###")
    open_turn = asked(chat, "image[IMG] What is it?")
    open_turn.append_message(open_turn.roles[1], None)
    full = chat.get_context_emb(open_turn, [soft])

    with caplog.at_level(logging.WARNING, logger="click4caption"):
        reply, _ = chat.answer(asked(chat, "image[IMG] What is it?"), [soft],
                               GenerationSettings(max_new_tokens=5, max_length=full.shape[1] + 5))
    assert reply == "A red circle."
    assert spy.kwargs["inputs_embeds"].shape[1] == full.shape[1]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

    with caplog.at_level(logging.WARNING, logger="click4caption"):
        chat.answer(asked(chat, "image[IMG] What is it?"), [soft], GenerationSettings(max_new_tokens=5, max_length=12))
    kept = spy.kwargs["inputs_embeds"]
    assert kept.shape[1] == 12 - 5  # the oldest tokens are dropped
    assert torch.equal(kept, full[:, -7:])
    assert spy.kwargs["attention_mask"].shape == (1, 7)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "dropped" in warnings[0] and "12" in warnings[0]


def test_generation_settings_reach_generate(tiny_model, monkeypatch) -> None:
    chat, spy, soft = chat_with_spy(tiny_model, monkeypatch, "Yes.###")
    tok = tiny_model.llama_tokenizer
    chat.answer(asked(chat, "image[IMG] Is it red?"), [soft], GenerationSettings(num_beams=2, max_new_tokens=7))
    assert spy.kwargs["do_sample"] is False and spy.kwargs["num_beams"] == 2 and spy.kwargs["max_new_tokens"] == 7
    assert spy.kwargs["pad_token_id"] == tok.pad_token_id and spy.kwargs["eos_token_id"] == tok.eos_token_id
    chat.answer(asked(chat, "image[IMG] Is it red?"), [soft], GenerationSettings(temperature=0.7))  # top-p 0.9
    assert spy.kwargs["do_sample"] is True and spy.kwargs["top_p"] == 0.9 and spy.kwargs["temperature"] == 0.7


def test_placeholder_count_must_match_the_regions(tiny_model, monkeypatch) -> None:
    chat, spy, soft = chat_with_spy(tiny_model, monkeypatch, "Yes.###")
    conv = asked(chat, "image 1[IMG] image 2[IMG] Compare them.")
    with pytest.raises(InputError, match=r"2 \[IMG\] placeholder\(s\) but 1 region"):
        chat.answer(conv, [soft])
    assert conv.messages == [["Human", "image 1[IMG] image 2[IMG] Compare them."]]  # no dangling turn
    assert spy.kwargs == {}  # nothing was generated


# --------------------------------------------------------------------------- boxes
def test_normalize_box() -> None:
    assert normalize_box([10, 20, 30, 40], 100, 50) == ((10, 20, 30, 40), [])
    assert normalize_box([-1, -1, -1, -1], 100, 50) == ((0, 0, 100, 50), [])  # upstream: -1 = border
    box, warns = normalize_box([30, 40, 10, 20], 100, 50)
    assert box == (10, 20, 30, 40) and len(warns) == 1 and "top-left" in warns[0]
    box, warns = normalize_box([-20, 10, 150, 60], 100, 50)
    assert box == (0, 10, 100, 50) and len(warns) == 1 and "clipped" in warns[0]
    box, warns = normalize_box([150, 60, -20, 10], 100, 50)  # both at once
    assert box == (0, 10, 100, 50) and len(warns) == 2


@pytest.mark.parametrize("bad,match", [
    ([10, 10, 10, 30], "empty box"),
    ([200, 10, 300, 30], "empty box"),  # all outside
    ([1, 2, 3], "four numbers"),
    (["a", 2, 3, 4], "four numbers"),
    ([0, 0, float("nan"), 5], "finite"),
    ("0 0 5 5", "four numbers"),
])
def test_normalize_box_errors(bad, match: str) -> None:
    with pytest.raises(InputError, match=match):
        normalize_box(bad, 100, 50)


def test_to_model_pixels() -> None:
    """Aspect ratio is not kept: x scales by S/W, y by S/H."""
    got = to_model_pixels((10, 20, 100, 50), 100, 50, 224)
    assert np.allclose(got, [[22.4, 89.6], [224.0, 224.0]], rtol=0, atol=1e-9)


# --------------------------------------------------------------------------- images
def test_to_rgb_modes() -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red -> white background
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    out = to_rgb(rgba)
    assert out.mode == "RGB" and out.getpixel((1, 1)) == (255, 255, 255) and out.getpixel((0, 0)) == (255, 0, 0)
    assert to_rgb(Image.new("LA", (2, 2), (100, 255))).getpixel((0, 0)) == (100, 100, 100)
    assert to_rgb(Image.new("L", (2, 2), 7)).getpixel((1, 1)) == (7, 7, 7)
    assert to_rgb(Image.new("1", (2, 2), 1)).getpixel((0, 0)) == (255, 255, 255)
    sixteen = Image.fromarray(np.array([[0, 257 * 100], [65535, 257 * 200]], dtype=np.uint16))
    assert sixteen.mode.startswith("I;16")
    out = to_rgb(sixteen)
    assert [out.getpixel(p)[0] for p in ((0, 0), (1, 0), (0, 1), (1, 1))] == [0, 100, 255, 200]
    pal = Image.new("P", (2, 2), 1)
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    pal.info["transparency"] = 0
    assert to_rgb(pal).getpixel((0, 0)) == (0, 0, 255)


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width x height`` (no pixel data): cheap to make."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)))
    return path


def test_load_image_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="image not found"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(InputError, match="folder"):
        load_image(tmp_path)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(InputError, match="not an image"):
        load_image(tmp_path / "notes.txt")
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good)
    data = good.read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cannot read image"):
        load_image(tmp_path / "cut.png")
    side = int(math.isqrt(MAX_IMAGE_PIXELS)) + 10
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's own decompression-bomb warning must not leak out
        with pytest.raises(InputError, match="too large"):
            load_image(png_header_only(tmp_path / "huge.png", side, side))
    img = load_image(good)
    assert img.mode == "RGB" and img.size == (64, 64)


# --------------------------------------------------------------------------- processors
def test_eval_processor_resizes_and_normalises() -> None:
    proc = Blip2ImageEvalProcessor(32)
    white = proc(Image.new("RGB", (90, 20), (255, 255, 255)))
    assert white.shape == (3, 32, 32)  # aspect ratio not kept
    for c in range(3):
        assert torch.allclose(white[c], torch.full((32, 32), (1 - CLIP_MEAN[c]) / CLIP_STD[c]), atol=1e-5)
    # against PIL's own bicubic resize
    arr = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    ref = np.asarray(img.resize((32, 32), Image.BICUBIC), dtype=np.float32) / 255.0
    ref = (torch.from_numpy(ref).permute(2, 0, 1) - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(
        CLIP_STD)[:, None, None]
    assert torch.allclose(proc(img), ref, atol=1e-4)


def test_caption_processor() -> None:
    proc = BlipCaptionProcessor(max_words=4)
    assert proc('A "Red" circle!  (left)') == "a red circle left"
    assert proc("one two three four five six") == "one two three four"
    assert BlipCaptionProcessor()("Hello: world; ~#*") == "hello world"


def test_length_buckets() -> None:
    from click4caption.models.click4caption import length_buckets

    lengths = [40, 370, 120, 60, 200, 90, 300, 150]
    buckets = length_buckets(lengths)
    assert sorted(i for b in buckets for i in b) == list(range(8)) and 1 < len(buckets) <= 3
    assert all(max(lengths[i] for i in a) <= min(lengths[i] for i in b) for a, b in zip(buckets, buckets[1:]))
    assert length_buckets([50] * 8) == [list(range(8))] and length_buckets([7]) == [[0]]


def test_conversation_loss_is_the_mean_over_all_reply_tokens(tiny_model, monkeypatch) -> None:
    """Rows go through the LLM in length buckets; the loss is what one padded call gives."""
    import click4caption.models.click4caption as c4c

    model = tiny_model
    s = model.img_size
    turns = [{"from": "human", "value": "image[IMG] What color is it?"}, {"from": "gpt", "value": "Red."}]
    long = turns + [{"from": "human", "value": "image 2[IMG] Tell me what it is and write a description for it."},
                    {"from": "gpt", "value": "A large blue circle."}, {"from": "human", "value": "What shape is image 1?"},
                    {"from": "gpt", "value": "Square."}]
    box = torch.tensor([[[2.0, 2.0], [20.0, 20.0]], [[4.0, 8.0], [s, s]]])
    samples = {"image": torch.rand(2, 3, s, s), "image_index": [0, 1, 0, 1], "bbox": torch.stack([box] * 4),
               "num_boxes": [1, 2, 1, 2], "conversations": [turns, long, turns, long]}
    used: list[list[list[int]]] = []
    real = c4c.length_buckets

    def spy(lengths, **kwargs):
        used.append(real(lengths, call_cost=0))
        return used[-1]

    with torch.no_grad():
        monkeypatch.setattr(c4c, "length_buckets", spy)
        bucketed = model(samples)["loss"]
        monkeypatch.setattr(c4c, "length_buckets", lambda lengths, **_: [list(range(len(lengths)))])
        single = model(samples)["loss"]
    assert used == [[[0, 2], [1, 3]]]  # the short rows apart from the long ones
    assert torch.allclose(bucketed, single, atol=1e-5)


def test_box_attention_targets_cells_and_free_whole_image(tmp_path: Path) -> None:
    """Cells of the box per query; with box_attention_whole_image 'free', a (near-)whole
    image box lets every query look anywhere (the 4 x 4 patch grid of the tiny model)."""
    from tests.tiny import tiny_model_config

    from click4caption.models.builder import build_model

    cells = build_model(tiny_model_config(tmp_path, box_attention_loss_weight=1.0, box_attention_grid=2),
                        for_training=True)
    free = build_model(tiny_model_config(tmp_path, box_attention_loss_weight=1.0, box_attention_grid=2,
                                         box_attention_whole_image="free"), for_training=True)
    boxes = torch.tensor([[[0.0, 0.0], [16.0, 16.0]], [[0.0, 0.0], [32.0, 32.0]], [[3.0, 5.0], [30.0, 28.0]]])
    a, b = cells.box_attention.targets(boxes, 16), free.box_attention.targets(boxes, 16)
    assert a.shape == (3, 4, 16)
    # a quarter box: each query gets one patch of it, in row-major order
    assert [int(a[0, q].reshape(4, 4).nonzero()[0, 0] * 4 + a[0, q].reshape(4, 4).nonzero()[0, 1]) for q in range(4)] \
        == [0, 1, 4, 5]
    assert torch.equal(a[0], b[0]) and a[1].sum(-1).tolist() == [4.0] * 4  # cells: a quarter of the image each
    assert free.box_attention.is_near_full(boxes).tolist() == [False, True, True]
    assert torch.all(b[1] == 1) and torch.all(b[2] == 1)  # whole image: anywhere
    with pytest.raises(ConfigError, match="box_attention_whole_image"):
        build_model(tiny_model_config(tmp_path, box_attention_whole_image="anything"), for_training=True)


def test_box_attention_objects_one_query_per_object(tmp_path: Path) -> None:
    """box_attention_whole_image 'objects' on the tiny model (32 px, 4 x 4 patches, 4 queries
    on a 2 x 2 grid): the query whose cell holds an object's centre targets that object's
    patches, the others the background of their cell (or of the image when their cell has
    none); rows whose objects are unknown look anywhere, other boxes keep their cells; and
    the batch's ``objects`` reach the loss in both training modes."""
    from tests.tiny import tiny_model_config

    from click4caption.models.builder import build_model

    model = build_model(tiny_model_config(tmp_path, box_attention_loss_weight=1.0, box_attention_grid=2,
                                          box_attention_whole_image="objects"), for_training=True)
    aid = model.box_attention
    a = torch.tensor([[2.0, 2.0], [10.0, 10.0]])  # centre in cell 0; covers patch 0
    b = torch.tensor([[18.0, 2.0], [30.0, 30.0]])  # centre (24, 16): cell 3; covers columns 2-3
    t = aid.object_targets(torch.stack([a, b])[None], torch.tensor([2]), 16)[0].reshape(4, 4, 4)
    padded = aid.object_targets(torch.stack([a, b, torch.zeros(2, 2), torch.zeros(2, 2)])[None], torch.tensor([2]), 16)
    assert torch.equal(padded[0].reshape(4, 4, 4), t)  # padding boxes are no objects
    owners = aid.object_owners(torch.stack([a, b, torch.zeros(2, 2)])[None], torch.tensor([2]))[0]  # QxM
    assert owners.tolist() == [[1, 0, 0], [0, 0, 0], [0, 0, 0], [0, 1, 0]]
    # one object per query: c's centre (10, 14) lies in a's cell too, so c goes to the free
    # query whose cell centre is nearest ((8, 24): 104 against (24, 8): 232); a fifth object
    # finds no free query among 4
    c = torch.tensor([[4.0, 8.0], [16.0, 20.0]])
    d = torch.tensor([[0.0, 20.0], [4.0, 24.0]])
    owners = aid.object_owners(torch.stack([a, c, b, d, a])[None], torch.tensor([5]))[0]
    assert owners.tolist() == [[1, 0, 0, 0, 0], [0, 0, 0, 1, 0], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0]]
    t_c = aid.object_targets(torch.stack([a, c])[None], torch.tensor([2]), 16)[0].reshape(4, 4, 4)
    assert torch.equal(t_c[2], aid.inside_box_mask(c[None], 16)[0].reshape(4, 4))
    in_b = torch.zeros(4, 4)
    in_b[:, 2:] = 1
    background = 1 - in_b
    background[0, 0] = 0
    assert t[0].nonzero().tolist() == [[0, 0]]
    assert torch.equal(t[3], in_b)
    assert torch.equal(t[1], background)  # its cell lies inside b: the image's background
    assert torch.equal(t[2], background * (torch.arange(4)[:, None] >= 2) * (torch.arange(4)[None] < 2))
    boxes = torch.tensor([[[0.0, 0.0], [32.0, 32.0]], [[1.0, 2.0], [31.0, 30.0]], [[0.0, 0.0], [16.0, 16.0]]])
    objects = (torch.stack([torch.stack([a, b]), torch.zeros(2, 2, 2), torch.stack([a, b])]), torch.tensor([2, 0, 2]))
    targets = aid.targets(boxes, 16, objects)
    assert torch.equal(targets[0].reshape(4, 4, 4), t) and torch.all(targets[1] == 1)
    assert torch.equal(targets[2], aid.targets(boxes, 16)[2])  # not a whole image: cells
    # the model hands a batch's objects to the aid: captions (per image) and conversations (per record)
    model.train()
    torch.manual_seed(0)
    image = torch.rand(2, 3, 32, 32)
    full = torch.tensor([[[[0.0, 0.0], [32.0, 32.0]]]] * 2)
    caption = {"image": image, "bbox": full, "text_input": ["two shapes", "two shapes"]}
    with_objects = {**caption, "objects": torch.stack([torch.stack([a, b])] * 2), "num_objects": [2, 2]}
    conv = [{"from": "human", "value": "image[IMG] What is it?"}, {"from": "gpt", "value": "Two shapes."}]
    records = {"image": image, "bbox": full, "num_boxes": [1, 1], "conversations": [conv, conv]}
    records_objects = {**records, "objects": with_objects["objects"], "num_objects": [2, 0]}
    free = model(caption)["box_attention_loss"]
    assert not torch.isclose(model(with_objects)["box_attention_loss"], free)
    by_hand = aid.loss  # the conversation path: record 0 gets objects, record 1 none
    seen = []
    aid.loss = lambda maps, bx, objs, attention=None: seen.append(objs) or by_hand(maps, bx, objs, attention)
    model(records_objects)
    aid.loss = by_hand
    assert seen[0][1].tolist() == [2, 0] and torch.equal(seen[0][0][0], with_objects["objects"][0])
    # the owner loss (box_attention_owner_weight): logged beside the other losses and added with its weight
    owner_model = build_model(tiny_model_config(tmp_path, box_attention_loss_weight=1.0, box_attention_grid=2,
                                                box_attention_whole_image="objects", box_attention_owner_weight=0.5,
                                                box_attention_owner_count_weight=0.25),
                              for_training=True)
    owner_model.train()
    out = owner_model(with_objects)
    assert float(out["loss"].detach()) == pytest.approx(
        float(out["lm_loss"]) + float(out["box_attention_loss"]) + 0.5 * float(out["owner_loss"])
        + 0.25 * float(out["owner_count_loss"]), rel=1e-5)
    assert "owner_loss" not in owner_model(caption)  # no objects: no owner loss
    # box_attention_owner_ramp reaches the aid: shared owners change the owner loss's targets
    ramp_model = build_model(tiny_model_config(tmp_path, box_attention_loss_weight=1.0, box_attention_grid=2,
                                               box_attention_whole_image="objects", box_attention_owner_weight=0.5,
                                               box_attention_owner_ramp=1.0), for_training=True)
    assert ramp_model.box_attention.owner_ramp == 1.0
    match_model = build_model(tiny_model_config(tmp_path, box_attention_loss_weight=1.0, box_attention_grid=2,
                                                box_attention_whole_image="objects", box_attention_owner_weight=0.5,
                                                box_attention_owner_match=1.0), for_training=True)
    assert match_model.box_attention.owner_match == 1.0
    match_model.train()  # the real Q-Former's maps (image tokens, corner rows) go through the matching
    assert torch.isfinite(match_model(with_objects)["owner_loss"])
