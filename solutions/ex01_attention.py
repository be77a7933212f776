"""Reference answers to exercises/ex01_attention.py (the docstrings there are the specification)."""

import torch

from mini_deepseek.mla import MultiHeadLatentAttention
from mini_deepseek.rope import apply_rotary_emb


def kv_cache_elements_per_token(attn_type: str, n_layers: int, n_heads: int, head_dim: int, n_kv_heads: int = 0,
                                kv_lora_rank: int = 0, qk_rope_head_dim: int = 0) -> int:
    """Cached elements per token over all layers: MHA 2*n_h*d_h, GQA 2*n_g*d_h, MQA 2*d_h, MLA d_c + d_r."""
    per_layer = {
        "mha": lambda: 2 * n_heads * head_dim,
        "gqa": lambda: 2 * n_kv_heads * head_dim,
        "mqa": lambda: 2 * head_dim,
        "mla": lambda: kv_lora_rank + qk_rope_head_dim,
    }
    if attn_type not in per_layer:
        raise ValueError(f"unknown attn_type {attn_type!r}; choose one of {sorted(per_layer)}")
    return int(per_layer[attn_type]() * n_layers)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, Hk, S, d] -> [B, Hk * n_rep, S, d], head j repeated n_rep times in a row."""
    if n_rep == 1:
        return x
    B, Hk, S, d = x.shape
    return x[:, :, None].expand(B, Hk, n_rep, S, d).reshape(B, Hk * n_rep, S, d)


def _causal_softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim of scores [..., T, S] with query t at position S - T + t seeing keys <= it."""
    T, S = scores.shape[-2:]
    allowed = torch.arange(S, device=scores.device)[None, :] <= (S - T + torch.arange(T, device=scores.device))[:, None]
    return scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)


def grouped_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention, query head h using key/value head h // (Hq // Hk); returns [B, Hq, T, dv]."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)  # [B, Hq, S, d], [B, Hq, S, dv]
    scores = q.float() @ k.float().transpose(-2, -1) * scale  # [B, Hq, T, S]
    return (_causal_softmax(scores) @ v.float()).to(q.dtype)


def mla_keys_values(attn: MultiHeadLatentAttention, x: torch.Tensor, freqs_cis: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head keys [B, H, T, d_h + d_r] and values [B, H, T, d_v], and the latent cache [B, T, d_c + d_r]."""
    B, T, _ = x.shape
    H = attn.n_heads
    c, k_r = attn.kv_a_proj_with_mqa(x).split([attn.kv_rank, attn.rope_dim], dim=-1)  # [B,T,d_c], [B,T,d_r]
    c = attn.kv_a_layernorm(c)
    k_r = apply_rotary_emb(k_r.unsqueeze(2), freqs_cis).squeeze(2)  # [B, T, d_r], position in here only
    kv = attn.kv_b_proj(c).view(B, T, H, attn.nope_dim + attn.v_dim)
    k_c, v = kv.split([attn.nope_dim, attn.v_dim], dim=-1)  # [B, T, H, d_h], [B, T, H, d_v]
    k = torch.cat([k_c, k_r[:, :, None].expand(B, T, H, attn.rope_dim)], dim=-1)  # [B, T, H, d_h + d_r]
    return k.transpose(1, 2), v.transpose(1, 2), torch.cat([c, k_r], dim=-1)


def mla_absorbed_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
                           kv_b_weight: torch.Tensor, scale: float) -> torch.Tensor:
    """Scores and values against the latent directly; W_UK folded into the query, W_UV applied afterwards."""
    H, d_h, d_r = q_nope.shape[2], q_nope.shape[3], q_pe.shape[3]
    d_c = latent.shape[-1] - d_r
    d_v = kv_b_weight.shape[0] // H - d_h
    w = kv_b_weight.view(H, d_h + d_v, d_c)
    w_uk, w_uv = w[:, :d_h], w[:, d_h:]  # [H, d_h, d_c], [H, d_v, d_c]
    c, k_r = latent[..., :d_c], latent[..., d_c:]  # [B, S, d_c], [B, S, d_r]
    q_lat = torch.einsum("bthd,hdc->bhtc", q_nope, w_uk)  # [B, H, T, d_c]
    scores = (torch.einsum("bhtc,bsc->bhts", q_lat, c)
              + torch.einsum("bthr,bsr->bhts", q_pe, k_r)) * scale  # [B, H, T, S]: one latent serves all heads
    o_lat = torch.einsum("bhts,bsc->bhtc", _causal_softmax(scores.float()).to(c.dtype), c)  # [B, H, T, d_c]
    return torch.einsum("bhtc,hvc->bthv", o_lat, w_uv)  # [B, T, H, d_v]
