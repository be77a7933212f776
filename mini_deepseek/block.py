"""One pre-norm transformer block: x + Attn(RMSNorm(x)), then + FFN(RMSNorm(.)), the FFN dense or MoE."""

from __future__ import annotations

import torch
from torch import nn

from .attention import GroupedQueryAttention
from .config import ModelConfig
from .mla import MultiHeadLatentAttention
from .mlp import MLP
from .moe import MoE
from .norm import RMSNorm


def build_attention(cfg: ModelConfig) -> nn.Module:
    """The attention layer cfg.attn_type names: MLA, or one of the MHA/GQA/MQA baselines."""
    return MultiHeadLatentAttention(cfg) if cfg.attn_type == "mla" else GroupedQueryAttention(cfg)


class Block(nn.Module):
    def __init__(self, layer_id: int, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = build_attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        # DeepSeek keeps the first layers dense (V3: 3): early routing is unstable and the layers are cheap.
        self.routed = layer_id >= cfg.n_dense_layers
        self.mlp = MoE(cfg) if self.routed else MLP(cfg.dim, cfg.inter_dim)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, start_pos: int = 0,
                cache: dict[str, torch.Tensor] | None = None, padding: torch.Tensor | None = None,
                counted: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, dim] -> [B, T, dim]. padding [B, S]: padding keys (attention_ops); counted [B, T]: the tokens
        that enter the routing statistics of an MoE layer (moe.Gate)."""
        x = x + self.self_attn(self.input_layernorm(x), freqs_cis, start_pos, cache, padding)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, counted) if self.routed else self.mlp(h))
