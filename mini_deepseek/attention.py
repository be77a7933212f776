"""Attention baselines with one interface: MHA, GQA and MQA (MLA lives in mla.py).

All four variants share `forward(x, freqs_cis, start_pos=0, cache=None, padding=None)` and `new_cache(batch,
max_len, ...)`. Without a cache the layer attends causally within x (training, or recomputing a whole sequence).
With a cache it writes the keys/values of x at positions [start_pos, start_pos + T) and attends to everything
cached up to there (prefill, then one token at a time when decoding). `padding` [B, S] marks the keys that are
padding (S = start_pos + T with a cache, T without); the masking rule is attention_ops.attention_mask.

- MHA (Vaswani et al., 2017): every query head has its own key/value head; cache 2 * n_h * d_h per token/layer.
- GQA (Ainslie et al., 2023): n_g key/value heads, each shared by a group of n_h / n_g query heads.
- MQA (Shazeer, 2019): one key/value head shared by all query heads.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention_ops import attend, write_cache
from .config import ModelConfig
from .rope import apply_rotary_emb


class GroupedQueryAttention(nn.Module):
    """MHA (kv_heads == n_heads), GQA (1 < kv_heads < n_heads) or MQA (kv_heads == 1), with RoPE."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.softmax_scale = cfg.softmax_scale
        self.q_proj = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=False)

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype, device=None) -> dict[str, torch.Tensor]:
        shape = (batch_size, self.kv_heads, max_len, self.head_dim)
        return {"k": torch.zeros(shape, dtype=dtype, device=device), "v": torch.zeros(shape, dtype=dtype, device=device)}

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, start_pos: int = 0,
                cache: dict[str, torch.Tensor] | None = None, padding: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim)
        q, k = apply_rotary_emb(q, freqs_cis), apply_rotary_emb(k, freqs_cis)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, T, head_dim]
        if cache is not None:
            k, v = write_cache(cache["k"], k, start_pos), write_cache(cache["v"], v, start_pos)
        out = attend(q, k, v, self.softmax_scale, padding)  # [B, n_heads, T, head_dim]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

