"""Token ids are the original's: every prompt the project builds, checked against
``sentencepiece`` itself.

Upstream (transformers 4.28's slow ``LlamaTokenizer``) encoded each text with
``SentencePieceProcessor.encode`` after splitting out special/added tokens, so a segment
that starts with a space begins with the lone piece ``"▁"``. The references here call
sentencepiece directly and write the expected template text out by hand; nothing is
shared with the project's tokenizer or prompt code.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import sentencepiece
import torch

from click4caption.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer

ODD_TEXTS = [
    "", " ", "  ", "two  spaces", " leading", "trailing ", "  both  ", "\n", "line\nbreak\n\n", "\n\nlead",
    "###", " ###", "\n###", "a###b", "#", "## #", "Ünïcödé café naïve", "東京タワー", "emoji 😀 🎉!", "tab\there",
    "image 1[IMG] image 2[IMG] x", "12345 x 67", "A large red circle.###",
]


@pytest.fixture(scope="module")
def sp_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny import write_tiny_llm

    return write_tiny_llm(tmp_path_factory.mktemp("sp") / "llm", sentencepiece=True)


@pytest.fixture(scope="module")
def sp(sp_folder: Path) -> sentencepiece.SentencePieceProcessor:
    return sentencepiece.SentencePieceProcessor(model_file=str(sp_folder / "tokenizer.model"))


@pytest.fixture(scope="module")
def pad_id(sp_folder: Path) -> int:
    return json.loads((sp_folder / "added_tokens.json").read_text())["[PAD]"]


@pytest.fixture(scope="module")
def sp_model(sp_folder: Path):
    """A tiny Click4Caption model whose LLM folder has the SentencePiece tokenizer."""
    from click4caption.config import from_dict
    from click4caption.models.builder import build_model
    from tests.tiny import tiny_model_section

    torch.manual_seed(0)
    model = build_model(from_dict({"model": tiny_model_section(sp_folder, max_txt_len=12)}).model,
                        for_training=True)
    model.eval()
    return model


class EmbeddingInputs:
    """Records the token ids every call of the LLM's input embedding receives."""

    def __init__(self, model) -> None:
        self.calls: list[list[list[int]]] = []
        self.handle = model.llama_model.get_input_embeddings().register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        self.calls.append(args[0].tolist())

    def rows(self) -> list[list[int]]:
        """Every recorded row (one per text segment, or per padded caption)."""
        return [row for call in self.calls for row in call]

    def close(self) -> None:
        self.handle.remove()


def test_the_folder_loads_as_sentencepiece(sp_folder: Path, sp, pad_id: int) -> None:
    tok = load_tokenizer(sp_folder)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (sp.bos_id(), sp.eos_id(), pad_id)
    assert len(tok) == sp.get_piece_size() + 1  # [PAD] added after the pieces, as in Vicuna (32000 + 1)


@pytest.mark.parametrize("text", ODD_TEXTS)
def test_encode_is_sentencepiece(sp_folder: Path, sp, text: str) -> None:
    tok = load_tokenizer(sp_folder)
    assert tok.encode(text) == sp.encode(text)
    assert tok.encode(text, add_bos=True) == [sp.bos_id()] + sp.encode(text)


def test_a_segment_after_a_placeholder_starts_with_the_lone_space_piece(sp_folder: Path, sp) -> None:
    """What the released weights were trained on (Vicuna id 29871 is this piece)."""
    ids = load_tokenizer(sp_folder).encode(" What is it?\n### Assistant:")
    assert [sp.id_to_piece(i) for i in ids[:2]] == ["▁", "▁What"]


def test_special_and_added_tokens_are_split_out_first(sp_folder: Path, sp, pad_id: int) -> None:
    tok = load_tokenizer(sp_folder)
    assert tok.encode("a red[PAD]circle") == sp.encode("a red") + [pad_id] + sp.encode("circle")
    assert tok.encode("end</s> more") == sp.encode("end") + [sp.eos_id()] + sp.encode(" more")
    assert tok.encode("<s>") == [sp.bos_id()]


def test_decode_is_sentencepiece(sp_folder: Path, sp, pad_id: int) -> None:
    """Random id runs, many through byte-fallback pieces (invalid UTF-8 included): SentencePiece
    replaces only the invalid bytes; special ids are skipped as upstream's decode did."""
    tok = load_tokenizer(sp_folder)
    rng = random.Random(0)
    byte_ids = [sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)]
    normal = [i for i in range(3, sp.get_piece_size()) if i not in byte_ids]
    special = [sp.bos_id(), sp.eos_id(), sp.unk_id(), pad_id]
    for _ in range(300):
        ids = [rng.choice(byte_ids if rng.random() < 0.5 else normal) for _ in range(rng.randint(1, 12))]
        assert tok.decode(ids) == sp.decode(ids)
        mixed = ids + [rng.choice(special)] + ids[:3]
        assert tok.decode(mixed) == sp.decode(ids + ids[:3])
    # the valid byte after a truncated UTF-8 sequence survives
    run = [sp.piece_to_id("<0xE2>"), sp.piece_to_id("<0x82>"), sp.piece_to_id("<0x41>")]
    assert tok.decode(run) == sp.decode(run) and tok.decode(run).endswith("A")
    for text in ODD_TEXTS:
        assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text)) == text
    # an id past the vocabulary (an LLM whose embedding is padded) has no text
    assert tok.decode([*sp.encode("a red"), sp.get_piece_size() + 50]) == "a red"
    # one id, as transformers' streamers pass it
    one = sp.encode("circle")[-1]
    assert tok.decode(one) == tok.decode([one]) == tok.decode(torch.tensor(one)) == sp.decode([one])


def test_a_tokenizer_json_folder_keeps_working(tiny_files: dict[str, Path]) -> None:
    tok = load_tokenizer(tiny_files["llm"])
    assert isinstance(tok, HFTokenizer)
    ids = tok.encode("A large red circle.###", add_bos=True)
    assert ids[0] == tok.bos_token_id and tok.decode(ids) == "A large red circle.###"
    assert tok.decode(ids[2]) == tok.decode([ids[2]]) == tok.decode(torch.tensor(ids[2])) != ""


# --------------------------------------------------------------------------- the project's prompts
def chat_segments(sp_model, question_turns: list[tuple[str, str | None]], regions: int) -> list[list[int]]:
    """The token ids of every text segment the chat engine embeds for a conversation."""
    from click4caption.chat import Chat

    chat = Chat(sp_model, vis_processor=None, device="cpu")
    conv = chat.new_conversation()
    for question, reply in question_turns:
        conv.append_message(conv.roles[0], question)
        conv.append_message(conv.roles[1], reply)
    soft = [torch.randn(1, sp_model.num_query_token, sp_model.llama_model.config.hidden_size) for _ in range(regions)]
    rec = EmbeddingInputs(sp_model)
    try:
        with torch.no_grad():
            embs = chat.get_context_emb(conv, soft)
    finally:
        rec.close()
    rows = rec.rows()
    # the context embedding is the segments' embeddings with the soft tokens in the gaps
    table = sp_model.llama_model.get_input_embeddings().weight
    expected = []
    for i, row in enumerate(rows):
        expected.append(table[row])
        if i < len(soft):
            expected.append(soft[i][0])
    assert torch.equal(embs[0], torch.cat(expected))
    return rows


def ids(sp, text: str, bos: bool = False) -> list[int]:
    return ([sp.bos_id()] if bos else []) + sp.encode(text)


def test_describe_prompt_ids(sp_model, sp) -> None:
    rows = chat_segments(sp_model, [("image[IMG] Tell me what it is and write a description for it.", None)], 1)
    assert rows == [ids(sp, "### Human: image", bos=True),
                    ids(sp, " Tell me what it is and write a description for it.\n### Assistant:")]


@pytest.mark.parametrize("regions", [1, 2, 3])
def test_multi_region_question_ids(sp_model, sp, regions: int) -> None:
    names = [f"image {i + 1}[IMG]" for i in range(regions)]
    question = " ".join(names) + " Write a story that combines them."
    rows = chat_segments(sp_model, [(question, None)], regions)
    expected = [ids(sp, "### Human: image 1", bos=True)]
    expected += [ids(sp, f" image {i + 1}") for i in range(1, regions)]
    expected.append(ids(sp, " Write a story that combines them.\n### Assistant:"))
    assert rows == expected


def test_multi_turn_ids(sp_model, sp) -> None:
    rows = chat_segments(sp_model, [("image[IMG] What is it?", "A red circle."), ("What color is it?", None),
                                    ], 1)
    assert rows == [ids(sp, "### Human: image", bos=True),
                    ids(sp, " What is it?\n### Assistant: A red circle.\n### Human: What color is it?\n### Assistant:")]


def test_training_conversation_ids(sp_model, sp) -> None:
    turns = [{"from": "human", "value": "image[IMG] What color is it?"}, {"from": "gpt", "value": "Red."},
             {"from": "human", "value": "What shape is it?"}, {"from": "gpt", "value": "Circle."}]
    region = torch.randn(1, sp_model.num_query_token, sp_model.llama_model.config.hidden_size)
    rec = EmbeddingInputs(sp_model)
    try:
        with torch.no_grad():
            _, labels = sp_model.conversation_training_row(turns, region)
    finally:
        rec.close()
    pieces = [("### Human: image", True, False), (" What color is it?\n### Assistant:", False, False),
              ("Red.\n###", False, True), (" Human: What shape is it?\n### Assistant:", False, False),
              ("Circle.\n###", False, True)]
    # every text piece of the row goes through the embedding in one lookup
    assert rec.rows() == [[i for text, bos, _ in pieces for i in ids(sp, text, bos)]]
    expected_labels = []
    for i, (text, bos, target) in enumerate(pieces):
        piece = ids(sp, text, bos)
        expected_labels += piece if target else [-100] * len(piece)
        if i == 0:
            expected_labels += [-100] * sp_model.num_query_token
    assert labels.tolist() == expected_labels


def test_caption_batch_and_prompt_wrap_ids(sp_model, sp, pad_id: int) -> None:
    """Caption mode: ``caption + end_sym`` cut at max_txt_len, right-padded with [PAD]; the
    training prompt's two parts without BOS (upstream's prompt_wrap)."""
    prompt = "###Human: <Img><ImageHere></Img> Describe this image in detail. ###Assistant: "
    captions = ["A red circle.", "a man riding a horse on the beach with two dogs playing", "Yes"]
    sp_model.prompt_list = [prompt]
    rec = EmbeddingInputs(sp_model)
    try:
        with torch.no_grad():
            sp_model({"image": torch.zeros(3, 3, 32, 32), "bbox": torch.tensor([[[[0.0, 0.0], [32.0, 32.0]]]] * 3),
                      "text_input": captions})
    finally:
        rec.close()
        sp_model.prompt_list = []
    (before,), (after,), bos, caption_rows = rec.calls
    assert before == sp.encode("###Human: <Img>") and after == sp.encode("</Img> Describe this image in detail. "
                                                                           "###Assistant: ")
    assert bos == [[sp.bos_id()]] * 3
    want = [sp.encode(c + "###")[:12] for c in captions]
    width = max(len(w) for w in want)
    assert len(want[1]) == 12  # the long caption is really cut
    assert caption_rows == [w + [pad_id] * (width - len(w)) for w in want]
