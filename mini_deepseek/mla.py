"""Multi-head Latent Attention (DeepSeek-V2 section 2.1; DeepSeek-V3 section 2.1.1).

Keys and values are compressed jointly into a small latent c_KV = W_DKV h (d_c = 512 in V3) that is all the
cache needs to keep, plus one decoupled RoPE key k^R shared by every head (d_h^R = 64). Queries are compressed
too (d_c' = 1536) to save activation memory in training. Per head:

    q_t = [q^C_t ; RoPE(q^R_t)],  k_t = [W_UK c_KV ; RoPE(k^R_t)],  v_t = W_UV c_KV

Position cannot live in the compressed part: RoPE(W_UK c) depends on the position, so W_UK could no longer be
folded into the query. The decoupled rope key carries position instead, on a few extra dimensions.

Two paths with equal outputs (up to float rounding):
- naive: decompress K and V per head (W_UK, W_UV) and cache them: n_h * (d_h + d_h^R + d_v) per token.
- absorbed: fold W_UK into the query (q^C W_UK scores directly against the latent) and W_UV into the output,
  cache only [c_KV ; k^R] (d_c + d_h^R = 576 per token and layer in V3). Attention then is multi-query attention
  over the latent: one 576-dim key shared by all heads, whose first d_c dims are also the value.
ModelConfig.mla_mode picks one: "naive" or "absorb" everywhere, or "auto" (the default), which caches the latent and
decodes absorbed but runs the per-head (naive) attention wherever it is cheaper: without a cache (training,
evaluation) and for a prompt's prefill (start_pos 0), whose keys are all in hand. Per head and key, absorbed
attention multiplies over d_c + d_h^R and d_c (V3: 1,088) against naive's d_h + d_h^R and d_v (320): for T queries
over S keys that outweighs decompressing S latents unless T is small (decoding: T = 1). Serving systems split
the same way (an MHA kernel for prefill, FlashMLA's absorbed MQA for decoding); DeepSeek's own inference code
absorbs throughout.

Module names follow the published Hugging Face checkpoints (q_a_proj, kv_a_proj_with_mqa, ...).
"""

from __future__ import annotations

import torch
from torch import nn

from .attention_ops import attend, attend_one_kv_head, write_cache
from .config import ModelConfig
from .norm import RMSNorm
from .rope import apply_rotary_emb


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.mode = cfg.n_heads, cfg.mla_mode
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank, self.q_rank = cfg.kv_lora_rank, cfg.q_lora_rank
        self.softmax_scale = cfg.softmax_scale
        q_out = self.n_heads * (self.nope_dim + self.rope_dim)
        if cfg.q_lora_rank:  # V3: h -> c_Q (1536) -> RMSNorm -> per-head queries
            self.q_a_proj = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, q_out, bias=False)
        else:  # V2-Lite: queries straight from h
            self.q_proj = nn.Linear(cfg.dim, q_out, bias=False)
        # W_DKV and W_KR in one matrix: h -> [c_KV (d_c) ; k^R (d_h^R)]
        self.kv_a_proj_with_mqa = nn.Linear(cfg.dim, self.kv_rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, cfg.norm_eps)
        # W_UK and W_UV in one matrix: c_KV -> per head [k^C (d_h) ; v (d_v)]
        self.kv_b_proj = nn.Linear(self.kv_rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, cfg.dim, bias=False)

    def absorbs(self, cache: dict[str, torch.Tensor] | None, start_pos: int) -> bool:
        """Whether a forward with this cache (or None) at start_pos runs absorbed: the rule of the module docstring."""
        return self.mode == "absorb" or (self.mode == "auto" and cache is not None and start_pos > 0)

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype, device=None) -> dict[str, torch.Tensor]:
        if self.mode != "naive":  # "absorb" and "auto" cache the latent: one shared "head" [c_KV ; k^R]
            return {"latent": torch.zeros(batch_size, 1, max_len, self.kv_rank + self.rope_dim, dtype=dtype, device=device)}
        H = self.n_heads
        return {"k": torch.zeros(batch_size, H, max_len, self.nope_dim + self.rope_dim, dtype=dtype, device=device),
                "v": torch.zeros(batch_size, H, max_len, self.v_dim, dtype=dtype, device=device)}

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, start_pos: int = 0,
                cache: dict[str, torch.Tensor] | None = None, padding: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, dim] at positions start_pos.. -> [B, T, dim]; padding [B, S] marks padding keys (attention_ops)."""
        B, T, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_rank else self.q_proj(x)
        q = q.view(B, T, self.n_heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)  # [B, T, H, d_h], [B, T, H, d_h^R]
        q_pe = apply_rotary_emb(q_pe, freqs_cis)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope_dim], dim=-1)  # [B,T,d_c], [B,T,d_h^R]
        c_kv = self.kv_a_layernorm(c_kv)
        k_pe = apply_rotary_emb(k_pe.unsqueeze(2), freqs_cis)  # [B, T, 1, d_h^R]: one rope key for all heads
        absorbed = self.absorbs(cache, start_pos)
        if cache is not None and ("latent" in cache) != (self.mode != "naive"):
            raise ValueError(f"the KV cache holds {sorted(cache)} but mla_mode {self.mode!r} caches "
                             f"{'the latent' if self.mode != 'naive' else 'per-head K/V'}: build the cache after "
                             "set_mla_mode")
        if self.mode == "auto" and cache is not None and not absorbed:  # prefill: cache the latent, attend per head
            write_cache(cache["latent"], torch.cat([c_kv, k_pe.squeeze(2)], dim=-1).unsqueeze(1), start_pos)
            cache = None
        if absorbed:
            out = self._absorbed(q_nope, q_pe, c_kv, k_pe, start_pos, cache, padding)
        else:
            out = self._naive(q_nope, q_pe, c_kv, k_pe, start_pos, cache, padding)
        return self.o_proj(out.reshape(B, T, self.n_heads * self.v_dim))  # out: [B, T, H, d_v]

    def _naive(self, q_nope, q_pe, c_kv, k_pe, start_pos, cache, padding) -> torch.Tensor:
        B, T, H, _ = q_nope.shape
        kv = self.kv_b_proj(c_kv).view(B, T, H, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)  # [B, T, H, d_h], [B, T, H, d_v]
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # [B, H, T, d_h + d_h^R]
        k = torch.cat([k_nope, k_pe.expand(B, T, H, self.rope_dim)], dim=-1).transpose(1, 2)
        v = v.transpose(1, 2)  # [B, H, T, d_v]
        if cache is not None:
            k, v = write_cache(cache["k"], k, start_pos), write_cache(cache["v"], v, start_pos)
        return attend(q, k, v, self.softmax_scale, padding).transpose(1, 2)  # [B, T, H, d_v]

    def _absorbed(self, q_nope, q_pe, c_kv, k_pe, start_pos, cache, padding) -> torch.Tensor:
        w_kv_b = self.kv_b_proj.weight  # [H * (d_h + d_v), d_c]
        if w_kv_b.dtype == torch.float8_e4m3fn:  # an fp8.FP8Linear: DeepSeek's inference code dequantizes here too
            w_kv_b = self.kv_b_proj.dequantized_weight(q_nope.dtype)
        w_ukv = w_kv_b.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_rank)
        w_uk, w_uv = w_ukv.split([self.nope_dim, self.v_dim], dim=1)  # [H, d_h, d_c], [H, d_v, d_c]
        # q^C . (W_UK c) = (q^C W_UK) . c: the query moves into latent space, per head.
        q_latent = torch.einsum("bthd,hdc->bhtc", q_nope, w_uk)  # [B, H, T, d_c]
        query = torch.cat([q_latent, q_pe.transpose(1, 2)], dim=-1)  # [B, H, T, d_c + d_h^R]
        key = torch.cat([c_kv, k_pe.squeeze(2)], dim=-1).unsqueeze(1)  # [B, 1, T, d_c + d_h^R]
        if cache is not None:
            key = write_cache(cache["latent"], key, start_pos)  # [B, 1, S, d_c + d_h^R]
        # Every head reads the same single key/value "head" (multi-query attention over the latent). The value is
        # the latent c_KV itself (W_UV comes after attention). Passing the whole key as the value keeps q, k and v
        # equally wide, which PyTorch's fused CPU attention needs; the rope dims are dropped after.
        o_latent = attend_one_kv_head(query, key, key, self.softmax_scale, padding)  # [B, H, T, d_c + d_h^R]
        return torch.einsum("bhtc,hdc->bthd", o_latent[..., : self.kv_rank], w_uv)  # [B, T, H, d_v]
