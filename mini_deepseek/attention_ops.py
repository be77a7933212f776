"""The attention primitives every attention layer shares: which keys a query may see, the KV-cache write, attend.

One masking rule for every path (MHA/GQA/MQA, MLA naive and absorbed, with or without a cache): the T queries
are the last T of the S key positions, so query i sits at key position S - T + i and sees the keys 0 .. S - T + i,
minus the keys marked as padding. Training and prefill have T == S; decoding one token over a cache of S
positions has T == 1; a chunk after a cached prefix has 1 < T < S. The rule looks only at T and S: the absolute
start position of x does not enter (without a cache, keys and queries are the same T positions whatever it is).

Padding: `padding` [B, S] bool marks keys that are not real tokens (left-padded prompts of a batch). A padding
query still sees its own key, so that its softmax row is never empty: an empty row would give NaN, and NaN values
poison every row that multiplies them, even by a zero weight. Real queries never see a padding key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_mask(T: int, S: int, padding: torch.Tensor | None = None, device=None) -> torch.Tensor:
    """[1 or B, 1, T, S] bool, True where query i may attend to key j: j <= S - T + i and key j is not padding
    (a query always sees itself). padding: [B, S] bool, True for padding keys, or None."""
    if T > S:
        raise ValueError(f"{T} queries but only {S} keys: the queries must be the last T of the key positions")
    keys = torch.arange(S, device=device)
    query_pos = torch.arange(S - T, S, device=device)  # [T] key position of each query
    mask = keys[None, :] <= query_pos[:, None]  # [T, S] causal
    if padding is None:
        return mask[None, None]
    if padding.shape[1] != S:
        raise ValueError(f"padding covers {padding.shape[1]} key positions, the keys {S}")
    itself = keys[None, :] == query_pos[:, None]  # [T, S]
    return (mask & ~padding[:, None, None, :]) | itself  # [B, 1, T, S]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
           padding: torch.Tensor | None = None) -> torch.Tensor:
    """Masked attention of q [B, Hq, T, d] over k [B, Hk, S, d], v [B, Hk, S, dv] -> [B, Hq, T, dv].

    Hk divides Hq: query head h reads key/value head h // (Hq / Hk) (grouped heads). The mask is
    `attention_mask(T, S, padding)`; without padding, T == S and T == 1 need no mask tensor (is_causal, or every
    key visible), which lets PyTorch pick its fused kernels.
    """
    T, S = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    # Branches, not is_causal=(T > 1): under torch.compile T is symbolic and SDPA takes only a Python bool; a
    # branch makes the compiler guard on the condition and keeps attention inside the graph.
    if padding is None and T == S and T > 1:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    mask = attention_mask(T, S, padding, q.device) if padding is not None or T > 1 else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def attend_one_kv_head(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                       padding: torch.Tensor | None = None) -> torch.Tensor:
    """attend() for a single key/value head read by every query head (MQA; MLA's absorbed latent attention):
    q [B, H, T, d], k [B, 1, S, d], v [B, 1, S, dv] -> [B, H, T, dv].

    The heads become extra query rows, as FlashMLA does: one [T*H, S] attention instead of H copies of the shared
    keys. Row t*H + h is head h of token t, so the mask's row t repeats H times.
    """
    B, H, T, d = q.shape
    S = k.shape[2]
    rows = q.transpose(1, 2).reshape(B, 1, T * H, d)  # [B, 1, T*H, d]
    mask = None
    if padding is not None or T > 1:
        mask = attention_mask(T, S, padding, q.device).repeat_interleave(H, dim=2)  # [1 or B, 1, T*H, S]
    out = F.scaled_dot_product_attention(rows, k, v, attn_mask=mask, scale=scale)  # [B, 1, T*H, dv]
    return out.view(B, T, H, -1).transpose(1, 2)  # [B, H, T, dv]


def write_cache(cache: torch.Tensor, new: torch.Tensor, start_pos: int) -> torch.Tensor:
    """Store new [B, H, T, d] at positions start_pos.. of cache [B, H, L, d]; return the filled part [B, H, S, d]
    with S = start_pos + T: the keys of every position so far."""
    end = start_pos + new.shape[2]
    if new.shape[0] != cache.shape[0]:
        raise ValueError(f"batch size {new.shape[0]} does not match the KV cache's {cache.shape[0]}")
    if end > cache.shape[2]:
        raise ValueError(f"position {end} exceeds the KV cache length {cache.shape[2]}")
    cache[:, :, start_pos:end] = new
    return cache[:, :, :end]
