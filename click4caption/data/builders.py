"""Dataset builders by their upstream names (``datasets: vg: ...`` in the YAML) and the
``image_text_pretrain`` task marker. :mod:`click4caption.registry` points here.

A builder takes its ``datasets.<name>`` section; :meth:`DatasetBuilder.build` returns
a batch source (see :mod:`click4caption.data.base`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from click4caption.config import DatasetConfig
from click4caption.data.base import BatchSource, processor_config
from click4caption.errors import ConfigError
from click4caption.processors import build_processor

DEFAULT_IMAGE_SIZE = 224


class DatasetBuilder:
    """Builds one training dataset from its config section."""

    #: default name in ``datasets:``
    default_name: str = ""
    #: the recipe's image transform for this data
    default_vis_processor: str = "blip2_image_eval"
    #: keys of ``datasets.<name>`` this data does not read, and why (reported when set)
    unused_keys: dict[str, str] = {}

    def __init__(self, config: DatasetConfig | None = None, name: str | None = None) -> None:
        self.config = config if config is not None else DatasetConfig()
        self.name = name or self.default_name

    def build_vis_processor(self, split: str = "train", image_size: int = DEFAULT_IMAGE_SIZE) -> Any:
        """The configured image transform of ``split`` (``train`` or ``eval``)."""
        splits = self.config.vis_processor
        proc = getattr(splits, split, None) if splits is not None else None
        if proc is None:
            proc = processor_config(self.config, "vis_processor", self.default_vis_processor, image_size)
        return build_processor(proc)

    def build(self, batch_size: int, image_size: int = DEFAULT_IMAGE_SIZE) -> BatchSource:
        """The training batch source. ``image_size`` is the model's input side (the
        default transform size when the config names no vis_processor)."""
        return self._build_fn()(self.config, self.name, batch_size, image_size)

    def build_datasets(self, batch_size: int = 1, image_size: int = DEFAULT_IMAGE_SIZE) -> dict[str, BatchSource]:
        """Upstream's spelling: ``{"train": source}``."""
        return {"train": self.build(batch_size, image_size)}

    def _build_fn(self) -> Callable[..., BatchSource]:
        raise NotImplementedError


class VisualGenomeBuilder(DatasetBuilder):
    """``vg``: Visual Genome v1.2 region descriptions."""

    default_name = "vg"
    unused_keys = {"text_processor": "phrases are capitalised and end with '.', upstream's VG rule",
                   "shuffle_buffer": "a LAION setting"}

    def _build_fn(self) -> Callable[..., BatchSource]:
        from click4caption.data.vg import build_visual_genome
        return build_visual_genome


class TextOCRBuilder(DatasetBuilder):
    """``textocr``: TextOCR 0.1 words."""

    default_name = "textocr"
    unused_keys = {"text_processor": "words are used as written, as upstream", "shuffle_buffer": "a LAION setting"}

    def _build_fn(self) -> Callable[..., BatchSource]:
        from click4caption.data.textocr import build_textocr
        return build_textocr


class LaionBuilder(DatasetBuilder):
    """``laion``: webdataset shards of captioned images."""

    default_name = "laion"
    default_vis_processor = "blip2_image_train"
    unused_keys = {"num_regions": "LAION images are captioned whole (one near-full box each)"}

    def _build_fn(self) -> Callable[..., BatchSource]:
        from click4caption.data.laion import build_laion
        return build_laion


class RegionInstructBuilder(DatasetBuilder):
    """``region_instruct``: LLaVA-style conversations about boxed regions."""

    default_name = "region_instruct"
    unused_keys = {"text_processor": "conversations are used as written", "num_regions": "each record has its own boxes",
                   "shuffle_buffer": "a LAION setting"}

    def _build_fn(self) -> Callable[..., BatchSource]:
        from click4caption.data.region_instruct import build_region_instruct
        return build_region_instruct


class CCSBUAlignBuilder(DatasetBuilder):
    """``cc_sbu_align``: eval configs name it only for its ``vis_processor``."""

    default_name = "cc_sbu_align"

    def _build_fn(self) -> Callable[..., BatchSource]:
        raise ConfigError("datasets.cc_sbu_align is only used for its vis_processor (eval configs); "
                          "training on it is not supported: use vg, textocr, laion or region_instruct")


@dataclass(frozen=True)
class Task:
    """A training task named by ``run.task``."""

    name: str
    description: str


IMAGE_TEXT_PRETRAIN = Task(
    "image_text_pretrain",
    "captioning loss on region captions, whole-image captions and region instructions, "
    "datasets mixed by sample_ratio",
)
