"""Training and input semantics that must be the original's: the collated caption layout,
the draw order of whole-image boxes, training prompts (``prompt_path``), one ``end_sym``,
config keys upstream files hold, and the orientation of tagged JPEGs."""
from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from click4caption.config import from_dict, load_config
from click4caption.errors import ConfigError, InputError


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    from click4caption.models.builder import build_model
    from tests.tiny import tiny_model_config

    torch.manual_seed(0)
    m = build_model(tiny_model_config(tmp_path_factory.mktemp("sem")), for_training=True)
    with torch.no_grad():  # larger than the HF init, so that soft tokens and order change the loss
        for p in m.llama_model.parameters():
            if p.dim() == 2:
                p.copy_(0.4 * torch.randn_like(p))
    m.eval()  # no dropout: losses are comparable
    return m


# --------------------------------------------------------------------------- caption batches
def test_upstream_collated_captions_give_the_same_loss(model) -> None:
    """Upstream's collate makes ``text_input`` R lists of B captions; its forward transposes
    them (``zip(*...)``) to the image-major order the flat layout already has."""
    gen = torch.Generator().manual_seed(1)
    image = torch.randn(2, 3, 32, 32, generator=gen)
    bbox = torch.rand(2, 3, 2, 2, generator=gen) * 32
    per_image = [["A red circle.", "Yes", "Two squares"], ["big", "A small blue star.", "no"]]
    flat = [c for caps in per_image for c in caps]
    collated = [[per_image[0][r], per_image[1][r]] for r in range(3)]  # what default_collate makes
    with torch.no_grad():
        a = model({"image": image, "bbox": bbox, "text_input": flat})["loss"]
        b = model({"image": image, "bbox": bbox, "text_input": collated})["loss"]
        c = model({"image": image, "bbox": bbox, "text_input": [c for caps in zip(*per_image) for c in caps]})["loss"]
    assert torch.equal(a, b)
    assert abs(float(a) - float(c)) > 1e-5  # the order matters: a wrong transpose would be seen
    with pytest.raises(InputError, match="collated layout"):
        model({"image": image, "bbox": bbox, "text_input": per_image})  # B lists of R is not upstream's layout


def test_whole_image_boxes_are_drawn_in_upstreams_order(model) -> None:
    """All top-left jitters first, then all bottom-right ones: the same seed, the same boxes."""
    torch.manual_seed(7)
    ours = model.random_near_full_boxes(4)
    torch.manual_seed(7)
    top_left = 7 * torch.rand(4, 1, 1, 2)
    bottom_right = model.img_size - 7 * torch.rand(4, 1, 1, 2)
    assert torch.equal(ours, torch.cat([top_left, bottom_right], dim=2))
    # and a batch without boxes uses exactly these
    image = torch.randn(4, 3, 32, 32)
    captions = ["one", "two", "three", "four"]
    with torch.no_grad():
        torch.manual_seed(7)
        implicit = model({"image": image, "text_input": captions})["loss"]
        explicit = model({"image": image, "bbox": ours, "text_input": captions})["loss"]
    assert torch.equal(implicit, explicit)


# --------------------------------------------------------------------------- training prompts
def test_prompt_path_and_template_wrap_every_caption_batch(tmp_path: Path) -> None:
    from click4caption.models.builder import build_model
    from tests.tiny import tiny_model_config

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("<Img><ImageHere></Img> Describe this image.\nno placeholder here\n"
                       "<Img><ImageHere></Img> What is in the region?\n")
    m = build_model(tiny_model_config(tmp_path, prompt_path=str(prompts),
                                      prompt_template="###Human: {} ###Assistant: "), for_training=True)
    assert m.prompt_list == ["###Human: <Img><ImageHere></Img> Describe this image. ###Assistant: ",
                             "###Human: <Img><ImageHere></Img> What is in the region? ###Assistant: "]
    m.eval()
    batch = {"image": torch.zeros(1, 3, 32, 32), "bbox": torch.tensor([[[[0.0, 0.0], [32.0, 32.0]]]]),
             "text_input": ["A red circle."]}
    with torch.no_grad():
        random.seed(3)
        first = m(batch)["loss"]
        random.seed(3)  # upstream draws the prompt with Python's random.choice
        again = m(batch)["loss"]
        m.prompt_list = []
        plain = m(batch)["loss"]
    assert torch.equal(first, again) and abs(float(first) - float(plain)) > 1e-5


@pytest.mark.parametrize("text,template,match", [
    (None, "", "not found"),
    ("no placeholder at all\n", "", "no line containing <ImageHere>"),
    ("<Img><ImageHere></Img>\n", "no braces <ImageHere>{}<ImageHere>", "once"),
])
def test_bad_training_prompts_are_config_errors(tmp_path: Path, text, template: str, match: str) -> None:
    from click4caption.prompts import load_training_prompts

    path = tmp_path / "p.txt"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_training_prompts(str(path), template)


# --------------------------------------------------------------------------- one end_sym
def test_end_sym_is_one_value_for_training_and_inference(model) -> None:
    from click4caption.chat import Chat, GenerationSettings, StopOnText

    old = model.end_sym
    model.end_sym = "."  # a word-level piece of the tiny tokenizer
    try:
        chat = Chat(model, vis_processor=None, device="cpu")
        conv = chat.new_conversation()
        conv.append_message(conv.roles[0], "image[IMG] What is it?")
        conv.append_message(conv.roles[1], None)
        assert conv.get_prompt() == ". Human: image[IMG] What is it?\n. Assistant:"
        context = torch.zeros(7, model.llama_model.config.hidden_size)
        kwargs = chat._generate_kwargs([context], GenerationSettings(max_new_tokens=5))
        stops = [c for c in kwargs["stopping_criteria"] if isinstance(c, StopOnText)]
        assert [c.stop for c in stops] == ["."]
        turns = [{"from": "human", "value": "image[IMG] What color is it?"}, {"from": "gpt", "value": "Red"}]
        region = torch.zeros(1, model.num_query_token, model.llama_model.config.hidden_size)
        _, labels = model.conversation_training_row(turns, region)
        tok = model.llama_tokenizer
        assert tok.decode([i for i in labels.tolist() if i >= 0]) == "Red\n."
    finally:
        model.end_sym = old


# --------------------------------------------------------------------------- config keys
def test_keys_nothing_reads_are_reported_once_by_name(tmp_path: Path, caplog) -> None:
    from click4caption import config as config_module

    config_module._REPORTED.clear()
    doc = {"model": {"prompt": "x", "model_type": "pretrain_vicuna"},
           "datasets": {"vg": {"data_type": "images"}}, "run": {"batch_size_eval": 12, "world_size": 4}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(doc))
    with caplog.at_level(logging.WARNING, logger="click4caption"):
        load_config(path)
        load_config(path)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for key in ("model.prompt", "datasets.vg.data_type", "run.batch_size_eval", "run.world_size"):
        assert sum(key in w for w in warned) == 1, key
    assert len(warned) == 4  # model_type is read (and valid): no warning
    # the plain dict stored in checkpoints leaves them out, so reloading it is quiet
    caplog.clear()
    config_module._REPORTED.clear()
    with caplog.at_level(logging.WARNING, logger="click4caption"):
        from_dict(load_config(path).to_dict())
    assert len([r for r in caplog.records if "to_dict" in r.getMessage()]) == 0


@pytest.mark.parametrize("doc,key", [
    ({"run": {"evaluate": True}}, "run.evaluate"),
    ({"run": {"train_splits": ["train", "val"]}}, "run.train_splits"),
    ({"model": {"model_type": "pretrain_llama2"}}, "model.model_type"),
])
def test_unsupported_values_of_upstream_keys_are_errors(doc: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        from_dict(doc)


def test_dataset_keys_a_loader_does_not_read_are_reported(tmp_path: Path, caplog) -> None:
    from click4caption import config as config_module
    from click4caption.data.mixing import build_sources
    from tests.fixtures_data import write_vg

    config_module._REPORTED.clear()
    vg = write_vg(tmp_path / "vg")
    cfg = from_dict({"datasets": {"vg": {"build_info": {"storage": str(vg)}, "text_processor": {"train": {
        "name": "blip_caption"}}, "shuffle_buffer": 10}}}, where="t.yaml")
    with caplog.at_level(logging.WARNING, logger="click4caption"):
        build_sources(cfg, 32)
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "datasets.vg.text_processor" in warned and "datasets.vg.shuffle_buffer" in warned
    assert "num_regions" not in warned  # VG reads it


# --------------------------------------------------------------------------- EXIF orientation
def tagged_jpeg(path: Path) -> Path:
    """A 60x40 JPEG whose stored pixels have a red block at the left, tagged 'rotate 90°
    clockwise' (EXIF orientation 6): viewers show it 40x60 with the block at the top."""
    arr = np.full((40, 60, 3), 128, np.uint8)
    arr[:, :15] = (230, 20, 20)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(path, quality=95, exif=exif)
    return path


def test_a_users_picture_is_the_one_viewers_show(tmp_path: Path) -> None:
    from click4caption.boxes import normalize_box
    from click4caption.images import load_image

    image = load_image(tagged_jpeg(tmp_path / "tagged.jpg"))
    assert image.size == (40, 60)
    # a box the user draws on what they see holds the red block in the pixels the model gets
    box, _ = normalize_box([0, 0, 40, 15], image.width, image.height)
    crop = np.asarray(image.crop(tuple(int(v) for v in box)), dtype=float)
    assert crop[..., 0].mean() > 200 and crop[..., 1].mean() < 60


def test_dataset_images_are_read_as_stored(tmp_path: Path) -> None:
    """Visual Genome boxes were drawn on the stored pixels: the loader must not turn the image.
    The region (x 45..55 of a 60-wide stored image) would lie outside the turned (40-wide) one."""
    import json

    from click4caption.config import DatasetConfig
    from click4caption.data.vg import build_visual_genome
    from click4caption.images import load_image
    from click4caption.processors import Blip2ImageEvalProcessor

    root = tmp_path / "vg"
    (root / "VG_100K").mkdir(parents=True)
    path = tagged_jpeg(root / "VG_100K" / "1.jpg")
    (root / "image_data.json").write_text(json.dumps(
        [{"image_id": 1, "url": "https://x/VG_100K/1.jpg", "width": 60, "height": 40}]))
    (root / "region_descriptions.json").write_text(json.dumps(
        [{"id": 1, "regions": [{"phrase": "a grey patch", "x": 45, "y": 5, "width": 10, "height": 10}]}]))
    cfg = DatasetConfig(num_regions=2)
    cfg.build_info.storage = str(root)
    ds = build_visual_genome(cfg, "vg", 1, 32)
    item = ds.load_item(0, np.random.default_rng(0))
    stored = load_image(path, exif_transpose=False)
    assert stored.size == (60, 40)
    assert torch.equal(item["image"], Blip2ImageEvalProcessor(32)(stored))
    assert torch.allclose(item["bbox"][0], torch.tensor([[45 * 32 / 60, 5 * 32 / 40], [55 * 32 / 60, 15 * 32 / 40]]))
