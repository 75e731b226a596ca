"""Checkpoint conversion and loading.

The upstream manifests (key -> shape of every real file) are loaded at full 7B / 13B size
against the model skeleton built on the meta device: no weights, no downloads. Then the
same loaders are run on tiny real files for the error paths.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from click4caption.checkpoint import (
    convert_upstream_state_dict,
    convert_vit_state_dict,
    log_report,
    match_to_model,
    read_state_dict,
    rename_upstream_key,
    required_keys_check,
    resize_pos_embed,
    summarize_keys,
    to_upstream_state_dict,
    unwrap,
)
from click4caption.config import ModelConfig
from click4caption.errors import CheckpointError

LLM_SIZES = {  # hidden, layers, heads, ffn (Vicuna v0 = LLaMA-1 with a 32001-token vocabulary)
    "7b": (4096, 32, 32, 11008),
    "13b": (5120, 40, 40, 13824),
}


def meta_tensors(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def load_manifest(folder: Path, name: str) -> dict:
    return json.loads((folder / name).read_text())


@pytest.fixture(scope="module", params=sorted(LLM_SIZES))
def full_size(request: pytest.FixtureRequest) -> tuple[str, dict[str, torch.Size]]:
    """(size, key -> shape) of the full-size model skeleton with the real config defaults."""
    from click4caption.models.builder import build_skeleton
    from click4caption.shapes.tokenizer import build_shapes_tokenizer

    hidden, layers, heads, ffn = LLM_SIZES[request.param]
    cfg = ModelConfig()  # the real defaults: eva_clip_g, Q-Former 768/12/12/3072, 32 queries, image 224
    assert (cfg.vit_model, cfg.image_size, cfg.num_query_token) == ("eva_clip_g", 224, 32)
    assert (cfg.qformer.hidden_size, cfg.qformer.num_layers, cfg.qformer.num_heads,
            cfg.qformer.intermediate_size) == (768, 12, 12, 3072)
    llm_cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                          intermediate_size=ffn, vocab_size=32001)
    with torch.device("meta"):
        llm = LlamaForCausalLM(llm_cfg)
        model = build_skeleton(cfg, llm, build_shapes_tokenizer())
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert all(v.device.type == "meta" for v in model.state_dict().values())
    return request.param, shapes


def needed(shapes: dict[str, torch.Size], prefixes: tuple[str, ...]) -> set[str]:
    return {k for k in shapes if k.startswith(prefixes)}


CKPT_PARTS = ("qformer.", "query_tokens", "ln_vision.", "llama_proj.", "prompt_encoder.")


# --------------------------------------------------------------------------- full-size manifests
def test_release_checkpoint_manifest_loads_by_key_and_shape(full_size, manifests_dir: Path) -> None:
    size, shapes = full_size
    manifest = load_manifest(manifests_dir, f"click4caption_ckpt_{size}.json")
    assert len(manifest) == {"7b": 297, "13b": 305}[size]
    renamed, ignored = convert_upstream_state_dict(meta_tensors(manifest))
    kept, report = match_to_model(renamed, shapes, f"click4caption_{size}.pth")
    assert report.unexpected == [] and report.mismatched == []
    # every trained part the model takes from this file is there, with the right shape
    assert set(kept) == needed(shapes, CKPT_PARTS)
    assert kept["llama_proj.weight"].shape == (LLM_SIZES[size][0], 768)
    # what does not match is reported by name, with a reason
    layers = LLM_SIZES[size][1]
    assert set(ignored) == {"Qformer.bert.embeddings.position_ids"} | {
        f"llama_model.model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(layers)}
    assert "text branch" in ignored["Qformer.bert.embeddings.position_ids"]
    assert "RoPE" in ignored["llama_model.model.layers.0.self_attn.rotary_emb.inv_freq"]
    assert len(kept) + len(ignored) == len(manifest)


def test_vit_manifest_loads_into_the_visual_encoder(full_size, manifests_dir: Path) -> None:
    _, shapes = full_size
    manifest = load_manifest(manifests_dir, "eva_vit_g.json")
    assert len(manifest) == 511
    assert len({k.split(".")[1] for k in manifest if k.startswith("blocks.")}) == 39
    state = convert_vit_state_dict(meta_tensors(manifest))
    assert all(k.startswith("visual_encoder.") for k in state)
    kept, report = match_to_model(state, shapes, "eva_vit_g.pth")
    assert report.unexpected == [] and report.mismatched == []
    assert set(kept) == needed(shapes, ("visual_encoder.",))
    assert kept["visual_encoder.blocks.38.attn.qkv.weight"].shape == (3 * 1408, 1408)
    assert kept["visual_encoder.blocks.0.mlp.fc1.weight"].shape == (6144, 1408)


def test_vit_file_with_a_40th_block_reports_the_extra_keys(full_size, manifests_dir: Path) -> None:
    """EVA-CLIP-g has 40 blocks; BLIP-2 drops the last. Extra keys are reported, not loaded."""
    _, shapes = full_size
    manifest = load_manifest(manifests_dir, "eva_vit_g.json")
    extra = {k.replace("blocks.38.", "blocks.39."): s for k, s in manifest.items() if k.startswith("blocks.38.")}
    extra["norm.weight"] = [1408]
    state = convert_vit_state_dict(meta_tensors({**manifest, **extra}))
    kept, report = match_to_model(state, shapes, "eva_vit_g.pth")
    assert sorted(report.unexpected) == sorted("visual_encoder." + k for k in extra)
    assert set(kept) == needed(shapes, ("visual_encoder.",))


def test_files_together_cover_the_model_and_a_missing_key_is_an_error(full_size, manifests_dir: Path) -> None:
    size, shapes = full_size
    vit = convert_vit_state_dict(meta_tensors(load_manifest(manifests_dir, "eva_vit_g.json")))
    ckpt, _ = convert_upstream_state_dict(meta_tensors(load_manifest(manifests_dir, f"click4caption_ckpt_{size}.json")))
    covered = set(match_to_model(vit, shapes, "vit")[0]) | set(match_to_model(ckpt, shapes, "ckpt")[0])
    required_keys_check(shapes, covered, skip_prefixes=("llama_model.",))  # no error: nothing missing

    for dropped in ("qformer.encoder.layer.7.output_query.dense.weight",
                    "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
                    "visual_encoder.blocks.20.attn.q_bias"):
        with pytest.raises(CheckpointError) as err:
            required_keys_check(shapes, covered - {dropped}, skip_prefixes=("llama_model.",))
        assert dropped in str(err.value)
        assert "1 model tensors" in str(err.value)
    # the LLM's own weights come from its folder, not from these files
    with pytest.raises(CheckpointError, match="llama_model"):
        required_keys_check(shapes, covered)


def test_blip2_qformer_manifest(full_size, manifests_dir: Path) -> None:
    """``blip2_pretrained_flant5xxl.pth``: the Q-Former, queries and ln_vision are taken;
    the text branch and the other BLIP-2 parts are reported by name."""
    _, shapes = full_size
    manifest = load_manifest(manifests_dir, "qformer_from_blip2.json")
    assert len(manifest) == 258
    extra = {
        "Qformer.bert.embeddings.word_embeddings.weight": [30523, 768],
        "Qformer.bert.embeddings.position_embeddings.weight": [512, 768],
        "Qformer.bert.encoder.layer.3.intermediate.dense.weight": [3072, 768],
        "Qformer.bert.encoder.layer.3.output.LayerNorm.bias": [768],
        "Qformer.cls.predictions.bias": [30523],
        "t5_proj.weight": [4096, 768],
    }
    renamed, ignored = convert_upstream_state_dict(meta_tensors({**manifest, **extra}))
    kept, report = match_to_model(renamed, shapes, "blip2_pretrained_flant5xxl.pth")
    assert set(kept) == needed(shapes, ("qformer.", "query_tokens", "ln_vision."))
    assert set(ignored) == {"Qformer.bert.embeddings.position_ids", *list(extra)[:5]}
    assert "text" in ignored["Qformer.bert.encoder.layer.3.intermediate.dense.weight"]
    assert report.unexpected == ["t5_proj.weight"]
    assert report.mismatched == []


@pytest.mark.parametrize("proj_size", ["7b", "13b"])
def test_minigpt4_projection_manifest(full_size, manifests_dir: Path, proj_size: str) -> None:
    size, shapes = full_size
    manifest = load_manifest(manifests_dir, "minigpt4_proj.json")[proj_size]
    renamed, ignored = convert_upstream_state_dict(meta_tensors(manifest))
    assert ignored == {}
    kept, report = match_to_model(renamed, shapes, f"pretrained_minigpt4_{proj_size}.pth")
    if proj_size == size:
        assert set(kept) == {"llama_proj.weight", "llama_proj.bias"} and report.mismatched == []
    else:  # a 13B projection with a 7B LLM (or the reverse) is a shape error naming the tensor
        assert kept == {}
        assert {k for k, _, _ in report.mismatched} == {"llama_proj.weight", "llama_proj.bias"}
        with pytest.raises(CheckpointError, match=r"llama_proj\.weight"):
            log_report(report)


# --------------------------------------------------------------------------- pure functions
def test_key_map_examples() -> None:
    assert rename_upstream_key("Qformer.bert.embeddings.LayerNorm.weight") == "qformer.layernorm.weight"
    assert (rename_upstream_key("Qformer.bert.encoder.layer.10.attention.self.query.bias")
            == "qformer.encoder.layer.10.attention.attention.query.bias")
    assert (rename_upstream_key("Qformer.bert.encoder.layer.4.crossattention.self.value.weight")
            == "qformer.encoder.layer.4.crossattention.attention.value.weight")
    assert (rename_upstream_key("Qformer.bert.encoder.layer.4.crossattention.output.dense.weight")
            == "qformer.encoder.layer.4.crossattention.output.dense.weight")
    assert (rename_upstream_key("Qformer.bert.encoder.layer.1.output_query.LayerNorm.bias")
            == "qformer.encoder.layer.1.output_query.LayerNorm.bias")
    assert rename_upstream_key("coordinate_type_emb.1.weight") == "prompt_encoder.corner_type_emb.1.weight"
    assert rename_upstream_key("img_embs_pe_proj.bias") == "prompt_encoder.image_pe_proj.bias"
    assert rename_upstream_key("llama_proj.weight") == "llama_proj.weight"
    assert rename_upstream_key("Qformer.bert.encoder.layer.1.output.dense.weight") is None  # text FFN


def test_upstream_names_round_trip(tiny_model) -> None:
    sd = {k: v for k, v in tiny_model.state_dict().items() if not k.startswith(("visual_encoder.", "llama_model."))}
    upstream = to_upstream_state_dict(sd)
    assert "coordinate_pe_layer.positional_encoding_gaussian_matrix" in upstream
    assert "Qformer.bert.encoder.layer.0.crossattention.self.key.weight" in upstream
    back, ignored = convert_upstream_state_dict(upstream)
    assert ignored == {}
    assert set(back) == set(sd)
    assert all(back[k] is sd[k] for k in sd)


def test_unwrap() -> None:
    sd = {"a": torch.zeros(1)}
    assert unwrap({"model": sd, "optimizer": {}, "epoch": 3}) == sd
    assert unwrap({"state_dict": sd}) == sd
    assert unwrap(sd) == sd
    with pytest.raises(CheckpointError):
        unwrap([1, 2])


def test_summarize_keys() -> None:
    keys = [f"qformer.encoder.layer.{i}.output_query.dense.weight" for i in range(12)] + ["query_tokens"]
    assert summarize_keys(keys) == "qformer.encoder.layer.{0..11}.output_query.dense.weight, query_tokens"
    assert summarize_keys(["a.0.b", "a.2.b", "a.5.b"]) == "a.{0,2,5}.b"
    assert summarize_keys(["blocks.7.attn.q_bias"]) == "blocks.7.attn.q_bias"  # one key: its literal name
    assert summarize_keys([f"k{i}" for i in range(5)], limit=2) == "k0, k1, ... (3 more)"


def test_resize_pos_embed() -> None:
    pos = torch.randn(1, 1 + 16, 8)
    assert resize_pos_embed(pos, 16) is pos
    out = resize_pos_embed(pos, 64)
    assert out.shape == (1, 65, 8)
    assert torch.equal(out[:, 0], pos[:, 0])  # the CLS position is kept as is
    # a constant grid stays constant under bicubic resampling
    flat = torch.cat([pos[:, :1], torch.full((1, 16, 8), 0.5)], dim=1)
    assert torch.allclose(resize_pos_embed(flat, 64)[:, 1:], torch.full((1, 64, 8), 0.5), atol=1e-5)


# --------------------------------------------------------------------------- reading files
def test_read_state_dict_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as err:
        read_state_dict(tmp_path / "cached_model" / "click4caption_13b.pth", "Click4Caption checkpoint (model.ckpt)")
    msg = str(err.value)
    assert "Click4Caption checkpoint (model.ckpt) not found" in msg
    assert str(tmp_path / "cached_model" / "click4caption_13b.pth") in msg
    assert "cached_model/README.md" in msg

    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"\x80\x02not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match="cannot read ViT checkpoint"):
        read_state_dict(bad, "ViT checkpoint")


class _NotATensor:
    pass


def test_read_state_dict_refuses_pickled_code(tmp_path: Path) -> None:
    """weights_only: a checkpoint holding arbitrary objects is refused, not executed."""
    path = tmp_path / "evil.pth"
    torch.save({"model": {"a": torch.zeros(1)}, "thing": _NotATensor()}, path)
    with pytest.raises(CheckpointError, match="cannot read"):
        read_state_dict(path, "checkpoint")


def test_read_state_dict_formats(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    sd = {"llama_proj.weight": torch.randn(4, 3), "llama_proj.bias": torch.randn(4)}
    torch.save({"model": sd, "optimizer": {"state": {}}, "config": {"model": {"arch": "click4caption"}},
                "epoch": 2}, tmp_path / "wrapped.pth")
    save_file(sd, str(tmp_path / "plain.safetensors"))
    for name in ("wrapped.pth", "plain.safetensors"):
        got = read_state_dict(tmp_path / name, "x")
        assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)


# --------------------------------------------------------------------------- loading tiny files
def _tiny_cfg(tiny_files: dict[str, Path], **overrides):
    from click4caption.config import load_config

    opts = [f"model.{k}={v}" for k, v in overrides.items()]
    return load_config(tiny_files["yaml"], opts).model


def _rewrite_ckpt(tiny_files: dict[str, Path], tmp_path: Path, edit) -> Path:
    ckpt = torch.load(tiny_files["ckpt"], weights_only=True)
    edit(ckpt["model"])
    path = tmp_path / "edited.pth"
    torch.save(ckpt, path)
    return path


def test_checkpoint_missing_a_key_fails_for_inference_only(tiny_files, tmp_path: Path) -> None:
    from click4caption.models.builder import build_model

    path = _rewrite_ckpt(tiny_files, tmp_path,
                         lambda sd: sd.pop("Qformer.bert.encoder.layer.1.output_query.dense.weight"))
    cfg = _tiny_cfg(tiny_files, ckpt=path)
    with pytest.raises(CheckpointError) as err:
        build_model(cfg)
    assert "qformer.encoder.layer.1.output_query.dense.weight" in str(err.value)
    build_model(cfg, for_training=True)  # training may start from random weights


def test_checkpoint_with_a_wrong_shape_names_the_tensor(tiny_files, tmp_path: Path) -> None:
    from click4caption.models.builder import build_model

    def widen(sd):
        sd["llama_proj.weight"] = torch.zeros(sd["llama_proj.weight"].shape[0] + 1, sd["llama_proj.weight"].shape[1])

    cfg = _tiny_cfg(tiny_files, ckpt=_rewrite_ckpt(tiny_files, tmp_path, widen))
    with pytest.raises(CheckpointError, match=r"llama_proj\.weight"):
        build_model(cfg)


def test_unexpected_keys_are_reported_by_name(tiny_files, tmp_path: Path, caplog) -> None:
    from click4caption.models.builder import build_model

    def add(sd):
        sd["Qformer.bert.embeddings.position_ids"] = torch.arange(512)[None]
        sd["llama_model.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
        sd["some_new_head.weight"] = torch.zeros(2, 2)

    cfg = _tiny_cfg(tiny_files, ckpt=_rewrite_ckpt(tiny_files, tmp_path, add))
    with caplog.at_level(logging.INFO, logger="click4caption"):
        model = build_model(cfg)
    text = caplog.text
    assert "some_new_head.weight" in text  # a warning, by name
    assert any(r.levelno == logging.WARNING and "some_new_head.weight" in r.getMessage() for r in caplog.records)
    assert "Qformer.bert.embeddings.position_ids" in text and "rotary_emb.inv_freq" in text  # skipped, by name
    ref = torch.load(tiny_files["ckpt"], weights_only=True)["model"]
    assert torch.equal(model.llama_proj.weight, ref["llama_proj.weight"])


def test_missing_file_is_reported_before_the_llm_loads(tiny_files, tmp_path: Path, monkeypatch) -> None:
    from click4caption.models import builder

    def no_llm(*args, **kwargs):
        raise AssertionError("the LLM was loaded before the missing checkpoint was noticed")

    monkeypatch.setattr(builder, "load_llm", no_llm)
    for key, what in (("ckpt", "model.ckpt"), ("vit_ckpt", "model.vit_ckpt")):
        missing = tmp_path / "cached_model" / f"{key}.pth"
        with pytest.raises(CheckpointError) as err:
            builder.build_model(_tiny_cfg(tiny_files, **{key: missing}))
        assert what in str(err.value) and str(missing) in str(err.value)
        assert "cached_model/README.md" in str(err.value)


def test_training_init_from_blip2_and_minigpt4_files(tiny_files, tmp_path: Path) -> None:
    """Without ``ckpt``: the Q-Former, queries and ln_vision come from the BLIP-2 file (its
    other parts are reported), the projection from the MiniGPT-4 file; the rest is random."""
    from click4caption.config import load_config
    from click4caption.models.builder import build_skeleton, load_weights
    from click4caption.models.llm import load_llm

    full = torch.load(tiny_files["ckpt"], weights_only=True)["model"]
    blip2 = {k: v for k, v in full.items() if k.startswith(("Qformer.", "query_tokens", "ln_vision."))}
    blip2["Qformer.bert.encoder.layer.0.intermediate.dense.weight"] = torch.zeros(3, 3)  # text FFN
    blip2["t5_proj.weight"] = torch.zeros(5, 3)
    torch.save({"model": blip2}, tmp_path / "blip2.pth")
    torch.save({"model": {k: full[k] for k in ("llama_proj.weight", "llama_proj.bias")}}, tmp_path / "proj.pth")
    cfg = load_config(tiny_files["yaml"], ["model.ckpt=null", f"model.q_former_model={tmp_path / 'blip2.pth'}",
                                           f"model.llama_proj_ckpt={tmp_path / 'proj.pth'}"]).model
    llm, tok = load_llm(str(tiny_files["llm"]), torch.device("cpu"), torch.float32)
    model = build_skeleton(cfg, llm, tok)
    reports = load_weights(model, cfg, for_training=True)
    assert reports["q_former_model"].unexpected == []
    assert set(reports["q_former_model"].ignored) == {"Qformer.bert.encoder.layer.0.intermediate.dense.weight",
                                                      "t5_proj.weight"}
    assert reports["llama_proj_ckpt"].loaded == ["llama_proj.weight", "llama_proj.bias"]
    assert torch.equal(model.query_tokens, full["query_tokens"])
    assert torch.equal(model.qformer.layernorm.weight, full["Qformer.bert.embeddings.LayerNorm.weight"])
    assert torch.equal(model.llama_proj.bias, full["llama_proj.bias"])
    with pytest.raises(CheckpointError, match="prompt_encoder"):  # not enough for inference
        load_weights(model, cfg, for_training=False)
