"""Builds a :class:`Click4Caption` from the ``model:`` config and loads its weights.

Component sizes come from a named variant (``vit_model: eva_clip_g``) or from the
config (``vit_model: custom`` + ``vit:``), so tests, the shipped shapes model and the
real model share one code path.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from click4caption import registry
from click4caption.checkpoint import (
    LoadReport, convert_upstream_state_dict, convert_vit_state_dict, log_report, match_to_model,
    read_state_dict, require_file, required_keys_check, resize_pos_embed, summarize_keys,
)
from click4caption.cli import PROJECT_ROOT
from click4caption.config import ModelConfig
from click4caption.errors import CheckpointError, ConfigError
from click4caption.models.click4caption import Click4Caption
from click4caption.models.llm import load_llm, resolve_dtype
from click4caption.models.prompt_encoder import PromptEncoder
from click4caption.models.qformer import build_qformer, init_query_tokens
from click4caption.models.vision import ViTVariant, VisionEncoder

logger = logging.getLogger(__name__)



def resolve_path(path: str | None) -> str | None:
    """A config path as given if it exists (relative to the working directory, as
    upstream), else relative to the project root when it exists there."""
    if not path:
        return None
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return str(p)
    alt = PROJECT_ROOT / p
    return str(alt) if alt.exists() else str(p)


def vit_variant(cfg: ModelConfig) -> ViTVariant:
    """The ViT sizes: a registered variant, or ``vit:`` when ``vit_model: custom``."""
    if cfg.vit_model == "custom":
        if cfg.vit is None:
            raise ConfigError("model.vit_model is 'custom' but model.vit (sizes) is not set")
        v = cfg.vit
        return ViTVariant(v.embed_dim, v.depth, v.num_heads, v.patch_size, v.mlp_dim)
    if cfg.vit is not None:
        raise ConfigError(f"model.vit sizes are given but vit_model is '{cfg.vit_model}'; "
                          "use vit_model: custom to set sizes")
    return registry.get("vit_variant", cfg.vit_model)


def build_skeleton(cfg: ModelConfig, llm: nn.Module, tokenizer) -> Click4Caption:
    """All parts with fresh weights around an already built LLM (no files read)."""
    variant = vit_variant(cfg)
    if cfg.image_size % variant.patch_size:
        raise ConfigError(f"model.image_size {cfg.image_size} is not a multiple of the patch size {variant.patch_size}")
    visual = VisionEncoder(variant, cfg.image_size, cfg.use_vit_multiblock_feat, cfg.drop_path_rate,
                           cfg.use_grad_checkpoint)
    qformer = build_qformer(cfg.qformer, variant.embed_dim,
                            attn_implementation="eager" if cfg.box_attention_loss_weight > 0 else "sdpa")
    queries = init_query_tokens(cfg.num_query_token, cfg.qformer.hidden_size)
    prompt = PromptEncoder(cfg.qformer.hidden_size, variant.embed_dim, cfg.image_size, cfg.add_img_pe)
    return Click4Caption(visual, qformer, queries, prompt, llm, tokenizer, image_size=cfg.image_size,
                         delete_vit_cls_token=cfg.delete_vit_cls_token, add_img_pe=cfg.add_img_pe,
                         max_txt_len=cfg.max_txt_len, end_sym=cfg.end_sym,
                         box_attention_loss_weight=cfg.box_attention_loss_weight,
                         box_attention_grid=cfg.box_attention_grid,
                         box_attention_whole_image=cfg.box_attention_whole_image)


def _apply(model: nn.Module, state: dict[str, torch.Tensor], report: LoadReport) -> set[str]:
    log_report(report)
    if state:
        result = model.load_state_dict(state, strict=False)
        if result.unexpected_keys:  # cannot happen after match_to_model; guard anyway
            raise CheckpointError(f"{report.source}: unexpected keys {summarize_keys(result.unexpected_keys)}")
    return set(state)


def load_weights(model: Click4Caption, cfg: ModelConfig, for_training: bool) -> dict[str, LoadReport]:
    """Load every file the config names, in order: ViT, (BLIP-2 Q-Former, MiniGPT-4
    projection when no ``ckpt``), then ``ckpt``; later files override earlier ones.

    Raises:
        CheckpointError: a file is missing or unreadable, a shape differs, or (for
            inference) some model tensor is found in no file.
    """
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    covered: set[str] = set()
    reports: dict[str, LoadReport] = {}
    if not cfg.llm_from_scratch:
        covered |= {k for k in shapes if k.startswith("llama_model.")}

    vit_path = resolve_path(cfg.vit_ckpt)
    if vit_path:
        state = read_state_dict(vit_path, VIT_WHAT)
        if "pos_embed" in state:
            state["pos_embed"] = resize_pos_embed(state["pos_embed"], model.visual_encoder.patch_embed.num_patches)
        state = convert_vit_state_dict(state)
        kept, rep = match_to_model(state, shapes, vit_path)
        covered |= _apply(model, kept, rep)
        reports["vit"] = rep

    for path, what in checkpoint_sources(cfg):
        raw = read_state_dict(path, what)
        renamed, ignored = convert_upstream_state_dict(raw)
        if "q_former_model" in what:  # a BLIP-2 file holds whole models; take our parts only
            wanted = ("qformer.", "query_tokens", "ln_vision.")
            other = [k for k in renamed if not k.startswith(wanted)]
            for k in other:
                ignored[k] = "not a part this model takes from BLIP-2"
                renamed.pop(k)
        kept, rep = match_to_model(renamed, shapes, path)
        rep.ignored = ignored
        covered |= _apply(model, kept, rep)
        reports[key_for(what)] = rep

    if for_training:
        missing = sorted(k for k in shapes if k not in covered)
        if missing:
            logger.info("initialised randomly (no checkpoint provides them): %s", summarize_keys(missing))
    else:
        required_keys_check(shapes, covered)
    return reports


VIT_WHAT = "ViT checkpoint (model.vit_ckpt)"


def checkpoint_sources(cfg: ModelConfig) -> list[tuple[str, str]]:
    """The files after the ViT's that :func:`load_weights` reads, in order, as ``(path, what)``:
    ``ckpt`` when set, else the BLIP-2 Q-Former and MiniGPT-4 projection files."""
    ckpt_path = resolve_path(cfg.ckpt)
    if ckpt_path:
        return [(ckpt_path, "Click4Caption checkpoint (model.ckpt)")]
    sources: list[tuple[str, str]] = []
    for key, what in (("q_former_model", "BLIP-2 Q-Former checkpoint (model.q_former_model)"),
                      ("llama_proj_ckpt", "MiniGPT-4 projection checkpoint (model.llama_proj_ckpt)")):
        path = resolve_path(getattr(cfg, key))
        if path and not path.startswith(("http://", "https://")):
            sources.append((path, what))
    return sources


def check_checkpoint_files(cfg: ModelConfig) -> None:
    """Fail fast, before the (slow) LLM load, when a checkpoint file the config names is missing.

    Raises:
        CheckpointError: naming the first missing file and what it is for.
    """
    vit_path = resolve_path(cfg.vit_ckpt)
    if vit_path:
        require_file(vit_path, VIT_WHAT)
    for path, what in checkpoint_sources(cfg):
        require_file(path, what)


def key_for(what: str) -> str:
    return what.split("(model.")[-1].rstrip(")")


def set_trainable(model: Click4Caption, cfg: ModelConfig) -> None:
    """requires_grad per freeze_* flags; frozen parts stay in eval mode (see ``train``)."""
    frozen: list[str] = []
    if cfg.freeze_vit:
        frozen.append("visual_encoder")
        # upstream unfreezes ln_vision with multi-block features or a non-224 input size
        if not cfg.use_vit_multiblock_feat and cfg.image_size == 224:
            frozen.append("ln_vision")
    if cfg.freeze_qformer:
        frozen += ["qformer", "query_tokens"]
    if cfg.freeze_llm:
        frozen.append("llama_model")
    for name, param in model.named_parameters():
        param.requires_grad = not any(name == f or name.startswith(f + ".") for f in frozen)
    model.frozen_modules = tuple(f for f in frozen if f != "query_tokens")


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu", for_training: bool = False) -> Click4Caption:
    """Build the model the config describes, load its weights, place it on ``device``.

    Raises:
        ConfigError / CheckpointError with a one-line message naming what is wrong.
    """
    if cfg.arch != "click4caption":
        registry.get("model", cfg.arch)  # raises for unknown names
    device = torch.device(device)
    llm_dtype = resolve_dtype(cfg.llm_dtype, device)
    llm_path = resolve_path(cfg.llama_model)
    if not llm_path:
        raise ConfigError("model.llama_model must name the LLM folder")
    check_checkpoint_files(cfg)
    llm, tokenizer = load_llm(llm_path, device, llm_dtype, from_scratch=cfg.llm_from_scratch,
                              low_resource=cfg.low_resource, device_8bit=cfg.device_8bit)
    model = build_skeleton(cfg, llm, tokenizer)
    load_weights(model, cfg, for_training)
    set_trainable(model, cfg)
    quantized = getattr(llm, "is_loaded_in_8bit", False)
    for name, child in model.named_children():
        if name == "llama_model" and quantized:
            continue
        child.to(device)
    model.query_tokens.data = model.query_tokens.data.to(device)
    if device.type == "cuda" and cfg.vit_precision == "fp16" and cfg.freeze_vit:
        model.visual_encoder.half()
    if not quantized:
        model.llama_model.to(device=device, dtype=llm_dtype)
    model.train(for_training)
    return model


def build_click4caption(cfg: ModelConfig, device: torch.device | str = "cpu", for_training: bool = False) -> Click4Caption:
    """Registry entry for ``arch: click4caption``."""
    return build_model(cfg, device, for_training)
