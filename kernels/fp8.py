"""Block-scaled FP8 (E4M3) in Triton: activation and weight quantization, dequantization, and the GEMM.

The numerics are those of `kernels.reference` (read its module docstring first); this file is about how the
work is tiled. Every kernel runs compiled on a CUDA GPU and, unchanged, in Triton's interpreter on a CPU.

act_quant  x [M, K] -> q [M, K], s [M, ceil(K/128)]
    grid (ceil(M / BLOCK_M), ceil(K / 128)); one program owns a [BLOCK_M, 128] tile: BLOCK_M tokens times
    one 128-wide slice of features. Each row of the tile is its own 1 x 128 quantization group: the program
    reduces |x| along the row (amax -> scale), divides, rounds and stores BLOCK_M scales. The load is masked
    past M (rows) and past K (the last, partial slice); masked elements read as 0 and so never raise amax.

weight_quant  w [B, N, K] -> q [B, N, K], s [B, ceil(N/128), ceil(K/128)]
    grid (ceil(N / 128), ceil(K / 128), B); one program owns one 128 x 128 block and produces one scale.
    Loads are masked past N and K, which is how a 576 x 7168 weight gets 5 x 56 blocks.

weight_dequant  the same grid; a program loads one block of codes and its scale and writes q * s.

fp8_gemm  C [M, N] = A [M, K] . B [N, K]^T
    grid (ceil(M / BLOCK_M), ceil(N / BLOCK_N)); one program computes one [BLOCK_M, BLOCK_N] tile of C and
    walks K in steps of BLOCK_K = 128, the quantization block. Per step it loads an A tile [BLOCK_M, 128]
    (rows of A, K contiguous) and a B tile [128, BLOCK_N] (rows of B read as columns, K still contiguous,
    the K-major layout FP8 tensor cores want), takes their FP8 x FP8 product with tl.dot into a fresh
    float32 partial, and only then applies the scales: partial * a_s[:, None] * b_s[None, :], a_s being
    the BLOCK_M per-token scales of this K step and b_s the scale of each column's 128-row weight block
    (or, with B_ROW_SCALES, each column's own scale of this K step: B quantized in 1 x 128 tiles, the
    weight-gradient GEMM of FP8 training, where both operands are activations or gradients).
    The scaled partial is added to a float32 accumulator. That is DeepSeek-V3's promotion: the tensor core
    accumulates at most 128 products at its limited internal precision before the sum moves to float32.
    Loads are masked past M, N and K (a partial last step contributes zeros).

Bit-exact rounding. The E4M3 codes must equal torch's `.to(torch.float8_e4m3fn)`. Compiled Triton rounds
float32 -> fp8 to nearest even, but the 3.9 interpreter truncates its carry (126.3 -> 64), rounds ties away
from zero and flushes small subnormals. `_round_to_e4m3` therefore rounds to the E4M3 grid in float32
arithmetic first; the value is then exactly representable and the final cast is exact everywhere. For the
same reason bf16 outputs go through `_cast_rne` (the interpreter truncates float32 -> bf16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import AMAX_FLOOR, FP8, FP8_MAX, cdiv

# Constants a kernel reads must be tl.constexpr globals.
NAN_CODE = tl.constexpr(0x7F)  # E4M3 NaN, stored as a byte: the interpreter's float32 -> fp8 cast never gives it
SIGN_BIT = tl.constexpr(-0x80000000)  # float32's sign bit, as an int32
RNE_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: v + this - this is v rounded to an integer, ties to even
_FP8_MAX = tl.constexpr(FP8_MAX)


@triton.jit
def _round_to_e4m3(y):
    """float32 y in [-448, 448] -> the nearest E4M3 value (ties to even), still as float32."""
    bits = y.to(tl.int32, bitcast=True)
    biased_exp = (bits >> 23) & 0xFF
    # E4M3 keeps 3 bits after the leading one, so near y the grid spacing is 2^(exponent - 3); below the
    # smallest normal 2^-6 the subnormals keep the spacing 2^-9. Build 2^e and 2^-e from exponent bits.
    quantum_exp = tl.maximum(biased_exp, 127 - 6) - 3
    quantum = (quantum_exp << 23).to(tl.float32, bitcast=True)
    inv_quantum = ((254 - quantum_exp) << 23).to(tl.float32, bitcast=True)
    steps = tl.abs(y) * inv_quantum  # exact (power-of-two scaling), < 16
    rounded = ((steps + RNE_MAGIC) - RNE_MAGIC) * quantum  # >= 0
    # The sign bit copied back in, so that values rounding to zero keep it (-1e-5 -> -0.0, as torch does). Not
    # `-rounded`: compiled Triton negates as 0 - x, which turns -0.0 into +0.0 (seen on an H200).
    sign = bits & SIGN_BIT
    return (rounded.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _cast_rne(x, dtype: tl.constexpr):
    """float32 -> `dtype` rounding to nearest even on every backend (bf16 is rounded in integer bits first)."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _nonfinite(x):
    """1 where x is NaN or ±Inf (both fail `< inf`), else 0; int32 so that tiles can be max-reduced."""
    return tl.where(tl.abs(x) < float("inf"), 0, 1)


@triton.jit
def _scale(amax, bad, amax_floor):
    """Per-tile scale: amax / 448 with amax floored; NaN where the tile held a non-finite value."""
    s = tl.div_rn(tl.maximum(amax, amax_floor), _FP8_MAX)
    return tl.where(bad, float("nan"), s)


@triton.jit
def _quantize(x, s, bad):
    """float32 values and their (broadcast) scale -> E4M3 codes as uint8; bad tiles become NaN codes.

    tl.div_rn is IEEE division (plain `/` compiles to an approximate one), so x / s matches torch exactly.
    """
    y = tl.minimum(tl.maximum(tl.div_rn(x, s), -_FP8_MAX), _FP8_MAX)
    codes = _round_to_e4m3(y).to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    return tl.where(bad, NAN_CODE, codes)


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, M, K, NK, amax_floor, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # [BLOCK_K]
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    offs = rows[:, None].to(tl.int64) * K + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_K]
    bad = tl.max(_nonfinite(x), axis=1) > 0  # [BLOCK_M]
    s = _scale(tl.max(tl.abs(x), axis=1), bad, amax_floor)  # [BLOCK_M], one scale per row of the tile
    tl.store(q_ptr + offs, _quantize(x, s[:, None], bad[:, None]), mask=mask)
    tl.store(s_ptr + rows * NK + pid_k, s, mask=rows < M)


@triton.jit
def _weight_block(N, K, BLOCK: tl.constexpr):
    """This program's BLOCK x BLOCK block of a [batch, N, K] weight: element offsets, in-bounds mask, scale index."""
    pid_n, pid_k, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_n * BLOCK + tl.arange(0, BLOCK)
    cols = pid_k * BLOCK + tl.arange(0, BLOCK)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    offs = batch.to(tl.int64) * N * K + rows[:, None].to(tl.int64) * K + cols[None, :]
    scale_idx = (batch * tl.num_programs(0) + pid_n) * tl.num_programs(1) + pid_k
    return offs, mask, scale_idx


@triton.jit
def _weight_quant_kernel(w_ptr, q_ptr, s_ptr, N, K, amax_floor, BLOCK: tl.constexpr):
    offs, mask, scale_idx = _weight_block(N, K, BLOCK)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK, BLOCK]
    bad = tl.max(tl.max(_nonfinite(w), axis=1), axis=0) > 0
    s = _scale(tl.max(tl.max(tl.abs(w), axis=1), axis=0), bad, amax_floor)  # one scale for the whole block
    tl.store(q_ptr + offs, _quantize(w, s, bad), mask=mask)
    tl.store(s_ptr + scale_idx, s)


@triton.jit
def _weight_dequant_kernel(q_ptr, s_ptr, w_ptr, N, K, BLOCK: tl.constexpr):
    offs, mask, scale_idx = _weight_block(N, K, BLOCK)
    q = tl.load(q_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + scale_idx)
    tl.store(w_ptr + offs, _cast_rne(q * s, w_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fp8_gemm_kernel(a_ptr, a_s_ptr, b_ptr, b_s_ptr, c_ptr, M, N, K, NK,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, B_ROW_SCALES: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # rows of A and C
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # rows of B, columns of C
    ks = tl.arange(0, BLOCK_K)
    row_ok, col_ok = rows < M, cols < N
    a_ptrs = a_ptr + rows[:, None].to(tl.int64) * K + ks[None, :]  # [BLOCK_M, BLOCK_K]
    b_ptrs = b_ptr + cols[None, :].to(tl.int64) * K + ks[:, None]  # [BLOCK_K, BLOCK_N]
    a_s_ptrs = a_s_ptr + rows * NK  # [BLOCK_M]: this row's scale of K step 0
    if B_ROW_SCALES:
        b_s_ptrs = b_s_ptr + cols * NK  # [BLOCK_N]: this column's own 1 x BLOCK_K tile, K step 0
    else:
        b_s_ptrs = b_s_ptr + (cols // BLOCK_K) * NK  # [BLOCK_N]: this column's weight block, K step 0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(NK):
        k_ok = ks < K - step * BLOCK_K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        a_s = tl.load(a_s_ptrs + step, mask=row_ok, other=0.0)
        b_s = tl.load(b_s_ptrs + step, mask=col_ok, other=0.0)
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]  # promote this 128-deep partial to float32
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    c_ptrs = c_ptr + rows[:, None].to(tl.int64) * N + cols[None, :]
    tl.store(c_ptrs, _cast_rne(acc, c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _rows_per_program(M: int) -> int:
    """Rows per act_quant program: enough to amortise launch costs, a power of two for tl.arange."""
    return min(64, triton.next_power_of_2(max(M, 1)))


def _gemm_config(M: int) -> dict:
    """Tile sizes for fp8_gemm: a decode-sized M gets a short tile so few rows are masked off. At most
    (64 x 128 + 128 x 128) bytes per pipeline stage: three stages fit Ada's shared memory as well as Hopper's."""
    return dict(BLOCK_M=min(64, max(16, triton.next_power_of_2(M))), BLOCK_N=128, num_warps=4, num_stages=3)


def act_quant(x: torch.Tensor, block_size: int = 128,
              amax_floor: float = AMAX_FLOOR) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.contiguous()
    K = x.shape[-1]
    M, NK = x.numel() // K, cdiv(K, block_size)
    q = torch.empty(x.shape, dtype=FP8, device=x.device)
    s = torch.empty(*x.shape[:-1], NK, dtype=torch.float32, device=x.device)
    if M:
        block_m = _rows_per_program(M)
        _act_quant_kernel[(cdiv(M, block_m), NK)](x, q.view(torch.uint8), s, M, K, NK, amax_floor,
                                                 BLOCK_M=block_m, BLOCK_K=block_size)
    return q, s


def weight_quant(w: torch.Tensor, block_size: int = 128,
                 amax_floor: float = AMAX_FLOOR) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.contiguous()
    N, K = w.shape[-2:]
    batch = w.numel() // max(N * K, 1)
    grid = (cdiv(N, block_size), cdiv(K, block_size), batch)
    q = torch.empty(w.shape, dtype=FP8, device=w.device)
    s = torch.empty(*w.shape[:-2], *grid[:2], dtype=torch.float32, device=w.device)
    if w.numel():
        _weight_quant_kernel[grid](w, q.view(torch.uint8), s, N, K, amax_floor, BLOCK=block_size)
    return q, s


def weight_dequant(q: torch.Tensor, s: torch.Tensor, block_size: int = 128,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    q, s = q.contiguous(), s.contiguous()
    N, K = q.shape[-2:]
    w = torch.empty(q.shape, dtype=dtype or torch.get_default_dtype(), device=q.device)
    if q.numel():
        grid = (cdiv(N, block_size), cdiv(K, block_size), q.numel() // (N * K))
        _weight_dequant_kernel[grid](q, s, w, N, K, BLOCK=block_size)
    return w


def fp8_gemm(a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor,
             block_size: int = 128, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    a_q, a_s, b_q, b_s = (t.contiguous() for t in (a_q, a_s, b_q, b_s))
    K = a_q.shape[-1]
    M, (N, NK) = a_q.numel() // max(K, 1), (b_q.shape[0], cdiv(K, block_size))
    c = torch.empty(*a_q.shape[:-1], N, dtype=out_dtype, device=a_q.device)
    if c.numel():
        cfg = _gemm_config(M)
        grid = (cdiv(M, cfg["BLOCK_M"]), cdiv(N, cfg["BLOCK_N"]))
        row_scales = b_s.shape[0] != cdiv(N, block_size)  # [N, NK] rather than [ceil(N / bs), NK]
        _fp8_gemm_kernel[grid](a_q, a_s, b_q, b_s, c, M, N, K, NK, BLOCK_K=block_size, B_ROW_SCALES=row_scales, **cfg)
    return c
