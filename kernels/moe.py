"""Fused mixture-of-experts in Triton: align, two grouped GEMMs, one reduction.

y[t] = sum_j topk_weights[t, j] * W2[e] (silu(W_gate[e] x[t]) * W_up[e] x[t]),  e = topk_ids[t, j].

A slot s = t * k + j is one (token, expert) pair. The pipeline, as production engines run it:

1. `moe_align_block_size` (plain PyTorch, see `kernels.reference`) lists the slots grouped by expert, each
   expert's run padded to BLOCK_M with the out-of-range id T * k, and records one expert id per block of
   BLOCK_M slots. Every block now belongs to exactly one expert.
2. One launch of `_moe_gemm_kernel` with SWIGLU: inter[s] = silu(W_gate[e] x[t]) * W_up[e] x[t], [T*k, I].
3. One launch of `_moe_gemm_kernel` with the routing weight: out[s] = topk_weights[s] * W2[e] inter[s].
4. y = out.view(T, k, H).sum(1), the reduction back per token.

Tiling of `_moe_gemm_kernel` (C[s, :] = A[row(s), :] . W[e]^T, W[e] stored [N, K] like nn.Linear):
    grid (P / BLOCK_M, ceil(N / BLOCK_N)) with P the padded slot count; program (m, n) takes block m of
    sorted slots and columns n * BLOCK_N ... of the output. It returns at once if block m lies past
    num_tokens_post_padded, so the grid can be sized without reading that count back to the host. Otherwise it
    loads the block's BLOCK_M slot ids (padding ids are masked out of every load and store) and its expert e,
    gathers the A rows (row(s) = s // TOP_K: the token for the first GEMM, the slot itself for the second),
    and walks K in BLOCK_K steps: an A tile [BLOCK_M, BLOCK_K] (masked past K and on padding slots) and a W[e]
    tile [BLOCK_K, BLOCK_N] (masked past K and N) go into tl.dot. With SWIGLU the same program also loads the
    up rows N further down W[e] and keeps a second accumulator, so gate and up never leave registers and
    silu(gate) * up is applied before the store.
    FP8 (w8a8): A holds E4M3 codes with 1 x BLOCK_K per-row scales from act_quant, W[e] E4M3 codes with
    BLOCK_K x BLOCK_K block scales. Each K step's tl.dot goes to a fresh float32 partial, which is multiplied
    by the BLOCK_M row scales of that step and by each column's block scale before it is added to the
    accumulator, the same per-128 promotion as `fp8_gemm`.
    Rows of W[e] are addressed in int64: E * N * K exceeds 2^31 for DeepSeek-V3 (256 x 4096 x 7168).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8 import _cast_rne, act_quant
from .reference import moe_align_block_size

# Triton 3.9's interpreter multiplies bf16 tl.dot operands as raw 16-bit integers, so when interpreting, bf16
# tiles are widened to float32 first (exact; the products then match a bf16 MMA with float32 accumulation).
_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _dot_dtype(dtype: torch.dtype) -> tl.dtype:
    return tl.float32 if dtype == torch.bfloat16 and triton.knobs.runtime.interpret else _TL_DTYPE[dtype]


@triton.jit
def _scaled_dot(acc, a, a_s, b_ptrs, b_s_ptrs, b_mask, col_ok, step,
                FP8: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """acc + A . B for one K step, B loaded here; in FP8 the partial is scaled before it joins acc."""
    b = tl.load(b_ptrs, mask=b_mask, other=0.0)
    # One return after an if/else: the compiler (unlike the interpreter) generates the code after an early
    # `return` in a constexpr branch too, and there DOT_DTYPE is None.
    if FP8:
        b_s = tl.load(b_s_ptrs + step, mask=col_ok, other=0.0)  # [BLOCK_N] block scale of each column
        acc = acc + tl.dot(a, b) * a_s[:, None] * b_s[None, :]
    else:
        # float32 operands: full precision rather than the TF32 tensor-core default.
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc,
                     input_precision="ieee" if DOT_DTYPE == tl.float32 else "tf32")
    return acc


@triton.jit
def _moe_gemm_kernel(a_ptr, a_s_ptr, w_ptr, w_s_ptr, c_ptr, topk_weights_ptr,
                     sorted_ids_ptr, expert_ids_ptr, num_post_padded_ptr,
                     N, K, NK, num_slots, stride_we, stride_wse,
                     TOP_K: tl.constexpr, SWIGLU: tl.constexpr, ROUTED_WEIGHT: tl.constexpr, FP8: tl.constexpr,
                     DOT_DTYPE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_post_padded_ptr):
        return
    slots = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BLOCK_M]
    slot_ok = slots < num_slots  # False on padding
    a_rows = (slots // TOP_K).to(tl.int64)
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output columns = rows of W[e]
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)

    a_ptrs = a_ptr + a_rows[:, None] * K + ks[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + expert * stride_we + cols[None, :].to(tl.int64) * K + ks[:, None]  # [BLOCK_K, BLOCK_N]
    up_offset = N * K  # the up rows sit N rows below the gate rows
    # Scale pointers (read only when FP8; otherwise they point into placeholders and are never loaded).
    a_s_ptrs = a_s_ptr + a_rows * NK  # [BLOCK_M]: each slot's activation scale, K step 0
    w_s_ptrs = w_s_ptr + expert * stride_wse + (cols // BLOCK_K) * NK  # [BLOCK_N]: each column's block
    up_s_ptrs = w_s_ptr + expert * stride_wse + ((cols + N) // BLOCK_K) * NK

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # used only with SWIGLU
    for step in range(NK):
        k_ok = ks < K - step * BLOCK_K
        a = tl.load(a_ptrs, mask=slot_ok[:, None] & k_ok[None, :], other=0.0)
        a_s = tl.load(a_s_ptrs + step, mask=slot_ok, other=0.0) if FP8 else 0.0
        w_mask = k_ok[:, None] & col_ok[None, :]
        acc = _scaled_dot(acc, a, a_s, w_ptrs, w_s_ptrs, w_mask, col_ok, step, FP8, DOT_DTYPE)
        if SWIGLU:
            acc_up = _scaled_dot(acc_up, a, a_s, w_ptrs + up_offset, up_s_ptrs, w_mask, col_ok, step,
                                 FP8, DOT_DTYPE)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    if SWIGLU:
        acc = acc * tl.sigmoid(acc) * acc_up
    if ROUTED_WEIGHT:
        acc = acc * tl.load(topk_weights_ptr + slots, mask=slot_ok, other=0.0).to(tl.float32)[:, None]
    c_ptrs = c_ptr + slots[:, None].to(tl.int64) * N + cols[None, :]
    tl.store(c_ptrs, _cast_rne(acc, c_ptr.dtype.element_ty), mask=slot_ok[:, None] & col_ok[None, :])


def _block_m(num_slots: int, num_experts: int) -> int:
    """Slots per block: about the mean slots per expert (so padding stays small), between 16 and 64."""
    return min(64, max(16, triton.next_power_of_2(triton.cdiv(num_slots, num_experts))))


def _grouped_gemm(a, a_s, w, w_s, out, topk_weights, align, *, top_k, swiglu, block_size):
    """One launch of `_moe_gemm_kernel`: out[s] = act(W[e] a[s // top_k]) for every slot s."""
    sorted_ids, expert_ids, num_post_padded = align
    N, K = out.shape[1], a.shape[1]
    fp8 = w_s is not None
    if not fp8:  # placeholders for the scale pointers, which the kernel then never reads
        a_s, w_s = a, w
    block_m = sorted_ids.numel() // expert_ids.numel()
    # Shared memory per pipeline stage, SwiGLU's two weight tiles included, stays under 24 KB (FP8 and bf16).
    block_k = block_size if fp8 else min(64, max(16, triton.next_power_of_2(K)))
    block_n = 64
    grid = (expert_ids.numel(), triton.cdiv(N, block_n))
    _moe_gemm_kernel[grid](
        a, a_s, w, w_s, out, topk_weights, sorted_ids, expert_ids, num_post_padded,
        N, K, triton.cdiv(K, block_k), out.shape[0], w.stride(0), w_s.stride(0),
        TOP_K=top_k, SWIGLU=swiglu, ROUTED_WEIGHT=not swiglu, FP8=fp8,
        DOT_DTYPE=None if fp8 else _dot_dtype(a.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, num_stages=3,
    )


def fused_moe(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, *, w1_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
              block_size: int = 128) -> torch.Tensor:
    x, w1, w2, topk_weights = (t.contiguous() for t in (x, w1, w2, topk_weights))
    (T, H), (E, two_i, _), k = x.shape, w1.shape, topk_ids.shape[1]
    if T == 0:
        return torch.empty_like(x)
    align = moe_align_block_size(topk_ids, _block_m(T * k, E), E)
    fp8 = w1_scale is not None
    inter = torch.empty(T * k, two_i // 2, dtype=x.dtype, device=x.device)
    out = torch.empty(T * k, H, dtype=x.dtype, device=x.device)

    a, a_s = act_quant(x, block_size) if fp8 else (x, None)
    _grouped_gemm(a, a_s, w1, w1_scale, inter, topk_weights, align, top_k=k, swiglu=True, block_size=block_size)
    a, a_s = act_quant(inter, block_size) if fp8 else (inter, None)
    _grouped_gemm(a, a_s, w2, w2_scale, out, topk_weights, align, top_k=1, swiglu=False, block_size=block_size)
    return out.view(T, k, H).sum(dim=1)
