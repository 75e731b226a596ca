"""Reading the queries' "owns an object" channel: does the Q-Former count right?

With ``box_attention_owner_weight`` > 0 the first channel of each learned query's
Q-Former output is trained as the logit of "my cell owns an object" on whole-image boxes
(:mod:`click4caption.models.box_attention`), so the sum of its probabilities is the
Q-Former's own object count, before the LLM reads anything. Set beside the LLM's count
(the ``whole`` row of :func:`click4caption.shapes.scoring.score`) it tells which of the two
miscounts, and the wrong queries' distance from the grid's inner lines tells where.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import torch

from click4caption.boxes import to_model_pixels

if TYPE_CHECKING:
    from click4caption.captioner import Captioner

#: upper edges of the bins (in cells) of a wrong query's object distance from an inner grid line
BORDER_BINS = (0.05, 0.1, 0.2)


def object_corners(objects: Sequence[dict[str, Any]], width: int, height: int, image_size: int) -> torch.Tensor:
    """Scene objects of an item's ``meta`` (``box`` = ``(x, y, w, h)`` in original pixels)
    -> ``Mx2x2`` corners in model-input pixels."""
    boxes = [[x, y, x + w, y + h] for x, y, w, h in (o["box"] for o in objects)]
    return torch.tensor([to_model_pixels(b, width, height, image_size) for b in boxes], dtype=torch.float32)


def border_distance(corners: torch.Tensor, grid: int, image_size: int) -> torch.Tensor:
    """``Mx2x2`` corners -> ``M``: each centre's distance, in cells of a ``grid`` x ``grid``
    grid over the image, from the nearest inner grid line (inf when ``grid`` is 1)."""
    if grid <= 1:
        return torch.full((corners.shape[0],), math.inf)
    centres = (corners[:, 0] + corners[:, 1]) / 2 / image_size * grid  # Mx2 in cells
    lines = torch.arange(1, grid, dtype=centres.dtype)
    return (centres[..., None] - lines).abs().amin(dim=(-1, -2))


def tally(probs: torch.Tensor, owners: torch.Tensor, cell_centres: torch.Tensor, corners: torch.Tensor,
          border: torch.Tensor) -> dict[str, Any]:
    """One whole-image item.

    Args:
        probs: ``Q`` "owns an object" probabilities of the learned queries.
        owners: ``QxM`` share of each object each query owns (the training target's rule).
        cell_centres: ``Qx2`` centre of each query's cell, model pixels.
        corners: ``Mx2x2`` the objects, model pixels.
        border: ``M`` distances of :func:`border_distance`.
    Returns:
        ``count`` (M), ``said`` (the probabilities' sum) and ``wrong``: for each query whose
        probability is more than 0.5 off its target (its summed shares, at most 1), the
        border distance of its object: the one it owns most of, or for a query owning
        none, the object whose centre is nearest to its cell's.
    """
    target = owners.sum(-1).clamp(max=1.0)
    centres = (corners[:, 0] + corners[:, 1]) / 2  # Mx2
    wrong = []
    for q in ((probs - target).abs() > 0.5).nonzero().flatten().tolist():
        if target[q] > 0:
            m = int(owners[q].argmax())
        else:
            m = int(((centres - cell_centres[q]) ** 2).sum(-1).argmin())
        wrong.append(float(border[m]))
    return {"count": int(corners.shape[0]), "said": float(probs.sum()), "wrong": wrong}


def summarise(tallies: Sequence[dict[str, Any]], num_queries: int) -> dict[str, Any]:
    """Tallies -> ``n`` items, ``right`` / ``under`` / ``over`` (the rounded sum against the
    count), ``value`` (right / n), ``queries`` and ``wrong_queries``, and
    ``wrong_by_border``: wrong queries per bin of :data:`BORDER_BINS` (``"<0.05"``, ...,
    ``">=0.2"``)."""
    said = [round(t["said"]) for t in tallies]
    right = sum(s == t["count"] for s, t in zip(said, tallies))
    wrong = [d for t in tallies for d in t["wrong"]]
    edges = (0.0,) + BORDER_BINS
    bins = {f"<{hi:g}": sum(lo <= d < hi for d in wrong) for lo, hi in zip(edges, edges[1:])}
    bins[f">={BORDER_BINS[-1]:g}"] = sum(d >= BORDER_BINS[-1] for d in wrong)
    n = len(tallies)
    return {"n": n, "right": right, "value": right / n if n else 0.0,
            "under": sum(s < t["count"] for s, t in zip(said, tallies)),
            "over": sum(s > t["count"] for s, t in zip(said, tallies)),
            "queries": n * num_queries, "wrong_queries": len(wrong), "wrong_by_border": bins}


def read_owners(captioner: Captioner, items: Sequence[dict[str, Any]], grid: int, ramp: float = 0.0,
                cells: str = "even") -> dict[str, Any]:
    """The owner channel's count on the whole-image items of ``items`` (the evaluation
    items of :mod:`click4caption.shapes.scoring`, ``meta`` with ``kind`` and ``objects``),
    summarised by :func:`summarise`; ``grid`` and ``ramp`` are the model's
    ``box_attention_grid`` and ``box_attention_owner_ramp``, ``cells`` its
    ``box_attention_owner_cells`` (the wrong queries' border distance is measured from the
    even grid's lines either way). For a model trained with
    ``box_attention_owner_match`` the wrong queries are judged by the fixed rule (its
    owners followed its attention in training); its count (``value``) is read as any."""
    from PIL import Image

    from click4caption.models.box_attention import BoxAttentionAid

    model = captioner.model
    size, q = captioner.image_size, model.num_query_token
    aid = BoxAttentionAid(1.0, grid, q, model.visual_encoder.grid_size, size, "objects", owner_ramp=ramp,
                          owner_cells=cells)
    corners_of_cells = aid.whole_image_cells()
    cell_centres = (corners_of_cells[:, 0] + corners_of_cells[:, 1]) / 2
    seen: dict[str, torch.Tensor] = {}
    hook = model.qformer.register_forward_hook(
        lambda _m, _a, out: seen.__setitem__("owner", out.last_hidden_state[:, :q, 0].float()))
    tallies = []
    try:
        for item in items:
            meta = item["meta"]
            if meta["kind"] != "whole":
                continue
            with Image.open(item["image"]) as im:
                width, height = im.size
            corners = object_corners(meta["objects"], width, height, size)
            owners = aid.shared_owners(corners[None], torch.tensor([len(corners)]))[0]
            with torch.no_grad():
                captioner.encode_regions([captioner.region(item["image"], item["boxes"][0])])
            tallies.append(tally(seen["owner"][0].sigmoid(), owners, cell_centres, corners,
                                 border_distance(corners, grid, size)))
    finally:
        hook.remove()
    return summarise(tallies, q)
