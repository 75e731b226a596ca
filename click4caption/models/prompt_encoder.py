"""Box prompt encoder (SAM-style random Fourier features) and the image positional
embedding that shares its Gaussian matrix."""
from __future__ import annotations

import math

import torch
from torch import nn

from click4caption.errors import ConfigError


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier encoding of 2-d points in ``[0, 1]``.

    The Gaussian matrix ``G`` (``2 x F``) is a persistent buffer: it is drawn once at
    init and must be loaded from the checkpoint, never drawn again.
    """

    def __init__(self, num_pos_feats: int, scale: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn(2, num_pos_feats))

    def encode(self, coords: torch.Tensor) -> torch.Tensor:
        """coords ``...x2`` (x, y) in ``[0, 1]`` -> ``...x2F`` = [sin, cos](2 pi (2c - 1) G)."""
        g = self.positional_encoding_gaussian_matrix
        proj = (2 * coords.to(g.dtype) - 1) @ g
        proj = 2 * math.pi * proj
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)

    def grid(self, height: int, width: int) -> torch.Tensor:
        """Encodings of the ``height x width`` cell centres, row-major: ``(H*W)x2F``."""
        g = self.positional_encoding_gaussian_matrix
        ys = (torch.arange(height, device=g.device, dtype=g.dtype) + 0.5) / height
        xs = (torch.arange(width, device=g.device, dtype=g.dtype) + 0.5) / width
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        return self.encode(torch.stack([xx, yy], dim=-1)).reshape(height * width, -1)


class PromptEncoder(nn.Module):
    """Turns boxes into two corner tokens and makes the image positional embedding.

    Args:
        embed_dim: Q-Former width D (corner tokens are D wide; D must be even).
        vision_dim: ViT width C (the image PE is projected to it).
        image_size: model input side S (boxes are in ``[0, S]`` pixels).
        add_img_pe: build the ``D -> C`` projection of the image PE.
    """

    def __init__(self, embed_dim: int, vision_dim: int, image_size: int, add_img_pe: bool = True) -> None:
        super().__init__()
        if embed_dim % 2:
            raise ConfigError(f"Q-Former width must be even for the Fourier box encoding, got {embed_dim}")
        self.image_size = image_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.corner_type_emb = nn.ModuleList([nn.Embedding(1, embed_dim) for _ in range(2)])
        self.image_pe_proj = nn.Linear(embed_dim, vision_dim) if add_img_pe else None

    def encode_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """boxes ``Nx2x2`` ((x1, y1), (x2, y2)) in model pixels -> corner tokens ``Nx2xD``.

        Corners are clipped to ``[0, S]`` (no half-pixel shift, as upstream).
        """
        s = self.image_size
        coords = boxes.clip(min=0, max=s).to(self.pe_layer.positional_encoding_gaussian_matrix.dtype) / s
        tokens = self.pe_layer.encode(coords)
        corner = torch.stack([self.corner_type_emb[0].weight[0], self.corner_type_emb[1].weight[0]])
        return tokens + corner.to(tokens.dtype)

    def image_pe(self, grid: tuple[int, int], with_cls: bool) -> torch.Tensor:
        """Projected positional embedding of the patch grid: ``(1+H*W)xC`` or ``(H*W)xC``.

        A kept CLS token gets the mean of the grid embeddings.
        """
        if self.image_pe_proj is None:
            raise ConfigError("the image PE was requested but model.add_img_pe is off")
        pe = self.pe_layer.grid(*grid)
        if with_cls:
            pe = torch.cat([pe.mean(0, keepdim=True), pe], dim=0)
        return self.image_pe_proj(pe)
