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
    WEIGHT_SOURCES,
    check_plan,
    convert_upstream_state_dict,
    missing_keys_error,
    plan_keys,
    read_state_dict,
    rename_upstream_key,
    resize_pos_embed,
    summarize_keys,
    to_upstream_state_dict,
    unwrap,
    weight_files,
)
from click4caption.config import ModelConfig
from click4caption.errors import CheckpointError

LLM_SIZES = {  # hidden, layers, heads, ffn (Vicuna v0 = LLaMA-1 with a 32001-token vocabulary)
    "7b": (4096, 32, 32, 11008),
    "13b": (5120, 40, 40, 13824),
}


SOURCE = {s.key: s for s in WEIGHT_SOURCES}


def load_manifest(folder: Path, name: str) -> dict:
    return json.loads((folder / name).read_text())


@pytest.fixture(scope="module", params=sorted(LLM_SIZES))
def full_size(request: pytest.FixtureRequest) -> tuple[str, dict[str, torch.Size]]:
    """(size, key -> shape) of the full-size model skeleton with the real config defaults."""
    from click4caption.models.builder import compose

    hidden, layers, heads, ffn = LLM_SIZES[request.param]
    cfg = ModelConfig()  # the real defaults: eva_clip_g, Q-Former 768/12/12/3072, 32 queries, image 224
    assert (cfg.vit_model, cfg.image_size, cfg.num_query_token) == ("eva_clip_g", 224, 32)
    assert (cfg.qformer.hidden_size, cfg.qformer.num_layers, cfg.qformer.num_heads,
            cfg.qformer.intermediate_size) == (768, 12, 12, 3072)
    llm_cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                          intermediate_size=ffn, vocab_size=32001)
    with torch.device("meta"):
        llm = LlamaForCausalLM(llm_cfg)
    model = compose(cfg, llm, None)  # every part on the meta device
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
    plan = plan_keys(manifest, SOURCE["ckpt"], f"click4caption_{size}.pth", shapes)
    assert plan.unexpected == [] and plan.mismatched == []
    # every trained part the model takes from this file is there, with the right shape
    assert set(plan.names) == needed(shapes, CKPT_PARTS)
    assert all(tuple(manifest[plan.names[k]]) == tuple(shapes[k]) for k in plan.names)
    assert tuple(shapes["llama_proj.weight"]) == (LLM_SIZES[size][0], 768)
    assert plan.names["qformer.encoder.layer.4.crossattention.attention.key.weight"] == \
        "Qformer.bert.encoder.layer.4.crossattention.self.key.weight"
    # what does not match is reported by name, with a reason
    layers = LLM_SIZES[size][1]
    assert set(plan.ignored) == {"Qformer.bert.embeddings.position_ids"} | {
        f"llama_model.model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(layers)}
    assert "text branch" in plan.ignored["Qformer.bert.embeddings.position_ids"]
    assert "RoPE" in plan.ignored["llama_model.model.layers.0.self_attn.rotary_emb.inv_freq"]
    assert len(plan.names) + len(plan.ignored) == len(manifest)


def test_vit_manifest_loads_into_the_visual_encoder(full_size, manifests_dir: Path) -> None:
    _, shapes = full_size
    manifest = load_manifest(manifests_dir, "eva_vit_g.json")
    assert len(manifest) == 511
    assert len({k.split(".")[1] for k in manifest if k.startswith("blocks.")}) == 39
    plan = plan_keys(manifest, SOURCE["vit_ckpt"], "eva_vit_g.pth", shapes)
    assert plan.unexpected == [] and plan.mismatched == [] and plan.ignored == {}
    assert set(plan.names) == needed(shapes, ("visual_encoder.",))
    assert plan.names["visual_encoder.blocks.38.attn.qkv.weight"] == "blocks.38.attn.qkv.weight"
    assert tuple(shapes["visual_encoder.blocks.38.attn.qkv.weight"]) == (3 * 1408, 1408)
    assert tuple(shapes["visual_encoder.blocks.0.mlp.fc1.weight"]) == (6144, 1408)


def test_vit_file_with_a_40th_block_reports_the_extra_keys(full_size, manifests_dir: Path) -> None:
    """EVA-CLIP-g has 40 blocks; BLIP-2 drops the last. Extra keys are reported as the file
    spells them, not loaded."""
    _, shapes = full_size
    manifest = load_manifest(manifests_dir, "eva_vit_g.json")
    extra = {k.replace("blocks.38.", "blocks.39."): s for k, s in manifest.items() if k.startswith("blocks.38.")}
    extra["norm.weight"] = [1408]
    plan = plan_keys({**manifest, **extra}, SOURCE["vit_ckpt"], "eva_vit_g.pth", shapes)
    assert sorted(plan.unexpected) == sorted(extra)
    assert set(plan.names) == needed(shapes, ("visual_encoder.",))


def test_vit_position_embedding_of_another_grid_is_resampled(full_size, manifests_dir: Path) -> None:
    _, shapes = full_size
    manifest = load_manifest(manifests_dir, "eva_vit_g.json")
    manifest["pos_embed"] = [1, 1 + 32 * 32, 1408]  # a 448-px ViT
    plan = plan_keys(manifest, SOURCE["vit_ckpt"], "eva_vit_g.pth", shapes)
    assert plan.mismatched == [] and plan.resized == ["visual_encoder.pos_embed"]


def test_files_together_cover_the_model_and_a_missing_key_is_named_as_the_file_spells_it(
        full_size, manifests_dir: Path) -> None:
    size, shapes = full_size
    vit = load_manifest(manifests_dir, "eva_vit_g.json")
    ckpt = load_manifest(manifests_dir, f"click4caption_ckpt_{size}.json")

    def plans(vit_keys, ckpt_keys):
        return [plan_keys(vit_keys, SOURCE["vit_ckpt"], "cached_model/eva_vit_g.pth", shapes),
                plan_keys(ckpt_keys, SOURCE["ckpt"], f"cached_model/click4caption_{size}.pth", shapes)]

    assert missing_keys_error(shapes, plans(vit, ckpt), skip_prefixes=("llama_model.",)) is None
    for file_key, where in (("Qformer.bert.encoder.layer.4.crossattention.self.key.weight", "ckpt"),
                            ("coordinate_pe_layer.positional_encoding_gaussian_matrix", "ckpt"),
                            ("blocks.20.attn.q_bias", "vit")):
        v = {k: s for k, s in vit.items() if k != file_key}
        c = {k: s for k, s in ckpt.items() if k != file_key}
        err = missing_keys_error(shapes, plans(v, c), skip_prefixes=("llama_model.",))
        msg = str(err)
        assert file_key in msg and "1 tensor(s)" in msg
        assert ("eva_vit_g.pth" if where == "vit" else f"click4caption_{size}.pth") in msg
        assert "crossattention.attention.key" not in msg  # not the project's own spelling
    # the LLM's own weights come from its folder, not from these files
    assert "llama_model" in str(missing_keys_error(shapes, plans(vit, ckpt)))


def test_blip2_qformer_manifest(full_size, manifests_dir: Path) -> None:
    """``blip2_pretrained_flant5xxl.pth``: the Q-Former, queries and ln_vision are taken;
    the text branch and the other BLIP-2 parts are reported by name, with why."""
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
        "llama_proj.weight": [4096, 768],  # a part this model has, but not one it takes from BLIP-2
    }
    plan = plan_keys({**manifest, **extra}, SOURCE["q_former_model"], "blip2_pretrained_flant5xxl.pth", shapes)
    assert set(plan.names) == needed(shapes, ("qformer.", "query_tokens", "ln_vision."))
    assert set(plan.ignored) == {"Qformer.bert.embeddings.position_ids", *extra}
    assert "text" in plan.ignored["Qformer.bert.encoder.layer.3.intermediate.dense.weight"]
    assert "not a part this model takes" in plan.ignored["t5_proj.weight"]
    assert "not a part this model takes" in plan.ignored["llama_proj.weight"]
    assert plan.unexpected == [] and plan.mismatched == []


@pytest.mark.parametrize("proj_size", ["7b", "13b"])
def test_minigpt4_projection_manifest(full_size, manifests_dir: Path, proj_size: str) -> None:
    size, shapes = full_size
    manifest = load_manifest(manifests_dir, "minigpt4_proj.json")[proj_size]
    plan = plan_keys(manifest, SOURCE["llama_proj_ckpt"], f"pretrained_minigpt4_{proj_size}.pth", shapes)
    assert plan.ignored == {}
    if proj_size == size:
        assert set(plan.names) == {"llama_proj.weight", "llama_proj.bias"} and plan.mismatched == []
        check_plan(plan)
    else:  # a 13B projection with a 7B LLM (or the reverse) is a shape error naming the tensor
        assert plan.names == {}
        assert {k for k, _, _ in plan.mismatched} == {"llama_proj.weight", "llama_proj.bias"}
        with pytest.raises(CheckpointError, match=r"llama_proj\.weight is \["):
            check_plan(plan)


def test_weight_files_order_and_what_a_trained_checkpoint_replaces() -> None:
    paths = {"vit_ckpt": "v.pth", "q_former_model": "q.pth", "llama_proj_ckpt": "p.pth", "ckpt": None}
    assert [s.key for s, _ in weight_files(paths)] == ["vit_ckpt", "q_former_model", "llama_proj_ckpt"]
    assert [s.key for s, _ in weight_files({**paths, "ckpt": "c.pth"})] == ["vit_ckpt", "ckpt"]
    url = "https://storage.googleapis.com/x/blip2_pretrained_flant5xxl.pth"  # upstream's default: never fetched
    assert [s.key for s, _ in weight_files({**paths, "q_former_model": url})] == ["vit_ckpt", "llama_proj_ckpt"]


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


def _no_llm_load(monkeypatch) -> None:
    from click4caption.models import builder

    def no_llm(*args, **kwargs):
        raise AssertionError("the LLM was loaded before the bad file was noticed")

    monkeypatch.setattr(builder, "load_llm", no_llm)


def test_checkpoint_missing_a_key_fails_early_for_inference_only(tiny_files, tmp_path: Path, monkeypatch) -> None:
    from click4caption.models.builder import build_model

    path = _rewrite_ckpt(tiny_files, tmp_path,
                         lambda sd: sd.pop("Qformer.bert.encoder.layer.1.output_query.dense.weight"))
    cfg = _tiny_cfg(tiny_files, ckpt=path)
    build_model(cfg, for_training=True)  # training may start from random weights
    _no_llm_load(monkeypatch)
    with pytest.raises(CheckpointError) as err:
        build_model(cfg)
    msg = str(err.value)
    assert "Qformer.bert.encoder.layer.1.output_query.dense.weight" in msg  # as the file spells it
    assert str(path) in msg and "model.ckpt" in msg and "set model.ckpt" not in msg


def test_checkpoint_with_a_wrong_shape_names_the_tensor_early(tiny_files, tmp_path: Path, monkeypatch) -> None:
    from click4caption.models.builder import build_model

    def widen(sd):
        w = sd["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"]
        sd["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"] = torch.zeros(w.shape[0], w.shape[1] + 1)

    cfg = _tiny_cfg(tiny_files, ckpt=_rewrite_ckpt(tiny_files, tmp_path, widen))
    _no_llm_load(monkeypatch)
    with pytest.raises(CheckpointError, match=r"Qformer\.bert\.encoder\.layer\.0\.crossattention\.self\.key\.weight "
                                              r"is \[16, 33\], the model needs \[16, 32\]"):
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

    _no_llm_load(monkeypatch)
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
    from click4caption.models.builder import build_model, compose, covered_parts, plan_weights
    from click4caption.models.llm import build_llm_skeleton, read_llm_config

    full = torch.load(tiny_files["ckpt"], weights_only=True)["model"]
    blip2 = {k: v for k, v in full.items() if k.startswith(("Qformer.", "query_tokens", "ln_vision."))}
    blip2["Qformer.bert.encoder.layer.0.intermediate.dense.weight"] = torch.zeros(3, 3)  # text FFN
    blip2["t5_proj.weight"] = torch.zeros(5, 3)
    torch.save({"model": blip2}, tmp_path / "blip2.pth")
    torch.save({"model": {k: full[k] for k in ("llama_proj.weight", "llama_proj.bias")}}, tmp_path / "proj.pth")
    cfg = load_config(tiny_files["yaml"], ["model.ckpt=null", f"model.q_former_model={tmp_path / 'blip2.pth'}",
                                           f"model.llama_proj_ckpt={tmp_path / 'proj.pth'}"]).model
    skeleton = compose(cfg, build_llm_skeleton(read_llm_config(tiny_files["llm"])), None)
    shapes = {k: v.shape for k, v in skeleton.state_dict().items()}
    plans = {p.source.key: p for p, _ in plan_weights(cfg, shapes, for_training=True)}
    assert plans["q_former_model"].unexpected == []
    assert set(plans["q_former_model"].ignored) == {"Qformer.bert.encoder.layer.0.intermediate.dense.weight",
                                                    "t5_proj.weight"}
    assert plans["llama_proj_ckpt"].names == {"llama_proj.weight": "llama_proj.weight",
                                              "llama_proj.bias": "llama_proj.bias"}
    # the parts the files cover are built on the meta device; the prompt encoder is random
    assert covered_parts(shapes, list(plans.values())) == {"visual_encoder", "ln_vision", "qformer", "query_tokens",
                                                           "llama_proj"}
    model = build_model(cfg, for_training=True)
    assert torch.equal(model.query_tokens, full["query_tokens"])
    assert torch.equal(model.qformer.layernorm.weight, full["Qformer.bert.embeddings.LayerNorm.weight"])
    assert torch.equal(model.llama_proj.bias, full["llama_proj.bias"])
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    with pytest.raises(CheckpointError, match="prompt_encoder"):  # not enough for inference
        plan_weights(cfg, shapes, for_training=False)


def test_parts_from_files_are_built_on_the_meta_device(tiny_files) -> None:
    from click4caption.config import load_config
    from click4caption.models.builder import PARTS, compose
    from click4caption.models.llm import build_llm_skeleton, read_llm_config

    cfg = load_config(tiny_files["yaml"]).model
    llm = build_llm_skeleton(read_llm_config(tiny_files["llm"]))
    model = compose(cfg, llm, None, meta_parts=frozenset({"visual_encoder", "qformer"}))
    for name in PARTS:
        part = getattr(model, name)
        tensors = [part] if isinstance(part, torch.nn.Parameter) else list(part.parameters())
        assert all(t.is_meta == (name in ("visual_encoder", "qformer")) for t in tensors), name


# --------------------------------------------------------------------------- the LLM folder
def _llm_copy(tiny_files: dict[str, Path], tmp_path: Path, edit, tie: bool = False) -> Path:
    """A copy of the tiny LLM folder with its safetensors file edited."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "llm"
    shutil.copytree(tiny_files["llm"], folder)
    state = load_file(str(folder / "model.safetensors"))
    edit(state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if tie:
        config = json.loads((folder / "config.json").read_text())
        config["tie_word_embeddings"] = True
        (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("edit,match", [
    (lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"), r"1 tensor\(s\) missing: model\.layers\.1\.mlp\.up_proj\.weight"),
    (lambda sd: sd.update({"model.extra_head.weight": torch.zeros(2, 2)}),
     r"the model does not have: model\.extra_head\.weight"),
    (lambda sd: sd.update({"model.norm.weight": torch.ones(33)}), r"model\.norm\.weight is \[33\], config\.json needs \[32\]"),
], ids=["missing", "unexpected", "wrong_shape"])
def test_llm_folder_tensors_are_checked_before_loading(tiny_files, tmp_path: Path, monkeypatch, edit,
                                                       match: str) -> None:
    from click4caption.models.builder import build_model

    folder = _llm_copy(tiny_files, tmp_path, edit)
    _no_llm_load(monkeypatch)
    with pytest.raises(CheckpointError, match=match) as err:
        build_model(_tiny_cfg(tiny_files, llama_model=folder))
    assert str(folder) in str(err.value)


def test_llm_folder_exceptions_tied_weights_and_rope_buffers(tiny_files, tmp_path: Path, caplog) -> None:
    """A tied ``lm_head.weight`` need not be in the file; an old RoPE buffer is skipped with its reason."""
    from click4caption.models.builder import build_model

    def edit(sd):
        sd.pop("lm_head.weight")
        sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)

    folder = _llm_copy(tiny_files, tmp_path, edit, tie=True)
    with caplog.at_level(logging.INFO, logger="click4caption"):
        model = build_model(_tiny_cfg(tiny_files, llama_model=folder))
    assert "RoPE" in caplog.text
    assert torch.equal(model.llama_model.lm_head.weight, model.llama_model.get_input_embeddings().weight)
