"""The compiled kernels on a CUDA GPU, at DeepSeek-V3 sizes, against the reference on the same device."""

import pytest
import torch
from kernel_helpers import codes, quantize_unscaled, randn, rounding_probes

import kernels
from kernels import reference as R

pytestmark = pytest.mark.gpu
CUDA = "cuda"


@pytest.fixture(autouse=True)
def compiled():
    if kernels.backend() != "triton":
        pytest.skip(f"the kernels backend here is {kernels.backend()!r}, not compiled Triton")


def test_rounding_is_bit_identical_to_torch():
    values = rounding_probes().to(CUDA)
    assert torch.equal(codes(quantize_unscaled(values)), codes(values.to(torch.float8_e4m3fn)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantization_is_bit_exact_at_v3_sizes(dtype):
    x = randn((4096, 7168), 0, dtype=dtype, device=CUDA)
    q, s = kernels.act_quant(x)
    rq, rs = R.act_quant(x)
    assert torch.equal(codes(q), codes(rq)) and torch.equal(s, rs)
    w = randn((576, 7168), 1, -2, dtype, CUDA)  # kv_a: 5 x 56 blocks, the last row of blocks partial
    q, s = kernels.weight_quant(w)
    rq, rs = R.weight_quant(w)
    assert s.shape == (5, 56) and torch.equal(codes(q), codes(rq)) and torch.equal(s, rs)
    assert torch.equal(kernels.weight_dequant(q, s, dtype=dtype), R.weight_dequant(q, s, dtype=dtype))


@pytest.mark.parametrize("M", [1, 64, 4096])
@pytest.mark.parametrize("N, K", [(1536, 7168), (576, 7168), (7168, 2048)])
def test_fp8_gemm_at_v3_sizes(M, N, K):
    a_q, a_s = kernels.act_quant(randn((M, K), M, device=CUDA))
    b_q, b_s = kernels.weight_quant(randn((N, K), N, -2, device=CUDA))
    c = kernels.fp8_gemm(a_q, a_s, b_q, b_s, out_dtype=torch.float32)
    ref = R.fp8_gemm(a_q, a_s, b_q, b_s, out_dtype=torch.float32)
    # The tensor core sums each 128-deep FP8 step at reduced internal precision (about 2^-14 relative).
    torch.testing.assert_close(c, ref, rtol=1e-3, atol=1e-3 * ref.abs().max().item())
    c16 = kernels.fp8_gemm(a_q, a_s, b_q, b_s)
    torch.testing.assert_close(c16.float(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


@pytest.mark.parametrize("T", [1, 64, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_moe_on_gpu(T, dtype):
    E, k, H, I = 16, 4, 1024, 512
    weights, ids = randn((T, E), T, device=CUDA).softmax(-1).topk(k, dim=-1)
    w1 = (randn((E, 2 * I, H), 0, device=CUDA) / H**0.5).to(dtype)
    w2 = (randn((E, H, I), 1, device=CUDA) / I**0.5).to(dtype)
    x = randn((T, H), 2, dtype=dtype, device=CUDA)
    y, ref = kernels.fused_moe(x, w1, w2, weights, ids), R.fused_moe(x, w1, w2, weights, ids)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(y.float(), ref.float(), rtol=tol, atol=tol * ref.abs().max().item())

    (q1, s1), (q2, s2) = kernels.weight_quant(w1), kernels.weight_quant(w2)
    fp8 = dict(w1=q1, w2=q2, w1_scale=s1, w2_scale=s2, topk_weights=weights, topk_ids=ids)
    y, ref = kernels.fused_moe(x, **fp8), R.fused_moe(x, **fp8)
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2 * ref.abs().max().item())
