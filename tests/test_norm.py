"""RMSNorm as every block applies it: computed in float32 whatever the input dtype, rounded once at the end."""

import pytest
import torch

from mini_deepseek.norm import RMSNorm, rms_norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_is_the_exact_value_rounded_once(dtype):
    # Rounded once to `dtype` from float32, each element is within half a unit in the last place of the exact value
    # (2^-8 of it in bf16, 2^-11 in fp16, a fixed 2^-25 among fp16's subnormals), plus float32's own few roundings
    # (2^-20 here). Squares and means taken in the input dtype round several times: here about a quarter of the
    # elements then miss the bound, by up to 2.6x.
    x, weight = (torch.randn(4, 7, 64) * 3).to(dtype), torch.randn(64).to(dtype)
    out = rms_norm(x, weight, 1e-6)
    assert out.dtype == dtype
    x64 = x.double()
    exact = x64 * torch.rsqrt(x64.pow(2).mean(dim=-1, keepdim=True) + 1e-6) * weight.double()
    half_ulp = {torch.float32: 0.0, torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
    subnormal_half_ulp = torch.finfo(dtype).smallest_normal * half_ulp
    assert ((out.double() - exact).abs() <= (half_ulp + 2**-20) * exact.abs() + subnormal_half_ulp).all()
    module = RMSNorm(64).to(dtype)
    module.weight.data.copy_(weight)
    assert torch.equal(module(x), out)
