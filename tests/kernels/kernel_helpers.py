"""Helpers for the kernels tests.

The tests call the public `kernels` functions, which run on the active backend (Triton's interpreter on a
CPU with Triton, compiled kernels on a GPU, plain PyTorch without Triton), and compare them with
`kernels.reference`. Interpreted kernels take tens to hundreds of milliseconds per call, hence few
hypothesis examples and no deadline; derandomize keeps runs reproducible.
"""

import math

import torch
from hypothesis import settings

import kernels

FP8 = torch.float8_e4m3fn

FEW = settings(max_examples=12, deadline=None, derandomize=True)


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
