"""Checkpoint reading and conversion from upstream names.

Conversion is a set of pure functions ``state_dict -> state_dict`` driven by a
declarative key map; loading then checks every key against the model and reports by
name whatever did not match. Nothing is dropped silently.
"""
from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch

from click4caption.errors import CheckpointError

logger = logging.getLogger(__name__)

Tensor = torch.Tensor

# upstream (LAVIS / Click4Caption) name -> this project's name; first match wins.
KEY_MAP: tuple[tuple[str, str], ...] = (
    (r"^Qformer\.bert\.embeddings\.LayerNorm\.(weight|bias)$", r"qformer.layernorm.\1"),
    (r"^Qformer\.bert\.encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.(weight|bias)$",
     r"qformer.encoder.layer.\1.attention.attention.\2.\3"),
    (r"^Qformer\.bert\.encoder\.layer\.(\d+)\.crossattention\.self\.(query|key|value)\.(weight|bias)$",
     r"qformer.encoder.layer.\1.crossattention.attention.\2.\3"),
    (r"^Qformer\.bert\.encoder\.layer\.(\d+)\.(attention\.output|crossattention\.output|intermediate_query|output_query)\.(.+)$",
     r"qformer.encoder.layer.\1.\2.\3"),
    (r"^coordinate_pe_layer\.positional_encoding_gaussian_matrix$",
     r"prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"),
    (r"^coordinate_type_emb\.([01])\.weight$", r"prompt_encoder.corner_type_emb.\1.weight"),
    (r"^img_embs_pe_proj\.(weight|bias)$", r"prompt_encoder.image_pe_proj.\1"),
)

# upstream keys this model deliberately does not use, with the reason.
IGNORED: tuple[tuple[str, str], ...] = (
    (r"^Qformer\.bert\.embeddings\.position_ids$", "position ids of the unused text branch"),
    (r"^Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings)\.", "Q-Former text branch (unused)"),
    (r"^Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.", "Q-Former text FFN (unused)"),
    (r"^Qformer\.cls\.", "Q-Former text LM head (unused)"),
    (r"\.rotary_emb\.inv_freq$", "deterministic RoPE buffer (recomputed by transformers)"),
)

# where the shipped shapes model lives (built by ``make shapes-model``, never downloaded)
SHIPPED_MODEL_DIR = "models/shapes"

_COMPILED_MAP = [(re.compile(p), r) for p, r in KEY_MAP]
_COMPILED_IGNORED = [(re.compile(p), why) for p, why in IGNORED]


@dataclass
class LoadReport:
    """What a checkpoint contributed to a model."""

    source: str
    loaded: list[str] = field(default_factory=list)
    ignored: dict[str, str] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)


def summarize_keys(keys: Iterable[str], limit: int = 40) -> str:
    """Names with layer numbers folded: ``a.{0..11}.b`` (for readable reports)."""
    groups: dict[str, list[int]] = defaultdict(list)
    loose: list[str] = []
    for k in keys:
        m = re.search(r"\.(\d+)\.", k)
        if m:
            groups[k[: m.start()] + ".{}." + k[m.end():]].append(int(m.group(1)))
        else:
            loose.append(k)
    parts = []
    for pattern, nums in groups.items():
        nums = sorted(set(nums))
        if len(nums) == 1:  # a single key keeps its literal name
            parts.append(pattern.replace("{}", str(nums[0])))
            continue
        label = f"{nums[0]}..{nums[-1]}" if nums == list(range(nums[0], nums[-1] + 1)) else ",".join(map(str, nums))
        parts.append(pattern.replace("{}", "{" + label + "}"))
    parts.extend(loose)
    parts.sort()
    if len(parts) > limit:
        parts = parts[:limit] + [f"... ({len(parts) - limit} more)"]
    return ", ".join(parts)


def unwrap(obj: object) -> dict[str, Tensor]:
    """``{'model': sd}`` / ``{'state_dict': sd}`` / ``sd`` -> ``sd``."""
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and all(isinstance(k, str) for k in inner):
                return dict(inner)
        return dict(obj)
    raise CheckpointError(f"unexpected checkpoint content of type {type(obj).__name__}")


def rename_upstream_key(key: str) -> str | None:
    """One upstream key -> this project's name; ``None`` for a deliberately unused key.

    Keys already in this project's naming pass through unchanged.
    """
    for pattern, why in _COMPILED_IGNORED:
        if pattern.search(key):
            return None
    for pattern, repl in _COMPILED_MAP:
        if pattern.match(key):
            return pattern.sub(repl, key)
    return key


def convert_upstream_state_dict(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Rename a Click4Caption / BLIP-2 ``'model'`` dict to this project's names.

    Returns:
        ``(renamed, ignored)`` where ``ignored`` maps each unused upstream key to why.
    """
    out: dict[str, Tensor] = {}
    ignored: dict[str, str] = {}
    for key, value in state.items():
        new = rename_upstream_key(key)
        if new is None:
            ignored[key] = next(why for p, why in _COMPILED_IGNORED if p.search(key))
        else:
            out[new] = value
    return out, ignored


def convert_vit_state_dict(state: Mapping[str, Tensor], prefix: str = "visual_encoder.") -> dict[str, Tensor]:
    """``eva_vit_g.pth`` (timm names, no prefix) -> model names under ``prefix``."""
    return {prefix + k: v for k, v in state.items()}


def resize_pos_embed(pos_embed: Tensor, num_patches: int, num_prefix: int = 1) -> Tensor:
    """Bicubic resampling of an absolute position embedding ``1x(P+N)xC`` to ``num_patches``."""
    from timm.layers import resample_abs_pos_embed

    old = int(round((pos_embed.shape[1] - num_prefix) ** 0.5))
    new = int(round(num_patches ** 0.5))
    if old == new:
        return pos_embed
    logger.info("resampling ViT position embedding from %dx%d to %dx%d", old, old, new, new)
    return resample_abs_pos_embed(pos_embed.float(), new_size=(new, new), old_size=(old, old),
                                  num_prefix_tokens=num_prefix).to(pos_embed.dtype)


def match_to_model(
    state: Mapping[str, Tensor], model_shapes: Mapping[str, torch.Size], source: str
) -> tuple[dict[str, Tensor], LoadReport]:
    """Keep the keys the model has with the right shape; report the rest by name."""
    report = LoadReport(source=source)
    keep: dict[str, Tensor] = {}
    for key, value in state.items():
        if key not in model_shapes:
            report.unexpected.append(key)
        elif tuple(value.shape) != tuple(model_shapes[key]):
            report.mismatched.append((key, tuple(value.shape), tuple(model_shapes[key])))
        else:
            keep[key] = value
            report.loaded.append(key)
    return keep, report


def require_file(path: str | Path, what: str) -> Path:
    """``path`` as a ``Path`` if it is a file.

    Raises:
        CheckpointError: naming the file, what it is for and where to get it.
    """
    path = Path(path)
    if not path.is_file():
        if SHIPPED_MODEL_DIR in path.as_posix():
            hint = "the shipped shapes model is rebuilt with `make shapes-model`"
        else:
            hint = "download it and put it there; see cached_model/README.md"
        raise CheckpointError(f"{what} not found: {path} ({hint})")
    return path


def required_keys_check(model_shapes: Mapping[str, object], covered: Iterable[str],
                        skip_prefixes: tuple[str, ...] = ()) -> None:
    """Every model tensor (except those under ``skip_prefixes``) must come from some file.

    Raises:
        CheckpointError: naming the tensors that no checkpoint provided.
    """
    covered = set(covered)
    missing = sorted(k for k in model_shapes if k not in covered and not k.startswith(skip_prefixes))
    if missing:
        raise CheckpointError(
            f"{len(missing)} model tensors are in no checkpoint: {summarize_keys(missing, limit=8)} "
            f"(set model.ckpt to a trained Click4Caption checkpoint)")


def read_state_dict(path: str | Path, what: str) -> dict[str, Tensor]:
    """Read a ``.pth`` (``weights_only=True``) or ``.safetensors`` file and unwrap it.

    Raises:
        CheckpointError: naming the file and what it is for when missing or unreadable.
    """
    path = require_file(path, what)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return unwrap(torch.load(str(path), map_location="cpu", weights_only=True))
    except CheckpointError:
        raise
    except Exception as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"cannot read {what} {path}: {msg}") from None


def log_report(report: LoadReport) -> None:
    logger.info("%s: loaded %d tensors", report.source, len(report.loaded))
    if report.ignored:
        logger.info("%s: %d unused upstream keys skipped: %s", report.source, len(report.ignored),
                    summarize_keys(report.ignored))
    if report.unexpected:
        logger.warning("%s: %d keys match nothing in the model: %s", report.source, len(report.unexpected),
                       summarize_keys(report.unexpected))
    if report.mismatched:
        details = "; ".join(f"{k} {a} vs model {b}" for k, a, b in report.mismatched[:10])
        raise CheckpointError(f"{report.source}: {len(report.mismatched)} tensors have the wrong shape: {details}")


# this project's name -> upstream name (the inverse of KEY_MAP), for exporting
# checkpoints that upstream code can read.
REVERSE_KEY_MAP: tuple[tuple[str, str], ...] = (
    (r"^qformer\.layernorm\.(weight|bias)$", r"Qformer.bert.embeddings.LayerNorm.\1"),
    (r"^qformer\.encoder\.layer\.(\d+)\.attention\.attention\.(.+)$", r"Qformer.bert.encoder.layer.\1.attention.self.\2"),
    (r"^qformer\.encoder\.layer\.(\d+)\.crossattention\.attention\.(.+)$",
     r"Qformer.bert.encoder.layer.\1.crossattention.self.\2"),
    (r"^qformer\.encoder\.layer\.(\d+)\.(.+)$", r"Qformer.bert.encoder.layer.\1.\2"),
    (r"^prompt_encoder\.pe_layer\.positional_encoding_gaussian_matrix$",
     r"coordinate_pe_layer.positional_encoding_gaussian_matrix"),
    (r"^prompt_encoder\.corner_type_emb\.([01])\.weight$", r"coordinate_type_emb.\1.weight"),
    (r"^prompt_encoder\.image_pe_proj\.(weight|bias)$", r"img_embs_pe_proj.\1"),
)
_COMPILED_REVERSE = [(re.compile(p), r) for p, r in REVERSE_KEY_MAP]


def to_upstream_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """This project's names -> upstream Click4Caption names (inverse of
    :func:`convert_upstream_state_dict` on the keys both know)."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        for pattern, repl in _COMPILED_REVERSE:
            if pattern.match(key):
                key = pattern.sub(repl, key)
                break
        out[key] = value
    return out
