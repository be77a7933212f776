"""Exercise set 04: FP8 by hand. E4M3 encoding with its rounding rules, fine-grained scaling in 1 x 128 tiles and
128 x 128 blocks, the block-scaled GEMM that promotes every 128 products, and a tensor core's limited-precision
accumulator (DeepSeek-V3 section 3.3; notebooks/04_fp8_quantization.ipynb).

Replace each `raise NotImplementedError` with your implementation, then grade it in a notebook with
`check("e4m3_encode")` or from the shell with `make grade`. Reference answers: solutions/ex04_fp8.py.
"""

import torch

E4M3_MAX = 448.0  # 1.75 * 2^8: the largest finite E4M3 value
AMAX_FLOOR = 1e-4  # a tile's amax is at least this, so an all-zero tile gets a finite scale


def e4m3_encode(x: torch.Tensor) -> torch.Tensor:
    """The E4M3 (float8_e4m3fn) byte of the nearest representable value to each element of x, worked out by hand.

    x: float32 tensor, any shape. Returns a uint8 tensor of the same shape; do not use torch's float8 cast.
    Layout: 1 sign bit, 4 exponent bits E (bias 7), 3 mantissa bits M.
        normal,    E in 1..15:  value = 2^(E - 7) * (1 + M / 8)      (E = 15 with M = 7 is NaN: no infinities)
        subnormal, E = 0:       value = 2^-6 * (M / 8) = M * 2^-9    (so 2^-9 is the smallest positive value)
    Rules:
        - round to nearest, ties to even (the even M; between 0 and 2^-9 the tie goes to 0);
        - a rounding that carries (M would be 8) moves to the next exponent: 15.5 rounds to 16, code 0x58;
        - saturate: every |x| beyond 448 (infinities too) becomes the largest finite value, 0x7E or 0xFE;
        - NaN becomes 0x7F; the sign bit is kept for values that round to zero (-1e-5 -> 0x80).
    Examples: 1.0 -> 0x38, -2.5 -> 0xC2, 448 -> 0x7E, 2^-9 -> 0x01, 1.0625 (a tie) -> 0x38, 1.1875 -> 0x3A.
    """
    raise NotImplementedError("Exercise e4m3_encode: sign, exponent and a 3-bit mantissa rounded to nearest even")


def quantize_blocks(x: torch.Tensor, block_rows: int, block_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fine-grained FP8 quantization of a matrix: one scale per block_rows x block_cols block (DeepSeek-V3 fig. 7a).

    x: [R, C] float32. Blocks tile x from the top-left corner; the last block along a dimension may be partial
    (ceil(R / block_rows) x ceil(C / block_cols) blocks). For every block:
        s = max(amax, AMAX_FLOOR) / E4M3_MAX          amax = the largest |x| in the block
        q = E4M3(x / s)  for each element             (nearest, ties to even; here you may use
                                                       (x / s).clamp(-448, 448).to(torch.float8_e4m3fn))
    so that x ≈ q * s and the block's largest element lands on ±448. Returns (q [R, C] float8_e4m3fn,
    s [ceil(R / block_rows), ceil(C / block_cols)] float32). (1, 128) gives DeepSeek-V3's per-token activation tiles,
    (128, 128) its weight blocks.
    """
    raise NotImplementedError("Exercise quantize_blocks: one scale amax / 448 per block, then E4M3 of x / s")


def dequantize_blocks(q: torch.Tensor, s: torch.Tensor, block_rows: int, block_cols: int) -> torch.Tensor:
    """The inverse of quantize_blocks: q [R, C] float8_e4m3fn, s [ceil(R / block_rows), ceil(C / block_cols)]
    float32 -> q * s [R, C] float32, every element multiplied by the scale of its own block."""
    raise NotImplementedError("Exercise dequantize_blocks: multiply each element by its block's scale")


def limited_precision_sum(products: torch.Tensor, acc_bits: int = 14, promote_every: int | None = None) -> torch.Tensor:
    """A tensor core's accumulator: sum products over the last dimension, one addition at a time, keeping only
    acc_bits significant bits after each addition (the rest truncated, i.e. rounded towards zero).

    products: [..., K] float64. Keep a float64 accumulator acc (starting at 0.0) per output; for k = 0 .. K-1:
        acc = truncate(acc + products[..., k])   where truncate keeps the acc_bits leading bits of the significand:
              with acc + p = m * 2^e, 0.5 <= |m| < 1 (torch.frexp), the result is trunc(m * 2^acc_bits) * 2^(e - acc_bits)
    promote_every=None: return acc. promote_every=n (DeepSeek-V3 promotes every N_C = 128): after every n products,
    add acc to a float32 total and restart acc from 0.0; at the end add what is left. Return the total, as float64.
    Returns a float64 tensor of shape products.shape[:-1].
    Example, acc_bits=4: 1 + 1/16 needs 5 significant bits, so it truncates back to 1: [1.0] + [1/16] * 15 sums to
    1.0 (every addition is lost; the exact sum is 1.9375), while with promote_every=4 the three later groups of four
    1/16s start from zero and survive: 1.0 + 3 * 0.25 = 1.75.
    """
    raise NotImplementedError("Exercise limited_precision_sum: add one product at a time, truncate to acc_bits bits")


def block_scaled_matmul(a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor,
                        block_size: int = 128, acc_bits: int | None = None) -> torch.Tensor:
    """C = (a_q * a_s) @ (b_q * b_s)^T the way DeepSeek-V3's FP8 GEMM computes it, one K step of block_size at a time.

    a_q [M, K] float8_e4m3fn with a_s [M, ceil(K / bs)] (1 x bs tiles, per token); b_q [N, K] float8_e4m3fn with
    b_s [ceil(N / bs), ceil(K / bs)] (bs x bs weight blocks). For each K step j (columns j*bs .. (j+1)*bs - 1, the
    last one possibly shorter):
        partial[m, n] = sum over the step's k of a_q[m, k] * b_q[n, k]    the raw FP8 codes, no scales inside
        C[m, n]      += partial[m, n] * a_s[m, j] * b_s[n // bs, j]        promoted to a float32 accumulator
    acc_bits=None: compute partial exactly (a float32 matmul of the codes). acc_bits=b: sum each output's products of
    the step with limited_precision_sum(products, b) (b significant bits: the tensor core), then promote as above.
    Returns C [M, N] float32.
    """
    raise NotImplementedError("Exercise block_scaled_matmul: per K step, a partial of the codes, then both scales")
