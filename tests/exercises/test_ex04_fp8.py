"""Graded tests of exercise set 04 (exercises/ex04_fp8.py): E4M3 by hand, 1 x 128 and 128 x 128 quantization, the
block-scaled GEMM with per-128 promotion, and the limited-precision accumulator.

Each exercise is checked against values worked out by hand and against what the course runs on: torch's float8 cast,
the kernels' reference arithmetic (kernels/reference.py) and mini_deepseek.fp8_numerics.
"""

import math

import pytest
import torch
from torch.testing import assert_close

from kernels import reference as R
from mini_deepseek.fp8_numerics import limited_precision_sum as library_sum

FP8 = torch.float8_e4m3fn


def torch_codes(x: torch.Tensor) -> torch.Tensor:
    """What the course's kernels store: saturate at ±448, round to nearest even, NaN -> 0x7F."""
    return R.to_e4m3(x).view(torch.uint8)


def rounding_probes() -> torch.Tensor:
    """Every E4M3 value, every tie between neighbours and the floats either side of it, signs, subnormals."""
    grid = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    grid = grid[grid.isfinite()].unique()
    ties = (grid[1:] + grid[:-1]) / 2
    above, below = ties.nextafter(torch.tensor(math.inf)), ties.nextafter(torch.tensor(-math.inf))
    g = torch.Generator().manual_seed(0)
    log_uniform = torch.exp2(torch.empty(2000).uniform_(-14, 10, generator=g))
    return torch.cat([grid, ties, above, below, log_uniform, -log_uniform])


def matrix(rows: int, cols: int, seed: int, outlier_cols: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    if outlier_cols:
        x[:, torch.randperm(cols, generator=g)[:outlier_cols]] *= 100.0
    return x


# --- e4m3_encode ---------------------------------------------------------------------------------------------------
@pytest.mark.exercise("e4m3_encode")
def test_e4m3_encode_hand_examples(exercise):
    values = torch.tensor([1.0, -2.5, 448.0, 2.0**-9, 0.0, 1.75 * 2.0**-7, 0.5])
    expected = [0x38, 0xC2, 0x7E, 0x01, 0x00, 0x07, 0x30]  # 0x07: the largest subnormal, 7 * 2^-9
    codes = exercise(values)
    assert codes.dtype == torch.uint8 and codes.shape == values.shape
    assert codes.tolist() == expected


@pytest.mark.exercise("e4m3_encode")
def test_e4m3_encode_rounds_half_to_even(exercise):
    # 1 + 1/16 lies halfway between 1 (mantissa 0, even) and 1.125 (mantissa 1); 1 + 3/16 between 1.125 and 1.25
    # (mantissa 2, even). Half away from zero would give 0x39 and 0x3A, 0x3B... on the first.
    assert exercise(torch.tensor([1.0625, 1.1875, -1.0625, 2.0**-10, 3 * 2.0**-10])).tolist() == \
        [0x38, 0x3A, 0xB8, 0x00, 0x02]


@pytest.mark.exercise("e4m3_encode")
def test_e4m3_encode_carries_saturates_and_keeps_signs(exercise):
    values = torch.tensor([15.5, 15.4, 449.0, 464.0, 1e9, -1e9, math.inf, -math.inf, math.nan, -1e-5, -0.0])
    assert exercise(values).tolist() == [0x58, 0x57, 0x7E, 0x7E, 0x7E, 0xFE, 0x7E, 0xFE, 0x7F, 0x80, 0x80]


@pytest.mark.exercise("e4m3_encode")
def test_e4m3_encode_keeps_subnormals(exercise):
    subnormals = torch.arange(1, 8) * 2.0**-9  # M * 2^-9, exponent field 0: flushing them to zero loses them all
    assert exercise(subnormals).tolist() == list(range(1, 8))
    assert exercise(torch.tensor([0.6 * 2.0**-9, 1.4 * 2.0**-9, 2.0**-6])).tolist() == [0x01, 0x01, 0x08]


@pytest.mark.exercise("e4m3_encode")
def test_e4m3_encode_matches_torch_on_every_code_and_tie(exercise):
    values = rounding_probes()
    codes, expected = exercise(values), torch_codes(values)
    wrong = codes != expected
    assert not wrong.any(), f"{int(wrong.sum())} wrong codes, e.g. {values[wrong][:6].tolist()}"


# --- quantize_blocks / dequantize_blocks ----------------------------------------------------------------------------
@pytest.mark.exercise("quantize_blocks")
def test_quantize_blocks_hand_example(exercise):
    x = torch.tensor([[1.0, -2.0, 0.0, 0.0], [0.5, 0.25, 0.0, 0.0]])
    q, s = exercise(x, 1, 2)  # one scale per pair of elements of a row
    assert q.dtype == FP8 and s.dtype == torch.float32 and s.shape == (2, 2)
    assert_close(s, torch.tensor([[2 / 448, 1e-4 / 448], [0.5 / 448, 1e-4 / 448]]))
    assert q.float().tolist() == [[224.0, -448.0, 0.0, 0.0], [448.0, 224.0, 0.0, 0.0]]  # amax lands on 448


@pytest.mark.exercise("quantize_blocks")
@pytest.mark.parametrize("rows, cols", [(4, 256), (3, 300), (1, 64)])
def test_quantize_blocks_1x128_equals_act_quant(exercise, rows, cols):
    x = matrix(rows, cols, rows + cols, outlier_cols=2)
    q, s = exercise(x, 1, 128)
    ref_q, ref_s = R.act_quant(x)
    assert s.shape == ref_s.shape and torch.equal(s, ref_s)
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))


@pytest.mark.exercise("quantize_blocks")
@pytest.mark.parametrize("rows, cols", [(256, 256), (576, 300), (130, 10)])
def test_quantize_blocks_128x128_equals_weight_quant(exercise, rows, cols):
    x = matrix(rows, cols, rows * cols) * 0.02
    q, s = exercise(x, 128, 128)
    ref_q, ref_s = R.weight_quant(x)
    assert s.shape == ref_s.shape and torch.equal(s, ref_s)  # 576 x 300: 5 x 3 blocks, partial ones included
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))


@pytest.mark.exercise("quantize_blocks")
def test_quantize_blocks_zero_block_stays_finite(exercise):
    x = torch.zeros(2, 256)
    x[0, 128:] = 3.0
    q, s = exercise(x, 1, 128)
    assert s.isfinite().all() and (q[:, :128].float() == 0).all() and (q[0, 128:].float() == 448).all()


@pytest.mark.exercise("dequantize_blocks")
@pytest.mark.parametrize("block", [(1, 128), (128, 128), (32, 16)])
def test_dequantize_blocks_inverts_the_reference(exercise, block):
    x = matrix(300, 200, 7, outlier_cols=3)
    q, s = R.act_quant(x, block[1]) if block == (1, 128) else (None, None)
    if block == (128, 128):
        q, s = R.weight_quant(x)
    if block == (32, 16):  # a made-up grid: one scale per block, written out here
        s = torch.rand(10, 13) + 0.5
        q = (x / s.repeat_interleave(32, 0).repeat_interleave(16, 1)[:300, :200]).clamp(-448, 448).to(FP8)
    out = exercise(q, s, *block)
    assert out.dtype == torch.float32 and out.shape == (300, 200)
    expected = q.float() * s.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:300, :200]
    assert torch.equal(out, expected)
    if block == (1, 128):
        assert torch.equal(out, R.act_dequant(q, s))
    if block == (128, 128):
        assert torch.equal(out, R.weight_dequant(q, s, dtype=torch.float32))


@pytest.mark.exercise("dequantize_blocks")
def test_dequantize_blocks_error_is_within_half_an_e4m3_step(exercise):
    x = matrix(64, 256, 3, outlier_cols=4)
    out = exercise(*R.act_quant(x), 1, 128)
    _, s = R.act_quant(x)
    bound = x.abs() / 16 + s.repeat_interleave(128, 1) * 2.0**-10  # 3 mantissa bits; subnormal steps of 2^-9 * s
    assert ((out - x).abs() <= bound * (1 + 1e-6)).all()


# --- limited_precision_sum ------------------------------------------------------------------------------------------
@pytest.mark.exercise("limited_precision_sum")
def test_limited_precision_sum_hand_example(exercise):
    products = torch.tensor([1.0] + [1 / 16] * 15, dtype=torch.float64)
    assert exercise(products, 4).item() == 1.0  # swamped: 1 + 1/16 needs 5 bits
    assert exercise(products, 4, 4).item() == 1.75  # promoted every 4: the later groups survive
    assert exercise(products, 5).item() == 1.9375  # 5 bits hold every partial sum exactly
    assert exercise(torch.tensor([1.0, 2.0**-4, 2.0**-4, 2.0**-4], dtype=torch.float64), 4, 2).item() == 1.125


@pytest.mark.exercise("limited_precision_sum")
def test_limited_precision_sum_truncates_towards_zero(exercise):
    # 1 + 15/16 = 1.9375 -> 4 bits: 1.875 truncated (nearest would give 2.0); negative sums move towards zero too.
    assert exercise(torch.tensor([1.0, 15 / 16], dtype=torch.float64), 4).item() == 1.875
    assert exercise(torch.tensor([-1.0, -15 / 16], dtype=torch.float64), 4).item() == -1.875


@pytest.mark.exercise("limited_precision_sum")
@pytest.mark.parametrize("acc_bits, promote_every", [(14, None), (14, 128), (10, 32), (8, 100)])
def test_limited_precision_sum_matches_the_library(exercise, acc_bits, promote_every):
    g = torch.Generator().manual_seed(acc_bits)
    products = (torch.rand(16, 8, 500, generator=g) * torch.randn(16, 8, 500, generator=g)).double()
    out = exercise(products, acc_bits, promote_every)
    assert out.shape == (16, 8) and out.dtype == torch.float64
    assert torch.equal(out, library_sum(products, acc_bits, promote_every))


# --- block_scaled_matmul --------------------------------------------------------------------------------------------
def operands(M: int, N: int, K: int, seed: int = 0):
    a_q, a_s = R.act_quant(matrix(M, K, seed, outlier_cols=2))
    b_q, b_s = R.weight_quant(matrix(N, K, seed + 1) * 0.05)
    return a_q, a_s, b_q, b_s


@pytest.mark.exercise("block_scaled_matmul")
@pytest.mark.parametrize("M, N, K", [(16, 256, 384), (5, 130, 300), (1, 1, 64)])
def test_block_scaled_matmul_matches_fp8_gemm(exercise, M, N, K):
    a_q, a_s, b_q, b_s = operands(M, N, K)
    c = exercise(a_q, a_s, b_q, b_s)
    ref = R.fp8_gemm(a_q, a_s, b_q, b_s, out_dtype=torch.float32)
    assert c.shape == (M, N) and c.dtype == torch.float32
    assert_close(c, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.exercise("block_scaled_matmul")
def test_block_scaled_matmul_uses_each_blocks_own_scale(exercise):
    # Two K steps and two row blocks of b, each with a different scale: all four scales must land where they belong.
    a_q, b_q = torch.ones(1, 256).to(FP8), torch.ones(256, 256).to(FP8)
    a_s, b_s = torch.tensor([[1.0, 10.0]]), torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    c = exercise(a_q, a_s, b_q, b_s)
    assert c[0, 0].item() == 128 * (1 * 1 + 10 * 2) and c[0, 200].item() == 128 * (1 * 3 + 10 * 4)


def promoted_reference(a_q, a_s, b_q, b_s, acc_bits: int, interval: int = 128) -> torch.Tensor:
    """Products summed by the library's limited accumulator `interval` at a time (the 128-wide scales of the step
    applied), each partial promoted to a float32 total."""
    a, b = a_q.double(), b_q.double()
    b_rows = b_s.repeat_interleave(128, 0)[: b.shape[0]]
    c = torch.zeros(a.shape[0], b.shape[0])
    for start in range(0, a.shape[1], interval):
        j = start // 128
        products = a[:, None, start:start + interval] * b[None, :, start:start + interval]
        c += library_sum(products, acc_bits).float() * a_s[:, j, None] * b_rows[None, :, j]
    return c


@pytest.mark.exercise("block_scaled_matmul")
def test_block_scaled_matmul_promotes_every_block(exercise):
    a_q, a_s, b_q, b_s = operands(4, 130, 512, seed=3)
    c = exercise(a_q, a_s, b_q, b_s, acc_bits=8)
    expected = promoted_reference(a_q, a_s, b_q, b_s, acc_bits=8)
    tolerance = 1e-6 * expected.abs().max().item()
    assert_close(c, expected, rtol=1e-6, atol=tolerance)
    # 8 bits lose precision, and promoting every 64 products instead of 128 gives a visibly different result:
    exact = R.fp8_gemm(a_q, a_s, b_q, b_s, out_dtype=torch.float32)
    assert (c - exact).abs().max() > 1e3 * tolerance
    assert (promoted_reference(a_q, a_s, b_q, b_s, 8, interval=64) - expected).abs().max() > 1e2 * tolerance
