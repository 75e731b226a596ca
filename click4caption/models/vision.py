"""Vision encoder: timm's ``Eva`` with multi-block feature averaging.

Parameter names are timm's, which are also the names of BLIP-2's ``eva_vit_g.pth``.
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
from timm.layers import LayerNorm
from timm.models.eva import Eva
from torch import nn

from click4caption.config import ViTSize
from click4caption.errors import ConfigError


# EVA-CLIP ViT-g/14 as packaged by BLIP-2 (the 40th block dropped): the only home of these sizes.
EVA_CLIP_G = ViTSize(embed_dim=1408, depth=39, num_heads=16, patch_size=14, mlp_dim=6144)


class VisionEncoder(Eva):
    """EVA ViT that returns the mean of the outputs of ``feature_blocks``.

    Pre-norm blocks with q/v biases, absolute position embedding with a CLS token and
    no final norm, as in BLIP-2's EVA-ViT-g.
    """

    def __init__(
        self,
        variant: ViTSize,
        image_size: int,
        feature_blocks: Sequence[int] | None = None,
        drop_path_rate: float = 0.0,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__(
            img_size=image_size,
            patch_size=variant.patch_size,
            num_classes=0,
            global_pool="",
            embed_dim=variant.embed_dim,
            depth=variant.depth,
            num_heads=variant.num_heads,
            qkv_bias=True,
            qkv_fused=True,
            # int(embed_dim * ratio) must give mlp_dim exactly
            mlp_ratio=(variant.mlp_dim + 0.5) / variant.embed_dim,
            drop_path_rate=drop_path_rate,
            norm_layer=partial(LayerNorm, eps=1e-6),
            class_token=True,
            use_abs_pos_emb=True,
            use_rot_pos_emb=False,
        )
        self.norm = nn.Identity()  # BLIP-2's ViT-g has no final norm
        blocks = list(feature_blocks) if feature_blocks else [variant.depth - 1]
        for b in blocks:
            if not 0 <= b < variant.depth:
                raise ConfigError(f"model.use_vit_multiblock_feat: block {b} out of range 0..{variant.depth - 1}")
        self.feature_blocks = blocks
        self.num_features = variant.embed_dim
        self.grid_size: tuple[int, int] = tuple(self.patch_embed.grid_size)  # type: ignore[assignment]
        if grad_checkpointing:
            self.set_grad_checkpointing(True)

    def init_non_persistent_buffers(self) -> None:
        """Make the buffers no state dict holds (timm's zero key bias) after the encoder
        was built on the meta device and its weights assigned from a file."""
        for block in self.blocks:
            attn = block.attn
            k_bias = getattr(attn, "k_bias", None)
            if isinstance(k_bias, torch.Tensor) and k_bias.is_meta:
                attn.register_buffer("k_bias", torch.zeros_like(attn.q_bias), persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """image ``Bx3xSxS`` -> mean of the chosen blocks' outputs ``Bx(1+N)xC`` (CLS first)."""
        outs = self.forward_intermediates(
            image,
            indices=self.feature_blocks,
            return_prefix_tokens=True,
            norm=False,
            stop_early=True,
            output_fmt="NLC",
            intermediates_only=True,
        )
        stacked = torch.stack([torch.cat([prefix, tokens], dim=1) for tokens, prefix in outs])
        return stacked.mean(dim=0)
