"""Many regions at once: one batched ``generate`` gives exactly the tokens of answering
each conversation alone (greedy and beam search), whatever the batch holds."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from click4caption.chat import Chat
from click4caption.errors import InputError
from click4caption.generation import GenerationSettings

QUESTIONS = [
    "image[IMG] Tell me what it is and write a description for it.",
    "image[IMG] What color is it?",
    "image[IMG] What shape is it?",
    "image[IMG] Is it large or small?",
    "image[IMG] What is it?",
    "image[IMG] Describe this image in detail. Is there a red circle or a blue square on the left of it?",
]


@pytest.fixture(scope="module")
def lively(tmp_path_factory: pytest.TempPathFactory):
    """A tiny model (SentencePiece tokenizer) with large random LLM weights, so that the
    answers depend on the whole context and stop at ``###`` at different lengths."""
    from click4caption.config import from_dict
    from click4caption.models.builder import build_model
    from tests.tiny import tiny_model_section, write_tiny_llm

    llm = write_tiny_llm(tmp_path_factory.mktemp("batched") / "llm", sentencepiece=True)
    torch.manual_seed(0)
    model = build_model(from_dict({"model": tiny_model_section(llm)}).model, for_training=True)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.llama_model.parameters():
            if p.dim() == 2:
                p.copy_(0.4 * torch.randn(p.shape, generator=gen))
        for i in model.llama_tokenizer.encode("###"):
            model.llama_model.lm_head.weight[i] *= 1.1
        for name, p in model.named_parameters():  # soft tokens that differ from box to box
            if p.dim() == 2 and not name.startswith("llama_model."):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    model.eval()
    return model


def conversations(chat: Chat, image: Image.Image, r: int, two_region_every: int = 3):
    """``r`` conversations on one image, prompts of different lengths, some with two regions."""
    gen = np.random.default_rng(r)
    convs, img_lists = [], []
    for i in range(r):
        boxes = gen.uniform(0, 32, size=(2, 4)).round(1)
        boxes = [[min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]) + 1, max(b[1], b[3]) + 1] for b in boxes]
        conv = chat.new_conversation()
        if i % two_region_every == 2:
            chat.ask("image 1[IMG] image 2[IMG] Are they the same color?", conv)
            img_lists.append(list(chat.encode_boxes(image, boxes).split(1)))
        else:
            chat.ask(QUESTIONS[i % len(QUESTIONS)], conv)
            img_lists.append([chat.encode_boxes(image, boxes[:1])])
        convs.append(conv)
    return convs, img_lists


@pytest.mark.parametrize("beams", [1, 3])
def test_batched_tokens_equal_one_at_a_time(lively, beams: int) -> None:
    chat = Chat(lively, vis_processor=lambda im: torch.from_numpy(np.asarray(im, np.float32) / 255).permute(2, 0, 1))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    settings = GenerationSettings(num_beams=beams, max_new_tokens=12)
    lengths, stopped_early = set(), 0
    for r in range(1, 9):
        convs, img_lists = conversations(chat, image, r)
        prompt_lengths = {chat.context_length(c, i) for c, i in zip(convs, img_lists)}
        if r >= 3:
            assert len(prompt_lengths) > 1  # rows really are padded to different lengths
        singles = []
        for conv, imgs in zip(convs, img_lists):
            alone = conv.copy()
            singles.append(chat.answer(alone, imgs, settings))
        batched = chat.answer_batch(convs, img_lists, settings)
        for k, ((reply, ids), (ref_reply, ref_ids)) in enumerate(zip(batched, singles)):
            assert ids.tolist() == ref_ids.tolist(), f"R={r}, conversation {k}"
            assert reply == ref_reply and convs[k].messages[-1][1] == reply
            lengths.add(len(ref_ids))
            stopped_early += len(ref_ids) < settings.max_new_tokens
    # the check is sensitive: rows finish at different steps, some before the limit
    assert len(lengths) > 1 and stopped_early > 0


def test_describe_regions_batches_and_matches_one_by_one(lively, monkeypatch) -> None:
    from click4caption.captioner import Captioner

    captioner = Captioner(lively, settings=GenerationSettings(max_new_tokens=10, batch_size=4))
    images = [Image.fromarray(np.random.default_rng(s).integers(0, 255, (40, 56, 3), dtype=np.uint8)) for s in (1, 2)]
    regions = [captioner.region(images[i % 2], [i, 2 * i, 20 + i, 30]) for i in range(9)]
    calls: list[int] = []
    real = captioner.chat.answer_batch

    def counting(convs, img_lists, settings=None):
        calls.append(len(convs))
        return real(convs, img_lists, settings)

    monkeypatch.setattr(captioner.chat, "answer_batch", counting)
    misses = captioner.chat.cache_misses
    batched = captioner.describe_regions(regions)
    assert calls == [4, 4, 1]  # batch_size 4: three generate calls for 9 regions of two images
    assert captioner.chat.cache_misses - misses == 2  # one ViT pass per image
    one_by_one = [captioner.describe_regions([r])[0] for r in regions]
    assert batched == one_by_one


def test_out_of_memory_splits_the_batch_and_loses_nothing(lively, monkeypatch, caplog) -> None:
    from click4caption.captioner import Captioner

    captioner = Captioner(lively, settings=GenerationSettings(max_new_tokens=6, batch_size=8))
    image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    regions = [captioner.region(image, [i, i, 20 + i, 20 + i]) for i in range(7)]
    expected = captioner.describe_regions(regions)
    real = captioner.chat.answer_batch
    sizes: list[int] = []

    def small_gpu(convs, img_lists, settings=None):
        sizes.append(len(convs))
        if len(convs) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(convs, img_lists, settings)

    monkeypatch.setattr(captioner.chat, "answer_batch", small_gpu)
    assert captioner.describe_regions(regions) == expected
    assert sizes[0] == 7 and max(s for s in sizes if s <= 2) == 2 and sum(s for s in sizes if s <= 2) == 7
    assert "out of GPU memory" in caplog.text

    def no_gpu(convs, img_lists, settings=None):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(captioner.chat, "answer_batch", no_gpu)
    with pytest.raises(InputError, match="out of GPU memory answering one question"):
        captioner.describe_regions(regions[:2])


def test_batch_lines_of_several_images_answer_like_single_lines(lively, tmp_path: Path) -> None:
    from click4caption.captioner import Captioner

    captioner = Captioner(lively, settings=GenerationSettings(max_new_tokens=8, batch_size=5))
    paths = []
    for s in range(3):
        path = tmp_path / f"{s}.png"
        Image.fromarray(np.random.default_rng(10 + s).integers(0, 255, (30, 44, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    items = [
        {"image": paths[0], "boxes": [[0, 0, 20, 20], [5, 5, 40, 28]]},
        {"image": paths[1], "boxes": [[2, 3, 30, 25]], "question": "image[IMG] What color is it?"},
        {"image": paths[2], "boxes": [[0, 0, -1, -1], [10, 10, 20, 20]],
         "question": "image 1[IMG] image 2[IMG] Are they the same shape?"},
        {"image": paths[1], "boxes": [[1, 1, 2]]},  # a bad line: its error, the others still answered
        {"image": paths[0], "boxes": [[3, 3, 15, 25]], "question": "What?"},  # no [IMG]: an error
    ]
    together = captioner.run_items(items)
    alone = []
    for item in items:
        try:
            alone.append(captioner.run_item(item))
        except InputError as err:
            alone.append({**item, "error": str(err)})
    assert together == alone
    assert "error" in together[3] and "error" in together[4] and "captions" in together[0]
