"""Builds a :class:`Click4Caption` from the ``model:`` config: compose the parts, load the
files, place the model.

Component sizes come from a named variant (``vit_model: eva_clip_g``) or from the config
(``vit_model: custom`` + ``vit:``), so tests, the shipped shapes model and the real model
share one code path. Which file feeds which tensors is data in
:data:`click4caption.checkpoint.WEIGHT_SOURCES`.

Loading checks before it loads: every file is opened lazily and its key names and shapes
are matched against the model's (built on the meta device: no memory, no random numbers),
and the LLM folder's weight headers against its ``config.json``; a wrong shape, a missing
tensor or an LLM tensor too many is an error naming the key as the file spells it, raised
before the slow loads. Parts whose weights all come from files are then built on the
meta device and loaded with ``assign`` (the 1-billion-parameter ViT is never initialised
at random just to be overwritten).
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import torch
from torch import nn

from click4caption import registry
from click4caption.checkpoint import (
    KeyPlan, TensorFile, check_plan, missing_keys_error, plan_keys, require_file, state_from_plan, summarize_keys,
    weight_files,
)
from click4caption.config import ModelConfig, ViTSize
from click4caption.errors import CheckpointError, ConfigError
from click4caption.models.box_attention import ATTN_IMPLEMENTATION, BoxAttentionAid
from click4caption.models.click4caption import Click4Caption
from click4caption.models.llm import build_llm_skeleton, check_llm_weights, load_llm, read_llm_config, resolve_dtype
from click4caption.models.prompt_encoder import PromptEncoder
from click4caption.models.qformer import build_qformer, init_query_tokens
from click4caption.models.vision import VisionEncoder
from click4caption.paths import resolve_path
from click4caption.prompts import load_training_prompts
from click4caption.tokenizer import TextTokenizer, load_tokenizer

logger = logging.getLogger(__name__)

#: the parts built here, by their attribute names in the model (the LLM is loaded apart)
PARTS = ("visual_encoder", "ln_vision", "qformer", "query_tokens", "prompt_encoder", "llama_proj")


def vit_variant(cfg: ModelConfig) -> ViTSize:
    """The ViT sizes: a registered variant, or ``vit:`` when ``vit_model: custom``."""
    if cfg.vit_model == "custom":
        if cfg.vit is None:
            raise ConfigError("model.vit_model is 'custom' but model.vit (sizes) is not set")
        return cfg.vit
    if cfg.vit is not None:
        raise ConfigError(f"model.vit sizes are given but vit_model is '{cfg.vit_model}'; "
                          "use vit_model: custom to set sizes")
    return registry.get("vit_variant", cfg.vit_model)


def part_builders(cfg: ModelConfig, llm_width: int) -> dict[str, Callable[[], nn.Module | nn.Parameter]]:
    """One builder per part: ``{attribute name: () -> built part}``."""
    variant = vit_variant(cfg)
    if cfg.image_size % variant.patch_size:
        raise ConfigError(f"model.image_size {cfg.image_size} is not a multiple of the patch size {variant.patch_size}")
    d = cfg.qformer.hidden_size
    attn = ATTN_IMPLEMENTATION if cfg.box_attention_loss_weight > 0 else "sdpa"
    return {
        "visual_encoder": lambda: VisionEncoder(variant, cfg.image_size, cfg.use_vit_multiblock_feat,
                                                cfg.drop_path_rate, cfg.use_grad_checkpoint),
        "ln_vision": lambda: nn.LayerNorm(variant.embed_dim),  # eps 1e-5, as LAVIS
        "qformer": lambda: build_qformer(cfg.qformer, variant.embed_dim, attn_implementation=attn),
        "query_tokens": lambda: init_query_tokens(cfg.num_query_token, d),
        "prompt_encoder": lambda: PromptEncoder(d, variant.embed_dim, cfg.image_size, cfg.add_img_pe),
        "llama_proj": lambda: nn.Linear(d, llm_width),
    }


def compose(cfg: ModelConfig, llm: nn.Module, tokenizer: TextTokenizer | None,
            meta_parts: frozenset[str] = frozenset(PARTS)) -> Click4Caption:
    """The model around an LLM, its parts built on the meta device when named in
    ``meta_parts`` (their weights come from files) and initialised otherwise."""
    builders = part_builders(cfg, llm.config.hidden_size)
    parts = {}
    for name, build in builders.items():
        with torch.device("meta" if name in meta_parts else "cpu"):
            parts[name] = build()
    aid = None
    if cfg.box_attention_loss_weight > 0:
        aid = BoxAttentionAid(cfg.box_attention_loss_weight, cfg.box_attention_grid, cfg.num_query_token,
                              parts["visual_encoder"].grid_size, cfg.image_size,
                              cfg.box_attention_whole_image, cfg.box_attention_owner_weight,
                              cfg.box_attention_object_layers,
                              cfg.box_attention_owner_count_weight,
                              cfg.box_attention_owner_ramp,
                              cfg.box_attention_owner_match,
                              cfg.box_attention_owner_focal,
                              cfg.box_attention_owner_cells).attach(parts["qformer"])
    return Click4Caption(**parts, llama_model=llm, llama_tokenizer=tokenizer, image_size=cfg.image_size,
                         delete_vit_cls_token=cfg.delete_vit_cls_token, add_img_pe=cfg.add_img_pe,
                         max_txt_len=cfg.max_txt_len, end_sym=cfg.end_sym, prompt_list=training_prompts(cfg),
                         box_attention=aid, object_centre_weight=cfg.object_centre_weight)


def training_prompts(cfg: ModelConfig) -> list[str]:
    """Upstream's training prompts from ``prompt_path`` / ``prompt_template`` (none when unset)."""
    if not cfg.prompt_path:
        if cfg.prompt_template:
            logger.warning("model.prompt_template is set but model.prompt_path is not: no training prompt is "
                           "used (upstream reads the template only with a prompt file)")
        return []
    return load_training_prompts(resolve_path(cfg.prompt_path), cfg.prompt_template)


def config_paths(cfg: ModelConfig) -> dict[str, str | None]:
    """``{config key: resolved path}`` of every weight file key."""
    return {key: resolve_path(getattr(cfg, key)) for key in ("vit_ckpt", "q_former_model", "llama_proj_ckpt", "ckpt")}


def plan_weights(cfg: ModelConfig, model_shapes: dict[str, torch.Size], for_training: bool
                 ) -> list[tuple[KeyPlan, TensorFile]]:
    """Open every weight file the config names and match its keys and shapes to the model.

    Raises:
        CheckpointError: a file is missing or unreadable, a shape differs, or (for
            inference) a model tensor is in no file; names as the files spell them.
    """
    planned: list[tuple[KeyPlan, TensorFile]] = []
    for source, path in weight_files(config_paths(cfg)):
        tensors = TensorFile(path, source.label)
        plan = plan_keys(tensors.shapes, source, path, model_shapes)
        check_plan(plan)
        planned.append((plan, tensors))
    plans = [p for p, _ in planned]
    llm_prefix = ("llama_model.",)
    if for_training:
        covered = {k for p in plans for k in p.names}
        fresh = [k for k in model_shapes if k not in covered and not k.startswith(llm_prefix)]
        if fresh:
            logger.info("initialised randomly (no checkpoint provides them): %s", summarize_keys(fresh))
    else:
        error = missing_keys_error(model_shapes, plans, skip_prefixes=llm_prefix)
        if error is not None:
            raise error
    return planned


def covered_parts(model_shapes: dict[str, torch.Size], plans: list[KeyPlan]) -> frozenset[str]:
    """Parts whose every tensor comes from a file."""
    covered = {k for p in plans for k in p.names}
    return frozenset(part for part in PARTS
                     if all(k in covered for k in model_shapes if k == part or k.startswith(part + ".")))


def load_planned(model: Click4Caption, planned: list[tuple[KeyPlan, TensorFile]]) -> None:
    """Load every planned file, in order, with ``assign`` (meta parts get the file's tensors)."""
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    for plan, tensors in planned:
        state = state_from_plan(plan, tensors, shapes)
        result = model.load_state_dict(state, strict=False, assign=True)
        if result.unexpected_keys:  # cannot happen after plan_keys; guard anyway
            raise CheckpointError(f"{plan.path}: unexpected keys {summarize_keys(result.unexpected_keys)}")
    model.visual_encoder.init_non_persistent_buffers()
    for name in PARTS:  # files may hold half-precision tensors; the parts compute in fp32
        part = getattr(model, name)
        if isinstance(part, nn.Parameter):
            part.data = part.data.float()
        else:
            part.float()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"no file provided {summarize_keys(left, limit=8)}")


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu", for_training: bool = False) -> Click4Caption:
    """Build the model the config describes, load its weights, place it on ``device``.

    Freezing is the trainer's (:func:`click4caption.training.freezing.frozen_parts`).

    Raises:
        ConfigError / CheckpointError with a one-line message naming what is wrong.
    """
    start = time.perf_counter()
    if cfg.arch != "click4caption":
        registry.get("model", cfg.arch)  # raises for unknown names
    device = torch.device(device)
    llm_dtype = resolve_dtype(cfg.llm_dtype, device)
    llm_path = resolve_path(cfg.llama_model)
    if not llm_path:
        raise ConfigError("model.llama_model must name the LLM folder")
    for source, path in weight_files(config_paths(cfg)):  # every named file exists, before any reading
        require_file(path, source.label)
    llm_config = read_llm_config(llm_path)
    tokenizer = load_tokenizer(llm_path)

    # the plan: names and shapes only
    skeleton = compose(cfg, build_llm_skeleton(llm_config), tokenizer)
    shapes = {k: v.shape for k, v in skeleton.state_dict().items()}
    planned = plan_weights(cfg, shapes, for_training)
    if not cfg.llm_from_scratch:
        check_llm_weights(llm_path, skeleton.llama_model)
    meta_parts = covered_parts(shapes, [p for p, _ in planned])
    del skeleton

    # the loads
    llm = load_llm(llm_path, llm_config, device, llm_dtype, from_scratch=cfg.llm_from_scratch,
                   low_resource=cfg.low_resource, device_8bit=cfg.device_8bit)
    model = compose(cfg, llm, tokenizer, meta_parts)
    load_planned(model, planned)
    vit_half = device.type == "cuda" and cfg.vit_precision == "fp16" and cfg.freeze_vit
    model.place(device, vit_dtype=torch.float16 if vit_half else None, llm_dtype=llm_dtype)
    model.train(for_training)
    logger.info("model built in %.1f s (%s from files on the meta device)", time.perf_counter() - start,
                ", ".join(sorted(meta_parts)) or "no part")
    return model


def build_click4caption(cfg: ModelConfig, device: torch.device | str = "cpu", for_training: bool = False
                        ) -> Click4Caption:
    """Registry entry for ``arch: click4caption``."""
    return build_model(cfg, device, for_training)

