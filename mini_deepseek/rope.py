"""Rotary position embeddings (RoPE) with YaRN context extension, as DeepSeek-V2/V3 use them.

RoPE rotates each pair of dimensions (2i, 2i+1) of a query or key at position p by the angle p * theta_i with
theta_i = base^(-2i/d). YaRN (Peng et al., 2023) extends the context by a factor s: low frequencies (long
wavelengths, that never completed many rotations within the original context) are divided by s, high frequencies
are kept, and a linear ramp blends the two between beta_slow and beta_fast rotations. YaRN also sharpens the
softmax to keep attention entropy steady: DeepSeek multiplies the softmax scale by mscale^2 with
mscale = 0.1 * m * ln(s) + 1 (see ModelConfig.softmax_scale).

Differences from the references, on purpose:
- DeepSeek's inference code switches YaRN on only when max_seq_len > original_seq_len; Hugging Face transformers
  applies it whenever rope scaling is configured. We follow transformers (YaRN whenever rope_factor > 1), so that
  Hugging Face checkpoints give the same logits; for the published V3 config both agree at long context.
- The published weights rotate interleaved pairs (2i, 2i+1), as we do. transformers de-interleaves the rope dims
  before a rotate-half rotation: the same rotation on a permuted basis, so attention scores are identical but the
  rope keys sit in the cache in a different order. A transformers config with `rope_interleave: false` means
  weights whose rope rows are already in rotate-half order; checkpoint.py permutes them back on load.
- Magnitudes under YaRN: transformers multiplies cos/sin by attention_factor = mscale(s, mscale) /
  mscale(s, mscale_all_dim) and the softmax scale by mscale(s, mscale_all_dim)^2; DeepSeek's inference code has
  no mscale_all_dim, leaves cos/sin at magnitude 1 and uses mscale(s, mscale)^2. We follow transformers; with
  mscale == mscale_all_dim (V3: both 1.0, V2: both 0.707) all three agree.
"""

from __future__ import annotations

import math

import torch

from .config import ModelConfig, yarn_attention_factor


def _correction_dim(num_rotations: float, dim: int, base: float, max_seq_len: int) -> float:
    """The (fractional) pair index whose wavelength fits num_rotations times into max_seq_len."""
    return dim * math.log(max_seq_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_ramp_range(cfg: ModelConfig, dim: int) -> tuple[int, int]:
    """Pair indices [low, high] between which YaRN blends interpolated and original frequencies."""
    low = math.floor(_correction_dim(cfg.beta_fast, dim, cfg.rope_theta, cfg.original_seq_len))
    high = math.ceil(_correction_dim(cfg.beta_slow, dim, cfg.rope_theta, cfg.original_seq_len))
    return max(low, 0), min(high, dim - 1)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies theta_i of the rotary pairs, [rope_dim // 2], YaRN-blended when rope_factor > 1."""
    dim = cfg.rope_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if not cfg.yarn:
        return inv_freq
    low, high = yarn_ramp_range(cfg, dim)
    if low == high:  # avoid a zero-width ramp
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 for high frequencies (kept), 0 for low frequencies (interpolated)
    return inv_freq / cfg.rope_factor * (1 - keep) + inv_freq * keep


def rope_attention_factor(cfg: ModelConfig) -> float:
    """YaRN's magnitude on cos/sin (transformers' `attention_factor`); 1 for V3 (mscale == mscale_all_dim)."""
    return yarn_attention_factor(cfg.rope_factor, cfg.mscale, cfg.mscale_all_dim)


def precompute_freqs_cis(cfg: ModelConfig, seq_len: int | None = None) -> torch.Tensor:
    """Complex rotations for positions 0..seq_len-1: [seq_len, rope_dim // 2], magnitude attention_factor."""
    seq_len = cfg.max_seq_len if seq_len is None else seq_len
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), rope_inv_freq(cfg))  # [T, d/2]
    magnitude = torch.full_like(angles, rope_attention_factor(cfg))
    return torch.polar(magnitude, angles)


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, T, H, d] by freqs_cis [T, d/2]; returns x's shape and dtype."""
    B, T, H, d = x.shape
    if freqs_cis.shape != (T, d // 2):
        raise ValueError(f"freqs_cis has shape {tuple(freqs_cis.shape)}, expected {(T, d // 2)} for x {tuple(x.shape)}")
    pairs = torch.view_as_complex(x.float().reshape(B, T, H, d // 2, 2))  # [B, T, H, d/2] complex
    rotated = pairs * freqs_cis.view(1, T, 1, d // 2)
    return torch.view_as_real(rotated).reshape(B, T, H, d).to(x.dtype)
