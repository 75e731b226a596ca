"""Reading the image tokens' "an object's centre lies here" channel: do the tokens count right?

With ``object_centre_weight`` > 0 the first channel of each image token (before the image
PE) is trained as the logit of "an object's centre lies in this patch"
(:mod:`click4caption.models.object_centres`). Its peaks are the ViT's own object count,
before the Q-Former reads anything; set beside the owner channel's count
(:mod:`click4caption.shapes.owners`) and the LLM's, it tells which stage loses an object.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

if TYPE_CHECKING:
    from click4caption.captioner import Captioner

#: a patch is a centre when its probability is above this and no 3 x 3 neighbour's is higher
CENTRE_THRESHOLD = 0.5


def count_centres(probs: torch.Tensor, threshold: float = CENTRE_THRESHOLD) -> int:
    """``HxW`` centre probabilities -> the number of peaks: patches above ``threshold``
    that are the maximum of their 3 x 3 neighbourhood (a tie counts once per patch)."""
    peaks = nn.functional.max_pool2d(probs[None, None], kernel_size=3, stride=1, padding=1)[0, 0]
    return int(((probs >= peaks) & (probs > threshold)).sum())


def summarise(said: Sequence[int], counts: Sequence[int]) -> dict[str, Any]:
    """Peaks and true counts of whole images -> ``n``, ``right``, ``under``, ``over`` and
    ``value`` (right / n)."""
    n = len(counts)
    right = sum(s == c for s, c in zip(said, counts))
    return {"n": n, "right": right, "value": right / n if n else 0.0,
            "under": sum(s < c for s, c in zip(said, counts)), "over": sum(s > c for s, c in zip(said, counts))}


def read_centres(captioner: Captioner, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The centre channel's count on the whole-image items of ``items`` (evaluation items
    of :mod:`click4caption.shapes.scoring`, ``meta`` with ``kind`` and ``objects``),
    summarised by :func:`summarise`."""
    from click4caption.images import load_image
    from click4caption.models.object_centres import centre_probabilities

    model = captioner.model
    said, counts = [], []
    for item in items:
        meta = item["meta"]
        if meta["kind"] != "whole":
            continue
        pixels = captioner.vis_processor(load_image(item["image"]))[None].to(model.device)
        with torch.no_grad():
            probs = centre_probabilities(model.image_tokens(pixels), model.visual_encoder.grid_size)[0]
        said.append(count_centres(probs))
        counts.append(len(meta["objects"]))
    return summarise(said, counts)
