"""Exercise set 00: RMSNorm, RoPE and YaRN, the position and normalization pieces every DeepSeek block uses.

Replace each `raise NotImplementedError` with your implementation, then grade it in a notebook with
`check("rms_norm")` or from the shell with `make grade`. Reference answers: solutions/ex00_basics.py.
"""

import math

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm (Zhang & Sennrich, 2019, eq. 4), as every DeepSeek-V3 block applies it before attention and MLP.

    x: [..., d] of any float dtype; weight: [d] (the learned gain g); eps: added inside the square root.
    Returns x / sqrt(mean(x^2 over the last dim) + eps) * weight, with x's shape and dtype.
    Compute in float32 and cast back to x.dtype at the end: squares of bfloat16 values lose too many bits.
    Unlike LayerNorm there is no mean subtraction and no bias.
    """
    raise NotImplementedError("Exercise rms_norm: normalize x by its root mean square, then scale by weight")


def rope_inv_freq(dim: int, base: float) -> torch.Tensor:
    """The rotation frequencies of RoPE (Su et al., RoFormer, 2021, eq. 15).

    dim: the (even) number of rotated dimensions; base: 10000 in RoFormer and DeepSeek-V3 (`rope_theta`).
    Returns theta_i = base^(-2i/dim) for i = 0 .. dim/2 - 1: a float32 tensor [dim // 2], from 1 down to
    nearly 1/base. Pair i of a query or key at position p is rotated by the angle p * theta_i.
    """
    raise NotImplementedError("Exercise rope_inv_freq: return base^(-2i/dim) for i = 0 .. dim/2 - 1")


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x by position-dependent angles (RoFormer, eq. 34).

    x: [B, T, H, d] queries or keys, d even, any float dtype; cos, sin: [T, d // 2] float32, the cosine and
    sine of the angle t * theta_i for position t and pair i. Pair i is the two adjacent dimensions
    (x[..., 2i], x[..., 2i+1]) -- the layout of DeepSeek's published weights -- and is rotated in its plane:
        out[..., 2i]   = x[..., 2i] * cos - x[..., 2i+1] * sin
        out[..., 2i+1] = x[..., 2i] * sin + x[..., 2i+1] * cos
    Returns a tensor of x's shape and dtype, computed in float32. Because rotations compose, the dot product of
    a query rotated at position m with a key rotated at position n depends only on m - n.
    """
    raise NotImplementedError("Exercise apply_rope: rotate each pair (x[2i], x[2i+1]) by its angle")


def yarn_inv_freq(dim: int, base: float, factor: float, original_seq_len: int, beta_fast: float,
                  beta_slow: float) -> torch.Tensor:
    """RoPE frequencies stretched by YaRN (Peng et al., 2023, "NTK-by-parts", eq. 17-18) for a context `factor`
    times longer than `original_seq_len`, as DeepSeek-V3 uses them (factor 40, 4096 -> 163840 tokens).

    Start from the plain theta_i = base^(-2i/dim), i = 0 .. dim/2 - 1 (float32). Pair i completes
    original_seq_len * theta_i / (2 pi) rotations over the original context. Pairs that rotate often (more than
    beta_fast times) already generalize and are kept; pairs that rotate rarely (fewer than beta_slow times) are
    interpolated: divided by factor. In between, a linear ramp blends the two. Exactly, with
        pair(r) = dim * ln(original_seq_len / (2 pi r)) / (2 ln base)   (the pair that rotates r times),
        low = max(floor(pair(beta_fast)), 0),  high = min(ceil(pair(beta_slow)), dim - 1),
        (if low == high, use high = low + 0.001 so the ramp has a width),
        ramp_i = clamp((i - low) / (high - low), 0, 1),
        yarn_theta_i = theta_i / factor * ramp_i + theta_i * (1 - ramp_i).
    Returns float32 [dim // 2]. With factor = 1 this is plain RoPE.
    """
    raise NotImplementedError("Exercise yarn_inv_freq: blend theta_i and theta_i / factor with a linear ramp")


def yarn_softmax_scale(qk_head_dim: int, factor: float, mscale_all_dim: float) -> float:
    """The attention softmax scale of DeepSeek-V2/V3 under YaRN.

    Without YaRN (factor <= 1) it is the usual qk_head_dim^-0.5 (Vaswani et al., 2017); for MLA qk_head_dim
    is the no-position part plus the rope part, 128 + 64 = 192 in V3. YaRN (Peng et al., 2023, eq. 22)
    sharpens attention over a longer context with mscale = 0.1 * mscale_all_dim * ln(factor) + 1; DeepSeek
    multiplies the scale by mscale^2 (the query and the key each carry one mscale). For V3 (factor 40,
    mscale_all_dim 1): mscale = 1.3689, so the scale is 1.8739 * 192^-0.5 = 0.1352. Returns a Python float.
    """
    raise NotImplementedError("Exercise yarn_softmax_scale: qk_head_dim^-0.5, times mscale^2 when factor > 1")
