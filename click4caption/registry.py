"""Name -> builder registries, as upstream YAML files name things.

Every registry is a plain dict filled in one place (:func:`_fill`, called lazily on
first lookup), so entry scripts never need star imports for their side effects.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

from click4caption.errors import ConfigError

_REGISTRIES: dict[str, dict[str, Any]] = {
    "model": {},
    "vit_variant": {},
    "processor": {},
    "dataset": {},
    "task": {},
}
_filled = False

# (registry kind, name, "module:attribute"): the one place where names are bound.
_ENTRIES: tuple[tuple[str, str, str], ...] = (
    ("model", "click4caption", "click4caption.models.builder:build_click4caption"),
    ("vit_variant", "eva_clip_g", "click4caption.models.vision:EVA_CLIP_G"),
    ("processor", "blip2_image_eval", "click4caption.processors:Blip2ImageEvalProcessor"),
    ("processor", "blip2_image_train", "click4caption.processors:Blip2ImageTrainProcessor"),
    ("processor", "blip_caption", "click4caption.processors:BlipCaptionProcessor"),
    ("dataset", "cc_sbu_align", "click4caption.data.mixing:CC_SBU_ALIGN"),
    ("dataset", "vg", "click4caption.data.vg:DATASET"),
    ("dataset", "textocr", "click4caption.data.textocr:DATASET"),
    ("dataset", "laion", "click4caption.data.laion:DATASET"),
    ("dataset", "region_instruct", "click4caption.data.region_instruct:DATASET"),
    ("task", "image_text_pretrain", "click4caption.data.mixing:IMAGE_TEXT_PRETRAIN"),
)


def _resolve(target: str) -> Any:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def _fill() -> None:
    global _filled
    if _filled:
        return
    for kind, name, target in _ENTRIES:
        _REGISTRIES[kind][name] = target  # resolved on first get()
    _filled = True


def get(kind: str, name: str) -> Any:
    """Return the object registered as ``name`` in registry ``kind``.

    Raises:
        ConfigError: naming the unknown name and the known ones.
    """
    _fill()
    table = _REGISTRIES[kind]
    if name not in table:
        known = ", ".join(sorted(table)) or "none"
        raise ConfigError(f"unknown {kind} '{name}' (known: {known})")
    value = table[name]
    if isinstance(value, str):
        value = _resolve(value)
        table[name] = value
    return value


def names(kind: str) -> list[str]:
    """All names registered in ``kind``."""
    _fill()
    return sorted(_REGISTRIES[kind])


def register(kind: str, name: str, obj: Callable[..., Any] | Any) -> None:
    """Add an entry at run time (for user extensions and tests)."""
    _fill()
    _REGISTRIES[kind][name] = obj
