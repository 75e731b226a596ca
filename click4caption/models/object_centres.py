"""A training aid for models trained from scratch: make the image tokens mark where each
object's centre lies.

The shapes model undercounts whole images whose nearest two objects stand less than one
ViT patch apart (models/shapes/REPORT.md, "the nearest two objects' gap"): the image
tokens do not keep two touching objects apart, and the Q-Former's queries cannot count
what the tokens merge. This aid gives the ViT a dense target where the training data
lists every object's box: the first channel of each image token (after ``ln_vision``,
before the image PE is added) is read as the logit of "an object's centre lies in this
patch" and trained with a balanced binary cross-entropy (the mean over centre patches and
the mean over the other patches count half each; the 8 neighbours of a centre patch are
left out, since a centre near a patch border could lie in either). Object centres of the
shapes world are at least two patches apart even when their boxes touch, so that telling
two objects apart becomes a local question each token can answer. No parameter is added
(``ln_vision``'s scale and shift of that channel act as the logit's) and nothing is
dropped at export. Off by default (``object_centre_weight: 0``), as upstream.
"""
from __future__ import annotations

import torch
from torch import nn


def centre_targets(objects: torch.Tensor, counts: torch.Tensor, grid_size: tuple[int, int],
                   image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which patch holds each object's centre.

    Args:
        objects: ``NxMx2x2`` object corners ((x1, y1), (x2, y2)) in model pixels, zero-padded.
        counts: ``N`` objects per row (a row with 0 or fewer has no known objects).
        grid_size: ``(H, W)`` patches.
        image_size: S, the model input side.
    Returns:
        ``(targets NxHxW`` 0/1, ``weights NxHxW`` 0/1``)``: 1 where a centre lies; weight 0
        on the 8 neighbours of a centre patch (and on every patch of a row without objects).
    """
    n, m = objects.shape[:2]
    gh, gw = grid_size
    centres = objects.float().mean(dim=2)  # NxMx2 (x, y)
    col = (centres[..., 0] * gw / image_size).floor().long().clamp(0, gw - 1)
    row = (centres[..., 1] * gh / image_size).floor().long().clamp(0, gh - 1)
    real = torch.arange(m, device=objects.device)[None] < counts[:, None]  # NxM
    targets = torch.zeros(n, gh + 2, gw + 2, device=objects.device)  # padded by one patch for the 3x3
    near = torch.zeros_like(targets)
    rows_i = torch.arange(n, device=objects.device)[:, None].expand(n, m)[real]
    r, c = row[real] + 1, col[real] + 1
    targets[rows_i, r, c] = 1.0
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            near[rows_i, r + dy, c + dx] = 1.0
    targets, near = targets[:, 1:-1, 1:-1], near[:, 1:-1, 1:-1]
    weights = torch.where(targets > 0, 1.0, 1.0 - near) * (counts > 0)[:, None, None].float()
    return targets, weights


def centre_loss(image_tokens: torch.Tensor, objects: torch.Tensor, counts: torch.Tensor,
                grid_size: tuple[int, int], image_size: int) -> torch.Tensor | None:
    """Balanced binary cross-entropy of the centre patches, read from channel 0.

    Args:
        image_tokens: ``NxTxC`` (``T = H*W``, or ``1 + H*W`` with a CLS token first, never
            a target).
        objects, counts: as :func:`centre_targets`.
    Returns:
        ``(mean over centre patches + mean over weighted other patches) / 2``, or None when
        no row lists objects.
    """
    if not bool((counts > 0).any()):
        return None
    logits = centre_logits(image_tokens, grid_size)
    targets, weights = centre_targets(objects, counts, grid_size, image_size)
    terms = nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    pos, neg = targets * weights, (1 - targets) * weights
    return 0.5 * ((terms * pos).sum() / pos.sum().clamp_min(1) + (terms * neg).sum() / neg.sum().clamp_min(1))


def centre_logits(image_tokens: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """The patches' channel 0: ``NxTxC`` (a CLS token first, if kept, is skipped) -> ``NxHxW``
    logits of holding a centre."""
    gh, gw = grid_size
    return image_tokens[:, -gh * gw:, 0].float().reshape(-1, gh, gw)


def centre_probabilities(image_tokens: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """What the tokens say: ``NxTxC`` -> ``NxHxW`` probabilities of holding a centre."""
    return centre_logits(image_tokens, grid_size).sigmoid()
