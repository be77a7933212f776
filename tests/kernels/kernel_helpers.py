"""Helpers for the kernels tests.

The tests call the public `kernels` functions, which run on the active backend (Triton's interpreter on a
CPU with Triton, compiled kernels on a GPU, plain PyTorch without Triton), and compare them with
`kernels.reference`. Interpreted kernels take tens to hundreds of milliseconds per call, hence few
hypothesis examples, no deadline and no shrinking; derandomize keeps runs reproducible.
"""

import math

import pytest
import torch
from hypothesis import Phase, settings

import kernels

FP8 = torch.float8_e4m3fn

# For tests that compare the kernels with kernels.reference: where CPU tensors take the reference itself (no Triton
# installed, or compiled Triton, which runs CUDA tensors only), such a comparison would prove nothing.
needs_kernels = pytest.mark.skipif(kernels.backend("cpu") == "torch",
                                   reason="the kernels for CPU tensors are kernels.reference itself here")

# No shrinking: with interpreted kernels, shrinking a failing example to a minimal one takes many minutes.
FEW = settings(max_examples=12, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate])


def codes(q: torch.Tensor) -> torch.Tensor:
    """E4M3 tensor as its bytes, to compare bit for bit (then NaN == NaN and -0 != +0)."""
    return q.view(torch.uint8)


def randn(shape, seed: int, log10_scale: float = 0.0, dtype=torch.float32, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 10.0**log10_scale).to(dtype=dtype, device=device)


def rounding_probes() -> torch.Tensor:
    """Values in [-448, 448] that exercise E4M3 rounding: every code, every tie between neighbouring codes
    and the floats just either side of it, mantissa carries, subnormals, signed zeros, random values."""
    grid = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    grid = grid[grid.isfinite()].unique()  # sorted, 253 values (-0 and +0 merge)
    ties = (grid[1:] + grid[:-1]) / 2  # exact in float32
    above, below = ties.nextafter(torch.tensor(math.inf)), ties.nextafter(torch.tensor(-math.inf))
    g = torch.Generator().manual_seed(0)
    log_uniform = torch.exp2(torch.empty(3000).uniform_(-14, math.log2(448), generator=g))
    special = torch.tensor([126.3, 247.9, 15.99, 0.0, -0.0, 1e-5, -1e-5, 1e-40, -1e-45, 2**-10, 3 * 2**-10, 448.0])
    values = torch.cat([grid, ties, above, below, log_uniform, -log_uniform, special])
    return values[values.abs() <= 448]


def quantize_unscaled(values: torch.Tensor) -> torch.Tensor:
    """act_quant with every 128-tile led by 448, so its scale is exactly 1 and q = round(value)."""
    n = values.numel()
    rows = math.ceil(n / 127)
    body = values.new_zeros(rows * 127)
    body[:n] = values
    x = torch.cat([values.new_full((rows, 1), 448.0), body.view(rows, 127)], dim=1)
    q, s = kernels.act_quant(x)
    assert torch.equal(s, torch.ones_like(s))
    return q[:, 1:].reshape(-1)[:n]


# ---- independent oracles: the published rules written out one row, one token, one expert at a time ----

def dequantize_blocks(q: torch.Tensor, s: torch.Tensor, block: int = 128) -> torch.Tensor:
    """q [..., N, K] E4M3 codes with s [..., ceil(N / block), ceil(K / block)] -> float64 q * (its block's scale)."""
    N, K = q.shape[-2:]
    scale = s.double().repeat_interleave(block, dim=-2)[..., :N, :].repeat_interleave(block, dim=-1)[..., :K]
    return q.double() * scale


def quantize_row(v: torch.Tensor, block: int = 128) -> torch.Tensor:
    """One activation row [K] through E4M3 and back, tile by tile, as specified: per 1 x block tile the float32
    scale s = max(amax, 1e-4) / 448 and the code e4m3(v / s), saturating at 448. Returns float64 q * s."""
    v = v.float()
    out = torch.empty(v.shape, dtype=torch.float64)
    for start in range(0, v.numel(), block):
        tile = v[start:start + block]
        s = tile.abs().max().clamp_min(1e-4) / 448
        out[start:start + block] = (tile / s).clamp(-448, 448).to(FP8).double() * s.double()
    return out


def moe_per_token(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, w1_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
                  block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """y[t] = sum_j topk_weights[t, j] W2[e] (silu(W_gate[e] x[t]) * W_up[e] x[t]), e = topk_ids[t, j], one token
    and one slot at a time in float64. FP8 weights (scales given) are dequantized per block, and the activations
    quantized where the w8a8 kernel quantizes them: x[t], and the SwiGLU output after its rounding to x.dtype.

    Returns y [T, H] and sum_j |w_j| (|W2[e]| |h_j|) [T, H], float64: the size of the down projection's terms,
    which its rounding errors (and those of its input h_j) scale with.
    """
    fp8 = w1_scale is not None
    I = w2.shape[-1]
    W1 = [dequantize_blocks(w, s, block) for w, s in zip(w1, w1_scale, strict=True)] if fp8 else w1.double()
    W2 = [dequantize_blocks(w, s, block) for w, s in zip(w2, w2_scale, strict=True)] if fp8 else w2.double()
    y = torch.zeros(x.shape, dtype=torch.float64)
    y_abs = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        a = quantize_row(x[t], block) if fp8 else x[t].double()
        for weight, e in zip(topk_weights[t].tolist(), topk_ids[t].tolist(), strict=True):
            gate, up = W1[e][:I] @ a, W1[e][I:] @ a
            h = (torch.nn.functional.silu(gate) * up).to(x.dtype)  # the kernel stores it in x.dtype
            h = quantize_row(h, block) if fp8 else h.double()
            y[t] += weight * (W2[e] @ h)
            y_abs[t] += abs(weight) * (W2[e].abs() @ h.abs())
    return y, y_abs
