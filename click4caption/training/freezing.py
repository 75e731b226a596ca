"""Which parts training leaves alone: upstream's freeze policy, from the ``model:`` flags."""
from __future__ import annotations

from click4caption.config import ModelConfig


def frozen_parts(cfg: ModelConfig) -> list[str]:
    """The model parts (attribute names) that get no gradient and stay in eval mode.

    ``freeze_vit`` freezes the ViT, and ``ln_vision`` too unless multi-block features or
    a non-224 input are used (upstream then trains it); ``freeze_qformer`` freezes the
    Q-Former and its queries; ``freeze_llm`` the LLM.
    """
    frozen: list[str] = []
    if cfg.freeze_vit:
        frozen.append("visual_encoder")
        if not cfg.use_vit_multiblock_feat and cfg.image_size == 224:
            frozen.append("ln_vision")
    if cfg.freeze_qformer:
        frozen += ["qformer", "query_tokens"]
    if cfg.freeze_llm:
        frozen.append("llama_model")
    return frozen
