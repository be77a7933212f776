"""Plain-PyTorch versions of every public function in `kernels`.

They define the numerics the Triton kernels must reproduce, serve as the test oracle, and are what
`kernels` runs when Triton is missing or `MINI_DEEPSEEK_KERNELS=torch`. They favour clarity over speed and
do no argument checking (the public wrappers in `kernels/__init__.py` do).

Conventions shared with the kernels:

- Scales are multipliers: x ≈ q * s. `weight_dequant` multiplies by `s`, exactly what the published
  checkpoints call `weight_scale_inv`.
- s = max(amax, AMAX_FLOOR) / 448 per tile (or another amax_floor given to act_quant / weight_quant); q = round_e4m3(clamp(x / s, -448, 448)) with round-to-nearest-even.
- Sizes that are not a multiple of the block: the last tile is partial (ceil division, zero padding does
  not change amax), so an activation of width K has ceil(K / 128) scales and a 576 x 7168 weight has 5 x 56.
- A tile holding NaN or ±Inf gets a NaN scale and NaN codes (0x7F); other tiles are unaffected. Anything
  computed from that tile is NaN, as it would be in a bf16 matmul, and no host synchronisation is needed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite E4M3 value
# Tiles whose largest magnitude is below this are scaled as if it were this: an all-zero tile gets a finite
# scale instead of 0/0. 1e-4 is what DeepSeek's released kernels use; 1e-4 / 448 still leaves such tiny
# tiles a few significant bits. act_quant and weight_quant take another floor for tensors of smaller values (FP8
# training's gradients, of order 1 / tokens, use 1e-12).
AMAX_FLOOR = 1e-4


def cdiv(a: int, b: int) -> int:
    return -(a // -b)


def block_scale_shape(shape: tuple[int, ...], block_size: int) -> tuple[int, ...]:
    """The shape of the block scales of a weight of `shape` [..., N, K]: [..., ceil(N / bs), ceil(K / bs)]."""
    return (*shape[:-2], *(cdiv(n, block_size) for n in shape[-2:]))


def to_e4m3(y: torch.Tensor) -> torch.Tensor:
    """float32 -> E4M3: saturate at ±448, round to nearest even, NaN -> 0x7F (the positive NaN code)."""
    y = torch.where(y.isnan(), float("nan"), y.clamp(-FP8_MAX, FP8_MAX))
    return y.to(FP8)


def _pad_last(t: torch.Tensor, size: int) -> torch.Tensor:
    """t with its last dimension zero-padded to `size` (t itself when it is already that long)."""
    return t if t.shape[-1] == size else F.pad(t, (0, size - t.shape[-1]))


def _tile_scales(tiles: torch.Tensor, dims: tuple[int, ...], amax_floor: float = AMAX_FLOOR) -> torch.Tensor:
    """One scale per tile of float32, zero-padded `tiles`, each tile spanning `dims`."""
    amax = tiles.abs().amax(dim=dims)  # NaN if the tile holds a NaN, inf if an inf
    # Divided by a tensor, not the number 448: on a GPU PyTorch turns division by a Python number into a product
    # with its reciprocal, which is not correctly rounded (3.0625 / 448 came out one ulp off on an H200). Tensor
    # by tensor division is IEEE on every device, as the kernels' tl.div_rn is, so scales match bit for bit.
    return torch.where(amax.isfinite(), amax.clamp_min(amax_floor) / torch.full_like(amax, FP8_MAX), float("nan"))


def act_quant(x: torch.Tensor, block_size: int = 128,
              amax_floor: float = AMAX_FLOOR) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> q [..., K] E4M3, s [..., ceil(K / block_size)] float32 (1 x block_size tiles)."""
    K = x.shape[-1]
    nk = cdiv(K, block_size)
    tiles = _pad_last(x.float(), nk * block_size).unflatten(-1, (nk, block_size))  # [..., nk, bs]
    s = _tile_scales(tiles, (-1,), amax_floor)  # [..., nk]
    q = to_e4m3(tiles / s[..., None]).flatten(-2)[..., :K]
    return q, s


def _block_view(w: torch.Tensor, block_size: int) -> torch.Tensor:
    """w [..., N, K] -> float32 blocks [..., nN, bs, nK, bs], zero-padded; a new tensor unless w is float32."""
    N, K = w.shape[-2:]
    nn_, nk = cdiv(N, block_size), cdiv(K, block_size)
    w = w.float()
    if (nn_ * block_size, nk * block_size) != (N, K):
        w = F.pad(w, (0, nk * block_size - K, 0, nn_ * block_size - N))
    return w.unflatten(-1, (nk, block_size)).unflatten(-3, (nn_, block_size))


def _unblock(blocks: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """Inverse of `_block_view`: [..., nN, bs, nK, bs] -> [..., N, K], contiguous like the kernels' outputs (a
    strided weight would be copied by every kernel call that reads it)."""
    return blocks.flatten(-2).flatten(-3, -2)[..., :N, :K].contiguous()


def weight_quant(w: torch.Tensor, block_size: int = 128,
                 amax_floor: float = AMAX_FLOOR) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> q [..., N, K] E4M3, s [..., ceil(N / bs), ceil(K / bs)] float32 (bs x bs blocks)."""
    blocks = _block_view(w, block_size)  # [..., nN, bs, nK, bs]
    s = _tile_scales(blocks, (-3, -1), amax_floor)  # [..., nN, nK]
    q = to_e4m3(blocks / s[..., :, None, :, None])
    return _unblock(q, *w.shape[-2:]), s


def weight_dequant(q: torch.Tensor, s: torch.Tensor, block_size: int = 128,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """q [..., N, K] E4M3, s [..., ceil(N / bs), ceil(K / bs)] -> q * s in `dtype` (default dtype if None)."""
    blocks = _block_view(q, block_size).mul_(s[..., :, None, :, None])  # q is FP8: the view is a fresh copy
    return _unblock(blocks, *q.shape[-2:]).to(dtype or torch.get_default_dtype())


def fp8_gemm(a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor,
             block_size: int = 128, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(a_q * a_s) @ (b_q * b_s)^T for a_q [..., K], b_q [N, K] -> [..., N] in `out_dtype`.

    b_s holds 128 x 128 block scales [ceil(N / bs), ceil(K / bs)] (a weight) or 1 x 128 tile scales [N, ceil(K / bs)]
    (`act_quant` of b's rows: FP8 training's weight-gradient GEMM); for N = 1 the two are the same.
    The kernel adds one scaled partial product per 128-wide K step; because each scale is constant over such
    a step, dequantizing first and doing one float32 matmul is the same sum (up to float32 rounding order).
    """
    a = act_dequant(a_q, a_s, block_size)
    row_scales = b_s.shape[0] != cdiv(b_q.shape[0], block_size)
    b = act_dequant(b_q, b_s, block_size) if row_scales else weight_dequant(b_q, b_s, block_size, torch.float32)
    return (a @ b.T).to(out_dtype)


def act_dequant(q: torch.Tensor, s: torch.Tensor, block_size: int = 128) -> torch.Tensor:
    """Inverse of `act_quant` in float32: q [..., K], s [..., ceil(K / bs)] -> [..., K]."""
    K, nk = q.shape[-1], s.shape[-1]
    tiles = _pad_last(q.float(), nk * block_size).unflatten(-1, (nk, block_size))  # [..., nk, bs]
    return (tiles * s[..., None]).flatten(-2)[..., :K]


def moe_align_block_size(topk_ids: torch.Tensor, block_size: int,
                         num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the (token, expert) slots by expert and pad each expert's run to a multiple of `block_size`.

    topk_ids [T, k]; slot s = t * k + j stands for token t's j-th expert.
    Returns
      sorted_token_ids [P] int32: slot ids grouped by expert, each group padded with the id T * k (out of range);
      expert_ids [P / block_size] int32: the expert of each block (num_experts for blocks past the end);
      num_tokens_post_padded [1] int32: how many entries of sorted_token_ids are used.
    P = T*k + min(E, T*k) * (block_size - 1) rounded up to a block is an upper bound known without looking at
    the ids, so nothing here waits for the device; blocks past num_tokens_post_padded are skipped by the GEMM.
    This step is a handful of vectorised PyTorch ops on every backend.
    """
    flat = topk_ids.flatten().long()  # [S] expert of each slot
    S, device = flat.numel(), flat.device
    counts = torch.zeros(num_experts, dtype=torch.long, device=device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_size - 1) // block_size * block_size  # [E]
    ends = padded.cumsum(0)  # [E] end of each expert's padded run
    order = flat.argsort(stable=True)  # [S] slot ids grouped by expert
    expert_of = flat[order]
    rank = torch.arange(S, device=device) - (counts.cumsum(0) - counts)[expert_of]  # position within its expert
    dest = (ends - padded)[expert_of] + rank
    capacity = cdiv(S + min(num_experts, S) * (block_size - 1), block_size) * block_size
    sorted_ids = torch.full((capacity,), S, dtype=torch.int32, device=device)
    sorted_ids[dest] = order.int()
    block_starts = torch.arange(0, capacity, block_size, device=device)
    expert_ids = torch.searchsorted(ends, block_starts, right=True).int()
    return sorted_ids, expert_ids, ends[-1:].int()


def fused_moe(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, *, w1_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
              block_size: int = 128, compute_dtype: torch.dtype = torch.float32,
              gemm: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """y[t] = sum_j topk_weights[t, j] * W2[e] (silu(W_gate[e] x[t]) * W_up[e] x[t]), e = topk_ids[t, j].

    x [T, H], w1 [E, 2I, H] (gate rows then up rows), w2 [E, H, I], topk_* [T, k] -> y [T, H] in x.dtype.
    A loop over experts in `compute_dtype`, differentiable (the library's grouped experts are tested against it). With FP8
    weights (w1_scale / w2_scale given) it reproduces the w8a8 kernel's quantization points: weights dequantized
    from their block_size x block_size blocks, and the input and the SwiGLU output (in x.dtype, as the kernel stores it) quantized per token in 1 x block_size tiles.
    gemm(a [n, in], w [out, in]) -> a w^T [n, out], if given, computes every expert's two products instead (w is
    one expert's slice of w1 or w2): FP8 training passes its block-scaled GEMM with an FP8 backward.
    """
    fp8 = w1_scale is not None
    T, k = topk_ids.shape

    def linear(a: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor | None) -> torch.Tensor:
        if gemm is not None:
            return gemm(a, w)
        if fp8:
            a = act_dequant(*act_quant(a, block_size), block_size)
            w = weight_dequant(w, w_scale, block_size, compute_dtype)
        return F.linear(a.to(compute_dtype), w.to(compute_dtype))

    flat_ids = topk_ids.flatten()  # slot s = token s // k, its (s % k)-th expert
    order = flat_ids.argsort(stable=True)  # slots grouped by expert
    counts = torch.bincount(flat_ids, minlength=w1.shape[0]).tolist()
    flat_weights = topk_weights.flatten()
    # unbind once: under autograd, indexing w[e] per expert would build (and sum) one full-size zero gradient per
    # expert; unbind's backward stacks all expert gradients into a single tensor.
    w1s, w2s = w1.unbind(0), w2.unbind(0)
    y = torch.zeros(T, x.shape[1], dtype=compute_dtype, device=x.device)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        slots = order[start:start + n]
        start += n
        tokens = slots // k
        gate, up = linear(x[tokens], w1s[e], w1_scale[e] if fp8 else None).chunk(2, dim=-1)
        h = (F.silu(gate) * up).to(x.dtype)
        out = linear(h, w2s[e], w2_scale[e] if fp8 else None)
        y.index_add_(0, tokens, out * flat_weights[slots, None].to(compute_dtype))
    return y.to(x.dtype)
