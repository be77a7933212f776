"""Graded tests of exercise set 00 (exercises/ex00_basics.py): RMSNorm, RoPE and YaRN.

Each exercise is checked twice over: against numbers worked out by hand (or properties that any correct answer
has) and against the library implementation in mini_deepseek/ that the rest of the course runs on.
"""

import math

import pytest
import torch
from torch.testing import assert_close

from mini_deepseek.config import ModelConfig
from mini_deepseek.norm import rms_norm as library_rms_norm
from mini_deepseek.rope import apply_rotary_emb, precompute_freqs_cis
from mini_deepseek.rope import rope_inv_freq as library_rope_inv_freq


def plain_theta(dim: int, base: float = 10000.0) -> torch.Tensor:
    return base ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)


def cos_sin(seq_len: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the angles t * theta_i, [seq_len, dim // 2] each."""
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), plain_theta(dim))
    return angles.cos(), angles.sin()


# --- rms_norm ------------------------------------------------------------------------------------------------------
@pytest.mark.exercise("rms_norm")
def test_rms_norm_hand_computed(exercise):
    x = torch.tensor([[3.0, 4.0]])  # rms = sqrt((9 + 16) / 2); a LayerNorm would subtract the mean 3.5 first
    weight = torch.tensor([1.0, 2.0])
    assert_close(exercise(x, weight, 0.0), torch.tensor([[3.0, 8.0]]) / math.sqrt(12.5))


@pytest.mark.exercise("rms_norm")
def test_rms_norm_eps_inside_the_square_root(exercise):
    assert_close(exercise(torch.ones(1, 4), torch.ones(4), 1.0), torch.full((1, 4), 1 / math.sqrt(2)))
    zeros = exercise(torch.zeros(2, 4), torch.ones(4), 1e-6)  # eps keeps an all-zero row finite
    assert_close(zeros, torch.zeros(2, 4))


@pytest.mark.exercise("rms_norm")
def test_rms_norm_gives_unit_rms_over_the_last_dim(exercise):
    x = torch.randn(2, 3, 64) * 5 + 1
    out = exercise(x, torch.ones(64), 1e-6)
    assert out.shape == x.shape
    assert_close(out.pow(2).mean(dim=-1), torch.ones(2, 3))


@pytest.mark.exercise("rms_norm")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_library(exercise, dtype):
    x, weight = torch.randn(2, 5, 32).to(dtype), torch.randn(32).to(dtype)
    out = exercise(x, weight, 1e-6)
    assert out.dtype == dtype
    assert_close(out, library_rms_norm(x, weight, 1e-6))
    # Computed in float32 and rounded once to x's dtype, each element is within half a unit in the last place of the
    # exact value: 2^-8 of it in bfloat16 (8 significant bits), plus float32's own few roundings (2^-20 here).
    # Squares, mean and rsqrt taken in bfloat16 round several times: here 31% of the elements miss it, by up to 2.4x.
    x64 = x.double()
    exact = x64 * torch.rsqrt(x64.pow(2).mean(dim=-1, keepdim=True) + 1e-6) * weight.double()
    rtol = 2**-20 + (2**-8 if dtype == torch.bfloat16 else 0)
    assert ((out.double() - exact).abs() <= rtol * exact.abs()).all()


# --- rope_inv_freq -------------------------------------------------------------------------------------------------
@pytest.mark.exercise("rope_inv_freq")
def test_rope_inv_freq_hand_computed(exercise):
    theta = exercise(4, 10000.0)  # 10000^0 and 10000^(-2/4)
    assert theta.dtype == torch.float32
    assert_close(theta, torch.tensor([1.0, 0.01]))


@pytest.mark.exercise("rope_inv_freq")
def test_rope_inv_freq_is_a_geometric_sequence(exercise):
    theta = exercise(64, 10000.0)
    assert theta.shape == (32,)
    assert_close(theta[1:] / theta[:-1], torch.full((31,), 10000.0 ** (-2 / 64)))


@pytest.mark.exercise("rope_inv_freq")
@pytest.mark.parametrize("dim, base", [(16, 10000.0), (64, 10000.0), (32, 500000.0)])
def test_rope_inv_freq_matches_library(exercise, dim, base):
    assert_close(exercise(dim, base), library_rope_inv_freq(ModelConfig(qk_rope_head_dim=dim, rope_theta=base)))


# --- apply_rope ----------------------------------------------------------------------------------------------------
@pytest.mark.exercise("apply_rope")
def test_apply_rope_quarter_turn(exercise):
    # Both pairs turn by 90 degrees: (1, 0) -> (0, 1) and (0, 1) -> (-1, 0). Pairing dims (0, 2) and (1, 3), as
    # rotate-half layouts do, would give [0, -1, 1, 0] instead.
    x = torch.tensor([1.0, 0.0, 0.0, 1.0]).view(1, 1, 1, 4)
    out = exercise(x, torch.zeros(1, 2), torch.ones(1, 2))
    assert_close(out, torch.tensor([0.0, 1.0, -1.0, 0.0]).view(1, 1, 1, 4))


@pytest.mark.exercise("apply_rope")
def test_apply_rope_keeps_position_zero_and_pair_norms(exercise):
    x = torch.randn(2, 6, 3, 8)
    out = exercise(x, *cos_sin(6, 8))
    assert out.shape == x.shape
    assert_close(out[:, 0], x[:, 0])  # angle 0 at position 0
    assert_close(out.view(2, 6, 3, 4, 2).norm(dim=-1), x.view(2, 6, 3, 4, 2).norm(dim=-1))  # rotations keep lengths


@pytest.mark.exercise("apply_rope")
def test_apply_rope_scores_depend_only_on_relative_position(exercise):
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    cos, sin = cos_sin(32, 16)

    def score(m: int, n: int) -> torch.Tensor:  # q at position m against k at position n
        q_m = exercise(q, cos[m : m + 1], sin[m : m + 1])
        k_n = exercise(k, cos[n : n + 1], sin[n : n + 1])
        return (q_m * k_n).sum()

    assert_close(score(7, 7), (q * k).sum())
    assert_close(score(5, 2), score(3, 0))
    assert_close(score(30, 11), score(19, 0))


@pytest.mark.exercise("apply_rope")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rope_matches_library(exercise, dtype):
    cfg = ModelConfig.preset("toy")
    freqs_cis = precompute_freqs_cis(cfg, seq_len=10)  # [10, rope_dim // 2], unit magnitude without YaRN
    x = torch.randn(2, 10, 4, cfg.rope_dim).to(dtype)
    out = exercise(x, freqs_cis.real.contiguous(), freqs_cis.imag.contiguous())
    assert out.dtype == dtype
    assert_close(out, apply_rotary_emb(x, freqs_cis))


# --- yarn_inv_freq -------------------------------------------------------------------------------------------------
@pytest.mark.exercise("yarn_inv_freq")
def test_yarn_inv_freq_keeps_fast_pairs_and_interpolates_slow_ones(exercise):
    # V3: dim 64, factor 40, 4096 original tokens. Pair i turns 4096 * theta_i / (2 pi) = 651.9 * 10^(-i/8) times:
    # pair 10 about 36.7 times (> beta_fast = 32: kept), pair 23 about 0.87 times (< beta_slow = 1: divided by 40).
    theta = plain_theta(64)
    yarn = exercise(64, 10000.0, 40.0, 4096, 32.0, 1.0)
    assert yarn.shape == (32,) and yarn.dtype == torch.float32
    assert_close(yarn[:11], theta[:11])
    assert_close(yarn[23:], theta[23:] / 40)
    blended, kept = yarn[11:23], theta[11:23]
    assert ((blended < kept) & (blended > kept / 40)).all()


@pytest.mark.exercise("yarn_inv_freq")
def test_yarn_inv_freq_with_factor_one_is_plain_rope(exercise):
    assert_close(exercise(64, 10000.0, 1.0, 4096, 32.0, 1.0), plain_theta(64))


@pytest.mark.exercise("yarn_inv_freq")
@pytest.mark.parametrize("preset, overrides", [
    ("v3", {}),
    ("toy", dict(rope_factor=4.0, original_seq_len=64)),
    ("toy", dict(rope_factor=4.0, original_seq_len=4)),  # low == high: the ramp needs its 0.001 of width
])
def test_yarn_inv_freq_matches_library(exercise, preset, overrides):
    cfg = ModelConfig.preset(preset, **overrides)
    yarn = exercise(cfg.rope_dim, cfg.rope_theta, cfg.rope_factor, cfg.original_seq_len, cfg.beta_fast,
                    cfg.beta_slow)
    assert_close(yarn, library_rope_inv_freq(cfg))


# --- yarn_softmax_scale --------------------------------------------------------------------------------------------
@pytest.mark.exercise("yarn_softmax_scale")
def test_yarn_softmax_scale_without_correction(exercise):
    assert exercise(192, 1.0, 1.0) == pytest.approx(192**-0.5)  # no YaRN
    assert exercise(64, 1.0, 0.707) == pytest.approx(1 / 8)
    assert exercise(192, 40.0, 0.0) == pytest.approx(192**-0.5)  # m = 0: mscale = 1


@pytest.mark.exercise("yarn_softmax_scale")
def test_yarn_softmax_scale_v3_numbers(exercise):
    scale = exercise(192, 40.0, 1.0)  # mscale = 0.1 * ln(40) + 1 = 1.3689, mscale^2 = 1.8739
    assert isinstance(scale, float)
    assert scale == pytest.approx(1.8739 * 192**-0.5, rel=1e-4)
    assert scale == pytest.approx(0.13523, rel=1e-4)


@pytest.mark.exercise("yarn_softmax_scale")
@pytest.mark.parametrize("preset", ["v3", "v2-lite", "toy"])
def test_yarn_softmax_scale_matches_model_config(exercise, preset):
    cfg = ModelConfig.preset(preset)
    assert exercise(cfg.qk_head_dim, cfg.rope_factor, cfg.mscale_all_dim) == pytest.approx(cfg.softmax_scale)
