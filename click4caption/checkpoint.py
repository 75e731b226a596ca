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
from typing import Any, Iterable, Mapping, Sequence

import torch

from click4caption.errors import CheckpointError
from click4caption.paths import missing_file_hint

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

_COMPILED_MAP = [(re.compile(p), r) for p, r in KEY_MAP]
_COMPILED_IGNORED = [(re.compile(p), why) for p, why in IGNORED]


@dataclass(frozen=True)
class WeightSource:
    """A weight file named by a ``model:`` key: what it is and which model tensors it feeds."""

    key: str                           # the config key naming the file
    what: str                          # what the file is, for messages
    vit: bool = False                  # a plain ViT state dict (timm names, no prefix)
    parts: tuple[str, ...] | None = None  # model key prefixes taken from it (None: all it has)

    @property
    def label(self) -> str:
        return f"{self.what} (model.{self.key})"


#: every file a model config can name, in reading order; later files override earlier ones
WEIGHT_SOURCES: tuple[WeightSource, ...] = (
    WeightSource("vit_ckpt", "ViT checkpoint", vit=True, parts=("visual_encoder.",)),
    WeightSource("q_former_model", "BLIP-2 Q-Former checkpoint", parts=("qformer.", "query_tokens", "ln_vision.")),
    WeightSource("llama_proj_ckpt", "MiniGPT-4 projection checkpoint", parts=("llama_proj.",)),
    WeightSource("ckpt", "Click4Caption checkpoint"),
)
#: training initialisations that a trained checkpoint (``ckpt``) replaces
REPLACED_BY_CKPT = ("q_former_model", "llama_proj_ckpt")


def weight_files(paths: Mapping[str, str | None]) -> list[tuple[WeightSource, str]]:
    """The files to read, in order, as ``(source, path)``, from ``{config key: path}``:
    the ViT's; then ``ckpt`` when set, else the BLIP-2 Q-Former and the MiniGPT-4
    projection. Unset keys and URLs (upstream's defaults) are skipped."""
    skip = REPLACED_BY_CKPT if paths.get("ckpt") else ()
    out = []
    for source in WEIGHT_SOURCES:
        path = paths.get(source.key)
        if path and source.key not in skip and not str(path).startswith(("http://", "https://")):
            out.append((source, str(path)))
    return out


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


def require_file(path: str | Path, what: str) -> Path:
    """``path`` as a ``Path`` if it is a file.

    Raises:
        CheckpointError: naming the file, what it is for and where to get it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path} ({missing_file_hint(path)})")
    return path


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


def to_file_key(model_key: str, source: WeightSource) -> str:
    """How ``source``'s file spells a model tensor (the inverse of :func:`file_key_to_model_key`)."""
    if source.vit:
        return model_key[len("visual_encoder."):] if model_key.startswith("visual_encoder.") else model_key
    return next(iter(to_upstream_state_dict({model_key: None})))


def file_key_to_model_key(file_key: str, source: WeightSource) -> tuple[str | None, str]:
    """One key of ``source``'s file -> ``(model key, "")``, or ``(None, why it is not used)``."""
    if source.vit:
        name = "visual_encoder." + file_key
    else:
        name = rename_upstream_key(file_key)
        if name is None:
            return None, next(why for p, why in _COMPILED_IGNORED if p.search(file_key))
    if source.parts is not None and not name.startswith(source.parts):
        return None, f"not a part this model takes from the {source.what}"
    return name, ""


# ----------------------------------------------------------------------------- reading files
class TensorFile:
    """A checkpoint file read lazily: key names and shapes first, tensor data when asked.

    ``.pth`` files are opened with ``torch.load(weights_only=True, mmap=True)`` (data is
    paged in on use) and unwrapped (``{'model': ...}``); ``.safetensors`` headers are read
    with ``safe_open``.

    Raises:
        CheckpointError: naming the file and what it is for when missing or unreadable.
    """

    def __init__(self, path: str | Path, what: str) -> None:
        self.path = require_file(path, what)
        self.what = what
        self._safe: Any = None
        self._state: dict[str, Tensor] = {}
        try:
            if self.path.suffix == ".safetensors":
                from safetensors import safe_open

                self._safe = safe_open(str(self.path), framework="pt", device="cpu")
                self.shapes = {k: tuple(self._safe.get_slice(k).get_shape()) for k in self._safe.keys()}
            else:
                try:
                    obj = torch.load(str(self.path), map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as err:  # files in the legacy (non-zip) format cannot be mapped
                    if "mmap" not in str(err):
                        raise
                    obj = torch.load(str(self.path), map_location="cpu", weights_only=True)
                self._state = {k: v for k, v in unwrap(obj).items() if isinstance(v, torch.Tensor)}
                self.shapes = {k: tuple(v.shape) for k, v in self._state.items()}
        except CheckpointError:
            raise
        except Exception as err:
            msg = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise CheckpointError(f"cannot read {what} {self.path}: {msg}") from None

    def tensor(self, key: str) -> Tensor:
        return self._safe.get_tensor(key) if self._safe is not None else self._state[key]

    def state_dict(self) -> dict[str, Tensor]:
        return {k: self.tensor(k) for k in self.shapes}


def read_state_dict(path: str | Path, what: str) -> dict[str, Tensor]:
    """Every tensor of a ``.pth`` (``weights_only=True``) or ``.safetensors`` file, unwrapped."""
    return TensorFile(path, what).state_dict()


# ----------------------------------------------------------------------------- key plans
@dataclass
class KeyPlan:
    """What one file gives the model, decided from key names and shapes alone (no data).

    ``names`` maps model keys to the file's keys; everything else in the file is in
    ``ignored`` (with why), ``unexpected`` or ``mismatched`` (the file's spelling)."""

    source: WeightSource
    path: str
    names: dict[str, str] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)


def plan_keys(file_shapes: Mapping[str, Sequence[int]], source: WeightSource, path: str,
              model_shapes: Mapping[str, Sequence[int]]) -> KeyPlan:
    """Match a file's keys and shapes to the model's (a pure function of names and shapes).

    A ViT position embedding of another grid size is accepted (it is resampled on load).
    """
    plan = KeyPlan(source, path)
    for file_key, shape in file_shapes.items():
        name, why = file_key_to_model_key(file_key, source)
        if name is None:
            plan.ignored[file_key] = why
        elif name not in model_shapes:
            plan.unexpected.append(file_key)
        elif tuple(shape) != tuple(model_shapes[name]):
            if name == "visual_encoder.pos_embed" and len(shape) == 3 and shape[-1] == model_shapes[name][-1]:
                plan.names[name] = file_key
                plan.resized.append(name)
            else:
                plan.mismatched.append((file_key, tuple(shape), tuple(model_shapes[name])))
        else:
            plan.names[name] = file_key
    return plan


def check_plan(plan: KeyPlan) -> None:
    """Report a plan: what loads, what is skipped and why, what matches nothing.

    Raises:
        CheckpointError: a tensor has another shape than the model's, named as the file spells it.
    """
    where = f"{plan.source.label} {plan.path}"
    if plan.mismatched:
        details = "; ".join(f"{k} is {list(a)}, the model needs {list(b)}" for k, a, b in plan.mismatched[:4])
        more = f" (and {len(plan.mismatched) - 4} more)" if len(plan.mismatched) > 4 else ""
        raise CheckpointError(f"{where}: {len(plan.mismatched)} tensor(s) have the wrong shape: {details}{more}")
    logger.info("%s: %d tensors to load", where, len(plan.names))
    if plan.ignored:
        reasons: dict[str, list[str]] = defaultdict(list)
        for key, why in plan.ignored.items():
            reasons[why].append(key)
        for why, keys in reasons.items():
            logger.info("%s: %d keys not used (%s): %s", where, len(keys), why, summarize_keys(keys, limit=8))
    if plan.unexpected:
        logger.warning("%s: %d keys match nothing in the model and are not loaded: %s", where,
                       len(plan.unexpected), summarize_keys(plan.unexpected))


def missing_keys_error(model_shapes: Mapping[str, object], plans: Sequence[KeyPlan],
                       skip_prefixes: tuple[str, ...] = ()) -> CheckpointError | None:
    """The error for model tensors no file provides (None when every one is provided).

    Each missing tensor is named as the file that should hold it spells it: the last
    file read that is meant for its part (the ViT's file for the ViT), else the trained
    checkpoint, which may hold any part.
    """
    covered = {name for plan in plans for name in plan.names}
    missing = [k for k in model_shapes if k not in covered and not k.startswith(skip_prefixes)]
    if not missing:
        return None
    by_plan: dict[int, list[str]] = defaultdict(list)
    orphans: list[str] = []
    for key in missing:
        meant = [i for i, p in enumerate(plans) if p.source.parts is not None and key.startswith(p.source.parts)]
        owners = meant or [i for i, p in enumerate(plans) if p.source.parts is None]
        if owners:
            by_plan[owners[-1]].append(key)
        else:
            orphans.append(key)
    parts = []
    for i, keys in by_plan.items():
        plan = plans[i]
        names = summarize_keys([to_file_key(k, plan.source) for k in keys], limit=8)
        parts.append(f"{plan.path} ({plan.source.label}) lacks {len(keys)} tensor(s) the model needs: {names}")
    if orphans:
        parts.append(f"{len(orphans)} model tensors are in no checkpoint: {summarize_keys(orphans, limit=8)} "
                     f"(set model.ckpt to a trained Click4Caption checkpoint)")
    return CheckpointError("; ".join(parts))


def state_from_plan(plan: KeyPlan, tensors: TensorFile, model_shapes: Mapping[str, Sequence[int]]
                    ) -> dict[str, Tensor]:
    """The planned tensors under model names (a ViT position embedding resampled when needed)."""
    state = {name: tensors.tensor(file_key) for name, file_key in plan.names.items()}
    for name in plan.resized:
        num_patches = int(model_shapes[name][1]) - 1
        state[name] = resize_pos_embed(state[name], num_patches)
    return state
