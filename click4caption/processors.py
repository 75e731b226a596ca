"""Image and text processors, by their upstream (LAVIS) names."""
from __future__ import annotations

import re
from typing import Any

import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from click4caption.config import ProcessorConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class Blip2ImageEvalProcessor:
    """Resize to ``SxS`` (bicubic, aspect ratio not kept), to tensor, CLIP-normalise.

    Boxes scale with ``S/W`` and ``S/H``, so region boxes stay valid.
    """

    def __init__(self, image_size: int = 224) -> None:
        self.image_size = image_size
        self.transform = transforms.Compose([
            transforms.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            transforms.Normalize(CLIP_MEAN, CLIP_STD),
        ])

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """PIL RGB image -> ``3xSxS`` float tensor."""
        return self.transform(image)

    @classmethod
    def from_config(cls, cfg: ProcessorConfig) -> "Blip2ImageEvalProcessor":
        return cls(image_size=cfg.image_size)


class Blip2ImageTrainProcessor(Blip2ImageEvalProcessor):
    """RandomResizedCrop(S, scale=(min_scale, max_scale), bicubic) for whole-image data."""

    def __init__(self, image_size: int = 224, min_scale: float = 0.5, max_scale: float = 1.0) -> None:
        super().__init__(image_size)
        self.transform = transforms.Compose([
            transforms.RandomResizedCrop(image_size, scale=(min_scale, max_scale),
                                         interpolation=InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            transforms.Normalize(CLIP_MEAN, CLIP_STD),
        ])

    @classmethod
    def from_config(cls, cfg: ProcessorConfig) -> "Blip2ImageTrainProcessor":
        return cls(image_size=cfg.image_size, min_scale=cfg.min_scale, max_scale=cfg.max_scale)


class BlipCaptionProcessor:
    """LAVIS caption cleaning: lower-case, ``.!"()*#:;~`` -> space, at most ``max_words`` words."""

    def __init__(self, prompt: str = "", max_words: int = 50) -> None:
        self.prompt = prompt
        self.max_words = max_words

    def __call__(self, caption: str) -> str:
        return self.prompt + self.pre_caption(caption)

    def pre_caption(self, caption: str) -> str:
        caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
        caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
        words = caption.split(" ")
        if len(words) > self.max_words:
            caption = " ".join(words[: self.max_words])
        return caption

    @classmethod
    def from_config(cls, cfg: ProcessorConfig) -> "BlipCaptionProcessor":
        return cls(prompt=cfg.prompt, max_words=cfg.max_words)


def build_processor(cfg: ProcessorConfig) -> Any:
    """Processor named by ``cfg.name`` in the registry."""
    from click4caption import registry

    return registry.get("processor", cfg.name).from_config(cfg)
