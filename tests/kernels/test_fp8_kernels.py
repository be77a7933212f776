"""FP8 quantization and GEMM: bit-exact codes and scales, GEMM against the reference, edge cases, errors."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from kernel_helpers import (
    FEW,
    codes,
    dequantize_blocks,
    needs_kernels,
    quantize_row,
    quantize_unscaled,
    randn,
    rounding_probes,
)

import kernels
from kernels import reference as R

FP8 = torch.float8_e4m3fn
FLOAT_DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])


# ---- rounding: every backend must give torch's bits ----

def test_rounding_is_bit_identical_to_torch(each_backend):
    values = rounding_probes()
    q = quantize_unscaled(values)
    mismatch = codes(q) != codes(values.to(FP8))
    assert not mismatch.any(), f"{int(mismatch.sum())} wrong codes, e.g. {values[mismatch][:8].tolist()}"


@pytest.mark.parametrize("value, expected", [
    (126.3, 128.0),  # rounding carries into the exponent (the interpreter's own cast gives 64)
    (1 + 1 / 16, 1.0),  # tie, to the even code below
    (1 + 3 / 16, 1.25),  # tie, to the even code above
    (2**-10, 0.0),  # tie between 0 and the smallest subnormal 2^-9
    (3 * 2**-10, 2**-8),  # tie between subnormals 1 and 2 (x 2^-9)
    (0.7 * 2**-9, 2**-9),  # a subnormal the interpreter flushes to zero
    (-1e-5, -0.0),  # keeps its sign
])
def test_rounding_cases(value, expected):
    q = quantize_unscaled(torch.tensor([value]))
    assert codes(q).item() == codes(torch.tensor([expected]).to(FP8)).item()


def test_interpreter_cast_is_wrong_which_the_rounding_tests_catch():
    """Why the kernels round in float32 first: Triton 3.9's interpreter casts float32 -> fp8 wrongly.

    A kernel that simply cast would fail test_rounding_is_bit_identical_to_torch and test_rounding_cases;
    this test shows the raw cast getting those very values wrong.
    """
    if kernels.backend() != "interpret":
        pytest.skip("about Triton's interpreter")
    import triton
    import triton.language as tl

    @triton.jit
    def plain_cast(x_ptr, q_ptr, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(q_ptr + offs, tl.load(x_ptr + offs).to(tl.float8e4nv))

    x = torch.tensor([126.3, 1 + 1 / 16, 0.7 * 2**-9, 1.0])
    q = torch.empty(4, dtype=FP8)
    plain_cast[(1,)](x, q, N=4)
    assert q.float().tolist()[:3] != x.to(FP8).float().tolist()[:3]
    assert torch.equal(codes(quantize_unscaled(x)), codes(x.to(FP8)))


def test_scaled_values_above_448_saturate(each_backend):
    # 72.08535766601562 / (72.08535766601562 / 448) = 448.00003 in float32: clamped to 448, never NaN.
    x = torch.full((1, 128), 72.08535766601562)
    assert (x / (x.amax() / 448) > 448).all()
    q, _ = kernels.act_quant(x)
    assert (codes(q) == 0x7E).all()
    assert torch.equal(codes(R.to_e4m3(torch.tensor([449.0, 500.0, 1e9, -1e9]))),
                       torch.tensor([0x7E, 0x7E, 0x7E, 0xFE], dtype=torch.uint8))


# ---- quantization against the reference, bit for bit ----

@needs_kernels
@FEW
@given(lead=st.lists(st.integers(0, 5), max_size=2), K=st.integers(1, 300), block=st.sampled_from([16, 32, 128]),
       dtype=FLOAT_DTYPES, log10_scale=st.integers(-8, 3), seed=st.integers(0, 2**16))
def test_act_quant_matches_reference(lead, K, block, dtype, log10_scale, seed):
    x = randn((*lead, K), seed, log10_scale, dtype)
    q, s = kernels.act_quant(x, block)
    rq, rs = R.act_quant(x, block)
    assert q.dtype == FP8 and s.dtype == torch.float32
    assert s.shape == (*lead, math.ceil(K / block))
    assert torch.equal(codes(q), codes(rq))
    assert torch.equal(s, rs)


@needs_kernels
@FEW
@given(batch=st.lists(st.integers(1, 3), max_size=1), N=st.integers(1, 300), K=st.integers(1, 300),
       block=st.sampled_from([32, 64, 128]), dtype=FLOAT_DTYPES, log10_scale=st.integers(-6, 3),
       seed=st.integers(0, 2**16))
def test_weight_quant_and_dequant_match_reference(batch, N, K, block, dtype, log10_scale, seed):
    w = randn((*batch, N, K), seed, log10_scale, dtype)
    q, s = kernels.weight_quant(w, block)
    rq, rs = R.weight_quant(w, block)
    assert s.shape == (*batch, math.ceil(N / block), math.ceil(K / block))
    assert torch.equal(codes(q), codes(rq))
    assert torch.equal(s, rs)
    w_back = kernels.weight_dequant(q, s, block, dtype)
    assert w_back.dtype == dtype
    assert torch.equal(w_back, R.weight_dequant(q, s, block, dtype))  # one rounding of q * s: exact
    # E4M3 keeps 3 mantissa bits: every element is within 1/16 of its block's amax.
    # (plus one rounding to `dtype`).
    err = (w_back.float() - w.float()).abs()
    assert (err <= s.amax() * 448 / 16 + w.float().abs().amax() * 2**-7).all()


def test_act_quant_amax_floor(each_backend):
    """Tiles below the floor are scaled as if their amax were the floor: tiny gradients need a tiny floor."""
    x = randn((3, 300), 0, -9)  # values around 1e-9: far below the default floor of 1e-4
    for floor in (R.AMAX_FLOOR, 1e-12):
        q, s = kernels.act_quant(x, 128, floor)
        rq, rs = R.act_quant(x, 128, floor)
        assert torch.equal(codes(q), codes(rq)) and torch.equal(s, rs)
    _, s_default = kernels.act_quant(x)
    assert (s_default == torch.tensor(R.AMAX_FLOOR) / R.FP8_MAX).all()
    q, s = kernels.act_quant(x, 128, 1e-12)
    assert ((R.act_dequant(q, s) - x).norm() / x.norm()) < 0.04  # the full E4M3 range, as for values near 1
    with pytest.raises(ValueError, match="amax_floor must be"):
        kernels.act_quant(x, 128, 0.0)
    w = randn((200, 300), 1, -9)
    for floor in (R.AMAX_FLOOR, 1e-12):
        q, s = kernels.weight_quant(w, 128, floor)
        rq, rs = R.weight_quant(w, 128, floor)
        assert torch.equal(codes(q), codes(rq)) and torch.equal(s, rs)
    assert s.max() < R.AMAX_FLOOR / R.FP8_MAX  # with the small floor the scales follow the values (about 1e-9)
    with pytest.raises(ValueError, match="amax_floor must be"):
        kernels.weight_quant(w, 128, float("nan"))


def test_weight_dequant_default_dtype():
    q, s = kernels.weight_quant(torch.randn(3, 5))
    assert kernels.weight_dequant(q, s).dtype == torch.get_default_dtype()


@needs_kernels
@FEW
@given(lead=st.lists(st.integers(1, 4), max_size=2), N=st.integers(1, 160), K=st.integers(1, 300),
       block=st.sampled_from([32, 128]), out_dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 2**16))
def test_fp8_gemm_matches_reference(lead, N, K, block, out_dtype, seed):
    a_q, a_s = R.act_quant(randn((*lead, K), seed), block)
    b_q, b_s = R.weight_quant(randn((N, K), seed + 1, -1), block)
    c = kernels.fp8_gemm(a_q, a_s, b_q, b_s, block, out_dtype)
    ref = R.fp8_gemm(a_q, a_s, b_q, b_s, block, torch.float32)
    assert c.shape == (*lead, N) and c.dtype == out_dtype
    # float32: only the summation order differs; bf16: plus one rounding of the result.
    rtol = 1e-5 if out_dtype == torch.float32 else 2**-8
    torch.testing.assert_close(c.float(), ref, rtol=rtol, atol=rtol * ref.abs().max().item() + 1e-6)


@FEW
@given(M=st.integers(1, 70), N=st.integers(2, 160), K=st.integers(1, 300), block=st.sampled_from([32, 128]),
       seed=st.integers(0, 2**16))
def test_fp8_gemm_with_b_in_row_tiles_matches_reference(M, N, K, block, seed):
    """b from act_quant (one scale per 1 x block tile of each row), the weight-gradient GEMM of FP8 training."""
    a_q, a_s = R.act_quant(randn((M, K), seed), block)
    b = randn((N, K), seed + 1)
    b[0] *= 1e3  # a row whose own scale must not spill onto its neighbours
    b_q, b_s = R.act_quant(b, block)
    c = kernels.fp8_gemm(a_q, a_s, b_q, b_s, block, torch.float32)
    exact = R.act_dequant(a_q, a_s, block) @ R.act_dequant(b_q, b_s, block).T
    torch.testing.assert_close(R.fp8_gemm(a_q, a_s, b_q, b_s, block, torch.float32), exact, rtol=1e-6, atol=0)
    torch.testing.assert_close(c, exact, rtol=1e-5, atol=1e-5 * exact.abs().max().item() + 1e-6)


def test_fp8_gemm_accuracy_against_full_precision():
    a, b = randn((64, 512), 0), randn((256, 512), 1, -1)
    c = kernels.fp8_gemm(*kernels.act_quant(a), *kernels.weight_quant(b), out_dtype=torch.float32)
    exact = a @ b.T
    rel = ((c - exact).norm() / exact.norm()).item()
    assert rel < 0.05, rel  # E4M3's 3 mantissa bits: about 3% per product, averaging down in the sum


# ---- edge cases ----

def test_zero_tiles_get_finite_scale_and_zero_codes(each_backend):
    x = torch.zeros(2, 256)
    x[1, 128:] = torch.randn(128)
    q, s = kernels.act_quant(x)
    floor_scale = torch.tensor(R.AMAX_FLOOR) / R.FP8_MAX
    assert torch.equal(s[:, 0], floor_scale.expand(2)) and torch.equal(s[0, 1], floor_scale)
    assert (codes(q[0]) == 0).all() and (codes(q[1, :128]) == 0).all()
    wq, ws = kernels.weight_quant(torch.zeros(130, 10))
    assert ws.isfinite().all() and (codes(wq) == 0).all()
    assert (kernels.weight_dequant(wq, ws) == 0).all()


def test_non_finite_values_poison_only_their_tile(each_backend):
    x = torch.randn(3, 256)
    x[0, 5], x[1, 200], x[2, 130] = math.nan, math.inf, -math.inf
    q, s = kernels.act_quant(x)
    bad = torch.tensor([[True, False], [False, True], [False, True]])
    assert torch.equal(s.isnan(), bad)
    assert (codes(q).view(3, 2, 128)[bad] == 0x7F).all()
    clean = x.clone()
    clean[bad.repeat_interleave(128, 1)] = 0
    assert torch.equal(codes(q)[~bad.repeat_interleave(128, 1)],
                       codes(kernels.act_quant(clean)[0])[~bad.repeat_interleave(128, 1)])

    w = torch.randn(200, 256)
    w[150, 3] = math.nan
    wq, ws = kernels.weight_quant(w)
    assert torch.equal(ws.isnan(), torch.tensor([[False, False], [True, False]]))
    back = kernels.weight_dequant(wq, ws, dtype=torch.float32)
    assert back[128:, :128].isnan().all() and back.isnan().sum() == 72 * 128

    # Downstream: a NaN activation row spoils that output row, a NaN weight block its output columns.
    a = torch.randn(3, 256)
    a[1, 7] = math.nan
    c = kernels.fp8_gemm(*kernels.act_quant(a), wq, ws, out_dtype=torch.float32)
    expected = torch.zeros(3, 200, dtype=torch.bool)
    expected[1], expected[:, 128:] = True, True
    assert torch.equal(c.isnan(), expected)


def test_ragged_shapes_use_partial_blocks(each_backend):
    # A published checkpoint's 576 x 7168 kv_a weight has 5 x 56 scales; the same rule at a test size, checked
    # against the rule written out block by block and row by row (not against kernels.reference).
    w = torch.randn(576, 300)
    q, s = kernels.weight_quant(w)
    assert s.shape == (5, 3)
    for i in range(5):
        for j in range(3):  # the last row of blocks is 64 rows tall (576 = 4.5 x 128), the last column 44 wide
            block = w[128 * i:128 * (i + 1), 128 * j:128 * (j + 1)]
            scale = block.abs().max() / 448
            assert s[i, j] == scale
            assert torch.equal(codes(q[128 * i:128 * (i + 1), 128 * j:128 * (j + 1)]),
                               codes((block / scale).clamp(-448, 448).to(FP8)))
    x = torch.randn(7, 300)
    a_q, a_s = kernels.act_quant(x)
    assert a_s.shape == (7, 3)
    a = torch.stack([quantize_row(row) for row in x])  # [7, 300] float64, three tiles per row, the last 44 wide
    assert torch.equal(a_q.double() * a_s.double().repeat_interleave(128, dim=1)[:, :300], a)
    c = kernels.fp8_gemm(a_q, a_s, q, s, out_dtype=torch.float32)
    exact = a @ dequantize_blocks(q, s).T  # [7, 576] float64
    # float32 accumulation over three K steps of up to 128 products: about sqrt(300) * 2^-24 of the terms' size.
    torch.testing.assert_close(c.double(), exact, rtol=1e-5, atol=1e-5 * exact.abs().max().item())


def test_empty_batch(each_backend):
    q, s = kernels.act_quant(torch.randn(0, 3, 256))
    assert q.shape == (0, 3, 256) and s.shape == (0, 3, 2)
    b_q, b_s = kernels.weight_quant(torch.randn(4, 256))
    assert kernels.fp8_gemm(q, s, b_q, b_s).shape == (0, 3, 4)


# ---- errors ----

def test_errors_name_the_problem(each_backend):
    x = torch.randn(4, 256)
    a_q, a_s = kernels.act_quant(x)
    b_q, b_s = kernels.weight_quant(torch.randn(8, 256))
    with pytest.raises(TypeError, match="x must have dtype"):
        kernels.act_quant(x.int())
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        kernels.act_quant(x.numpy())
    with pytest.raises(ValueError, match="power of two"):
        kernels.act_quant(x, block_size=100)
    with pytest.raises(ValueError, match="non-empty"):
        kernels.act_quant(torch.randn(4, 0))
    with pytest.raises(ValueError, match="2 or more dimensions"):
        kernels.weight_quant(torch.randn(8))
    with pytest.raises(TypeError, match="q must have dtype torch.float8_e4m3fn"):
        kernels.weight_dequant(b_q.float(), b_s)
    with pytest.raises(ValueError, match=r"s has shape \(1, 3\), expected \(1, 2\)"):
        kernels.weight_dequant(b_q, torch.ones(1, 3))
    with pytest.raises(TypeError, match="a_s must have dtype torch.float32"):
        kernels.fp8_gemm(a_q, a_s.half(), b_q, b_s)
    with pytest.raises(ValueError, match="a_s has shape"):
        kernels.fp8_gemm(a_q, a_s[:, :1], b_q, b_s)
    with pytest.raises(ValueError, match=r"b_s has shape \(2, 2\), expected \(1, 2\)"):
        kernels.fp8_gemm(a_q, a_s, b_q, torch.ones(2, 2))  # neither 128 x 128 blocks nor 1 x 128 row tiles
    with pytest.raises(ValueError, match="b_q must be"):
        kernels.fp8_gemm(a_q, a_s, b_q[:, :128], b_s[:, :1])
    with pytest.raises(TypeError, match="out_dtype"):
        kernels.fp8_gemm(a_q, a_s, b_q, b_s, out_dtype=torch.int8)
    with pytest.raises(ValueError, match="different devices"):
        kernels.fp8_gemm(a_q, a_s.to("meta"), b_q, b_s)
