"""Tiny random-weight models and upstream-format checkpoints, written by tests."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from click4caption.checkpoint import to_upstream_state_dict
from click4caption.config import ModelConfig, from_dict
from click4caption.models.builder import build_model
from click4caption.shapes.tokenizer import build_shapes_tokenizer

TINY_VIT = {"embed_dim": 32, "depth": 3, "num_heads": 2, "patch_size": 8, "mlp_dim": 64}
TINY_QFORMER = {"hidden_size": 16, "num_layers": 2, "num_heads": 2, "intermediate_size": 32,
                "cross_attention_freq": 2}


# what the tiny SentencePiece model is trained on: the prompt template, the questions and
# captions of the project, and some odd text (so that merges like "▁What" exist and a
# segment after [IMG] starts with the lone piece "▁", as in the real Vicuna vocabulary)
SP_CORPUS = [
    "### Human: image[IMG] Tell me what it is and write a description for it.\n### Assistant: A large red circle.\n###",
    "### Human: image 1[IMG] image 2[IMG] Write a story that combines image 1 and image 2.\n### Assistant:",
    "### Human: image[IMG] What color is it?\n### Assistant: Red.\n### Human: What shape is it?\n###",
    "What is it? Is it large or small? Are they the same color? Are they the same shape? Yes. No.",
    "three shapes: a large red circle, a small blue star and a small green square",
    "A man riding a horse on the beach. Two dogs playing with a frisbee in a park.",
    "###Human: <Img><ImageHere></Img> Describe this image in detail. ###Assistant: ",
    "the a an of on in with and is are was red green blue yellow white black purple orange",
]
SP_VOCAB = 600


def write_sentencepiece_tokenizer(folder: Path, vocab_size: int = SP_VOCAB) -> Path:
    """A small SentencePiece BPE model with LLaMA's settings (byte fallback, split digits,
    identity normalisation, dummy prefix, ids 0/1/2 = <unk>/<s>/</s>), saved as a LLaMA
    tokenizer folder with Vicuna's added ``[PAD]`` token (id = vocabulary size)."""
    import io
    import json

    import sentencepiece

    folder.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SP_CORPUS * 20), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, allow_whitespace_only_pieces=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    size = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).get_piece_size()
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
         "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "model_max_length": 2048}))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "[PAD]"}))
    (folder / "added_tokens.json").write_text(json.dumps({"[PAD]": size}))
    return folder


def write_tiny_llm(folder: Path, seed: int = 0, with_weights: bool = True, sentencepiece: bool = False) -> Path:
    """A 2-layer LLaMA saved as a transformers folder, with the shapes word-level tokenizer
    (``tokenizer.json``) or, with ``sentencepiece``, a LLaMA-style ``tokenizer.model``."""
    from click4caption.tokenizer import load_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    if sentencepiece:
        write_sentencepiece_tokenizer(folder)
    else:
        build_shapes_tokenizer(folder)
    tok = load_tokenizer(folder)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    if with_weights:
        model.save_pretrained(folder)
    else:
        cfg.save_pretrained(folder)
    return folder


def tiny_model_section(llm_dir: Path, **overrides: Any) -> dict[str, Any]:
    """The ``model:`` section of a tiny model (image 32, patch 8 -> 4x4 grid)."""
    section: dict[str, Any] = {
        "arch": "click4caption",
        "vit_model": "custom",
        "vit": dict(TINY_VIT),
        "vit_ckpt": None,
        "image_size": 32,
        "use_vit_multiblock_feat": [0, 2],
        "qformer": dict(TINY_QFORMER),
        "num_query_token": 4,
        "q_former_model": None,
        "llama_model": str(llm_dir),
        "freeze_vit": True,
        "freeze_qformer": False,
    }
    section.update(overrides)
    return section


def tiny_model_config(tmp_path: Path, **overrides: Any) -> ModelConfig:
    llm = tmp_path / "llm"
    if not (llm / "config.json").exists():
        write_tiny_llm(llm)
    return from_dict({"model": tiny_model_section(llm, **overrides)}).model


def write_upstream_checkpoints(tmp_path: Path, seed: int = 0) -> dict[str, Path]:
    """Random tiny model saved in the upstream formats: ``eva_vit.pth`` (plain ViT
    state dict) and ``click4caption.pth`` (``{'model': trained parts, upstream names}``)."""
    torch.manual_seed(seed)
    cfg = tiny_model_config(tmp_path)
    model = build_model(cfg, for_training=True)
    with torch.no_grad():  # make every tensor non-trivial (LayerNorms, biases)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sd = model.state_dict()
    vit = {k[len("visual_encoder."):]: v.clone() for k, v in sd.items() if k.startswith("visual_encoder.")}
    trained = {k: v.clone() for k, v in sd.items()
               if not k.startswith(("visual_encoder.", "llama_model."))}
    paths = {"vit": tmp_path / "eva_vit.pth", "ckpt": tmp_path / "click4caption.pth"}
    torch.save(vit, paths["vit"])
    torch.save({"model": to_upstream_state_dict(trained)}, paths["ckpt"])
    paths["llm"] = tmp_path / "llm"
    return paths


def tiny_eval_yaml(tmp_path: Path, paths: dict[str, Path]) -> Path:
    """An eval YAML in the upstream layout pointing at the tiny upstream-format files."""
    import yaml

    section = tiny_model_section(paths["llm"], vit_ckpt=str(paths["vit"]), ckpt=str(paths["ckpt"]))
    doc = {
        "model": section,
        "datasets": {"cc_sbu_align": {"vis_processor": {"train": {"name": "blip2_image_eval", "image_size": 32}},
                                      "text_processor": {"train": {"name": "blip_caption"}}}},
        "run": {"task": "image_text_pretrain"},
    }
    out = tmp_path / "tiny_eval.yaml"
    out.write_text(yaml.safe_dump(doc))
    return out
