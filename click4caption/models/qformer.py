"""Query-only Q-Former: transformers' ``Blip2QFormerModel`` plus learned queries."""
from __future__ import annotations

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from click4caption.config import QFormerSize


def build_qformer(size: QFormerSize, vision_dim: int, attn_implementation: str = "sdpa") -> Blip2QFormerModel:
    """A ``Blip2QFormerModel`` with BERT-style post-norm layers, cross-attending to
    ``vision_dim``-wide image tokens every ``cross_attention_freq`` layers."""
    config = Blip2QFormerConfig(
        hidden_size=size.hidden_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        intermediate_size=size.intermediate_size,
        cross_attention_frequency=size.cross_attention_freq,
        encoder_hidden_size=vision_dim,
        layer_norm_eps=size.layer_norm_eps,
        hidden_dropout_prob=size.dropout,
        attention_probs_dropout_prob=size.dropout,
        hidden_act="gelu",
        use_qformer_text_input=False,
    )
    config._attn_implementation = attn_implementation  # "eager" returns attention maps
    return Blip2QFormerModel(config)


def init_query_tokens(num_query_token: int, hidden_size: int, std: float = 0.02) -> nn.Parameter:
    """Learned queries ``1xQxD``, initialised as BLIP-2 does (normal, std 0.02)."""
    tokens = torch.zeros(1, num_query_token, hidden_size)
    tokens.normal_(mean=0.0, std=std)
    return nn.Parameter(tokens)
