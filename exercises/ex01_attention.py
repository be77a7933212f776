"""Exercise set 01: the KV cache of MHA, GQA, MQA and MLA, key/value head sharing, MLA's compression with its
decoupled RoPE key, and weight absorption (notebooks/01_attention_kv_cache.ipynb).

Replace each `raise NotImplementedError` with your implementation, then grade it in a notebook with
`check("repeat_kv")` or from the shell with `make grade`. Reference answers: solutions/ex01_attention.py.
Shapes use B batch, T queries, S cached positions, H (or Hq) query heads, Hk key/value heads.
"""

import torch

from mini_deepseek.mla import MultiHeadLatentAttention
from mini_deepseek.rope import apply_rotary_emb


def kv_cache_elements_per_token(attn_type: str, n_layers: int, n_heads: int, head_dim: int, n_kv_heads: int = 0,
                                kv_lora_rank: int = 0, qk_rope_head_dim: int = 0) -> int:
    """Elements the KV cache stores for one token, summed over all n_layers layers (DeepSeek-V2, Table 1).

    Per layer, by attn_type:
        "mha": each of the n_heads heads caches a key and a value of head_dim:   2 * n_heads * head_dim
        "gqa": n_kv_heads key/value heads, each shared by a group of query heads: 2 * n_kv_heads * head_dim
        "mqa": a single key/value head shared by every query head:                2 * head_dim
        "mla": the inference (absorbed) cache: the latent c_KV of kv_lora_rank elements plus the one rotated
               RoPE key that all heads share, of qk_rope_head_dim elements:        kv_lora_rank + qk_rope_head_dim
               (n_heads and head_dim do not enter: that is the point of MLA)
    Returns a Python int (elements, not bytes: multiply by the bytes of the cache dtype for memory).
    An attn_type other than these four raises ValueError.

    DeepSeek-V3 (61 layers, 128 heads of 128, kv_lora_rank 512, rope 64): MLA 61 * 576 = 35,136 per token,
    MHA with the same heads 61 * 2 * 128 * 128 = 1,998,848 per token, 56.9 times more.
    """
    raise NotImplementedError("Exercise kv_cache_elements_per_token: apply DeepSeek-V2's Table 1 per layer")


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Share key/value heads among query heads (GQA, Ainslie et al., 2023) by repeating them.

    x: [B, Hk, S, d] keys or values of Hk key/value heads; n_rep >= 1 query heads per key/value head.
    Returns [B, Hk * n_rep, S, d] in which each key/value head appears n_rep times in a row:
        out[:, j * n_rep + r] == x[:, j]  for r in 0 .. n_rep - 1,
    so query head h reads key/value head h // n_rep (the grouping torch's scaled_dot_product_attention uses
    with enable_gqa=True, and Hugging Face's repeat_kv). n_rep == 1 returns x's values unchanged (MHA);
    Hk == 1 is MQA. The cache keeps only the Hk heads; this expansion happens at attention time.
    """
    raise NotImplementedError("Exercise repeat_kv: repeat each key/value head n_rep times, consecutively")


def grouped_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention in which groups of query heads share key/value heads (MHA, GQA and MQA in one).

    q: [B, Hq, T, d] queries; k: [B, Hk, S, d] keys and v: [B, Hk, S, dv] values, with Hk dividing Hq and
    T <= S. The T queries are the last T positions: query t sits at position S - T + t and attends to keys
    0 .. S - T + t (T == S: training or prefill; T == 1: one decoding step over a cache of S positions).
    Query head h uses key/value head h // (Hq // Hk) (see repeat_kv).
        scores = q k^T * scale  [B, Hq, T, S], masked to -inf where a key lies after its query,
        out = softmax(scores over S) v
    Returns [B, Hq, T, dv] in q's dtype. Write it with matmul/softmax (not F.scaled_dot_product_attention).
    """
    raise NotImplementedError("Exercise grouped_query_attention: softmax(q k^T * scale + causal mask) v, heads shared")


def mla_keys_values(attn: MultiHeadLatentAttention, x: torch.Tensor, freqs_cis: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MLA's joint low-rank compression of keys and values, with the decoupled RoPE key (DeepSeek-V2 eq. 9-17).

    attn: a mini_deepseek MultiHeadLatentAttention layer (use its weights; names as in mini_deepseek/mla.py),
    with H = attn.n_heads, d_c = attn.kv_rank, d_h = attn.nope_dim, d_r = attn.rope_dim, d_v = attn.v_dim.
    x: [B, T, dim] hidden states at positions 0 .. T-1; freqs_cis: [T, d_r // 2] their complex rotations.
        1. attn.kv_a_proj_with_mqa(x) gives [c ; k_r]: split the last dim into c [B, T, d_c], k_r [B, T, d_r]
        2. c = attn.kv_a_layernorm(c): the normalized latent c_KV, shared by keys and values
        3. k_r = apply_rotary_emb(k_r as [B, T, 1, d_r], freqs_cis): one rotated key for all heads
        4. attn.kv_b_proj(c) viewed as [B, T, H, d_h + d_v]: per head, the first d_h are the key part k_c
           (W_UK c, no position in it) and the last d_v are the value v (W_UV c)
        5. the key of head h is [k_c of head h ; k_r]: the same rope key concatenated to every head
    Returns (k [B, H, T, d_h + d_r], v [B, H, T, d_v], latent [B, T, d_c + d_r]) where latent = [c ; k_r]
    (the rotated k_r) is all that absorbed inference caches, and k, v what the naive cache holds.
    """
    raise NotImplementedError("Exercise mla_keys_values: compress x into c_KV, rotate the shared rope key, expand")


def mla_absorbed_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
                           kv_b_weight: torch.Tensor, scale: float) -> torch.Tensor:
    """MLA attention computed from the latent cache alone, with W_UK and W_UV absorbed (DeepSeek-V2 2.1.2).

    q_nope: [B, T, H, d_h] the position-free query parts; q_pe: [B, T, H, d_r] the rotated rope query parts;
    latent: [B, S, d_c + d_r] the cache, [c_s ; k_r,s] for positions s = 0 .. S-1 (T <= S; query t sits at
    position S - T + t and attends causally to keys 0 .. S - T + t);
    kv_b_weight: [H * (d_h + d_v), d_c], the weight of kv_b_proj (nn.Linear layout, out x in): for head h,
    rows h*(d_h+d_v) .. h*(d_h+d_v)+d_h-1 are W_UK[h] [d_h, d_c], the next d_v rows W_UV[h] [d_v, d_c].
        1. q_lat[h] = q_nope[h] W_UK[h]                         [B, T, H, d_c]: the query moved to latent space
        2. score[h, t, s] = (q_lat[h, t] . c_s + q_pe[h, t] . k_r,s) * scale, causal mask, softmax over s
        3. o_lat[h, t] = sum_s p[h, t, s] c_s                    [B, T, H, d_c]
        4. out[h, t] = W_UV[h] o_lat[h, t]                       [B, T, H, d_v]
    Never expand the S cached latents into per-head keys or values. Returns [B, T, H, d_v], equal (up to float
    rounding) to naive attention with keys [W_UK[h] c_s ; k_r,s] and values W_UV[h] c_s.
    """
    raise NotImplementedError("Exercise mla_absorbed_attention: fold W_UK into the query and W_UV into the output")
