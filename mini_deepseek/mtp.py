"""Multi-token prediction (DeepSeek-V3 section 2.2).

D sequential modules extend the prediction to tokens t+2 .. t+D+1 while keeping the causal chain: module k
combines, at position i, the previous depth's representation h^{k-1}_i with the embedding of token i+k,

    h'^k_i = M_k [RMSNorm(h^{k-1}_i) ; RMSNorm(Emb(t_{i+k}))],    h^k = TRM_k(h'^k),    P^k = OutHead(h^k)

and predicts token i+k+1. The embedding and the output head are shared with the main model; each module owns
its projection M_k (`eh_proj`), one transformer block, and the RMSNorm in front of the shared head.

Order of the concatenation: the paper writes the hidden state first, but the published checkpoints' `eh_proj`
expects the normalized embedding first (`enorm`), then the hidden state (`hnorm`). We follow the checkpoints.
"""

from __future__ import annotations

import torch
from torch import nn

from .block import Block
from .config import ModelConfig
from .norm import RMSNorm


class MTPModule(Block):
    """One MTP depth: a Block plus enorm, hnorm, eh_proj and shared_head.norm (checkpoint names)."""

    def __init__(self, layer_id: int, cfg: ModelConfig):
        super().__init__(layer_id, cfg)
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)
        self.shared_head = nn.Module()  # the head's weight is the main model's; only its norm is per module
        self.shared_head.norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, h_prev: torch.Tensor, emb_next: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        """h_prev [B, n, dim] = h^{k-1} at positions 0..n-1; emb_next [B, n, dim] = Emb(t_{i+k}) -> h^k [B, n, dim]."""
        h = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))  # [B, n, 2*dim] -> [B, n, dim]
        return super().forward(h, freqs_cis)
