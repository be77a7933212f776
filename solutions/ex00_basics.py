"""Reference answers to exercises/ex00_basics.py (the docstrings there are the specification)."""

import math

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., d] -> x / sqrt(mean(x^2) + eps) * weight, computed in float32, returned in x's dtype."""
    x32 = x.float()
    normalized = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (normalized * weight.float()).to(x.dtype)


def rope_inv_freq(dim: int, base: float) -> torch.Tensor:
    """theta_i = base^(-2i/dim) for i = 0 .. dim/2 - 1, float32 [dim // 2]."""
    return 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, T, H, d] by the angles whose cos/sin [T, d/2] are given."""
    B, T, H, d = x.shape
    pairs = x.float().reshape(B, T, H, d // 2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]  # [B, T, H, d/2] each
    cos, sin = cos.view(1, T, 1, d // 2), sin.view(1, T, 1, d // 2)  # broadcast over batch and heads
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rotated.reshape(B, T, H, d).to(x.dtype)


def yarn_inv_freq(dim: int, base: float, factor: float, original_seq_len: int, beta_fast: float,
                  beta_slow: float) -> torch.Tensor:
    """Plain RoPE frequencies blended with frequencies divided by factor, by a linear ramp over pair indices."""
    theta = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)

    def pair_rotating(num_rotations: float) -> float:  # the pair index that turns num_rotations times
        return dim * math.log(original_seq_len / (2 * math.pi * num_rotations)) / (2 * math.log(base))

    low = max(math.floor(pair_rotating(beta_fast)), 0)
    high = min(math.ceil(pair_rotating(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    return theta / factor * ramp + theta * (1 - ramp)


def yarn_softmax_scale(qk_head_dim: int, factor: float, mscale_all_dim: float) -> float:
    """qk_head_dim^-0.5, times mscale^2 with mscale = 0.1 * mscale_all_dim * ln(factor) + 1 when factor > 1."""
    scale = qk_head_dim**-0.5
    if factor > 1:
        mscale = 0.1 * mscale_all_dim * math.log(factor) + 1
        scale *= mscale * mscale
    return scale
