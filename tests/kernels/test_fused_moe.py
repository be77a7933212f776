"""Fused MoE: the align step's invariants, plain and FP8 kernels against the per-expert loop, edge cases."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from kernel_helpers import FEW, randn

import kernels
from kernels import reference as R

FP8 = torch.float8_e4m3fn


def routing(T: int, E: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax-then-top-k routing over random scores: weights [T, k] float32, distinct ids [T, k] int64."""
    scores = randn((T, E), seed).softmax(-1)
    return scores.topk(k, dim=-1)


def experts(E: int, H: int, I: int, seed: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """w1 [E, 2I, H], w2 [E, H, I] with nn.Linear-like scale, so outputs stay O(1)."""
    return (randn((E, 2 * I, H), seed) / math.sqrt(H)).to(dtype), (randn((E, H, I), seed + 1) / math.sqrt(I)).to(dtype)


def quantized(w1: torch.Tensor, w2: torch.Tensor) -> dict:
    (w1_q, w1_s), (w2_q, w2_s) = R.weight_quant(w1), R.weight_quant(w2)
    return dict(w1=w1_q, w2=w2_q, w1_scale=w1_s, w2_scale=w2_s)


def check_close(y: torch.Tensor, ref: torch.Tensor, fp8: bool = False) -> None:
    # float32: summation order only. bf16: the kernel also rounds each slot's output to bf16 before the sum
    # over k, a few roundings of 2^-9 relative. FP8: the SwiGLU output is quantized, and a last-bit
    # difference in it can move an element to the neighbouring E4M3 code (up to 1/8 of its value).
    tol = 2e-2 if fp8 or y.dtype != torch.float32 else 1e-5
    torch.testing.assert_close(y.float(), ref.float(), rtol=tol, atol=tol * ref.abs().max().item())


# ---- the align step ----

@FEW
@given(T=st.integers(0, 40), E=st.integers(1, 12), data=st.data(), block=st.sampled_from([1, 4, 16, 64]),
       seed=st.integers(0, 2**16))
def test_align_groups_slots_by_expert(T, E, data, block, seed):
    k = data.draw(st.integers(1, E))
    ids = routing(T, E, k, seed)[1]
    sorted_ids, expert_ids, num_post = kernels.moe_align_block_size(ids, block, E)
    S, used = T * k, num_post.item()
    assert sorted_ids.dtype == expert_ids.dtype == num_post.dtype == torch.int32
    assert sorted_ids.numel() == expert_ids.numel() * block and used % block == 0 and used <= sorted_ids.numel()
    counts = torch.bincount(ids.flatten(), minlength=E)
    assert used == int(((counts + block - 1) // block * block).sum())
    valid = sorted_ids < S
    assert torch.equal(sorted_ids[valid].sort().values, torch.arange(S, dtype=torch.int32))  # each slot once
    assert (sorted_ids[~valid] == S).all()  # padding is exactly T*k
    assert not valid[used:].any()
    block_of_slot = torch.arange(sorted_ids.numel()) // block
    assert torch.equal(ids.flatten()[sorted_ids[valid].long()], expert_ids[block_of_slot[valid]].long())
    assert (expert_ids[: used // block].diff() >= 0).all() and (expert_ids[used // block:] == E).all()


# ---- fused_moe against the per-expert loop ----

@FEW
@given(T=st.integers(1, 33), E=st.integers(1, 8), data=st.data(), H=st.sampled_from([64, 128, 200]),
       I=st.sampled_from([32, 64, 96]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 2**16))
def test_fused_moe_matches_loop(T, E, data, H, I, dtype, seed):
    k = data.draw(st.integers(1, E))
    weights, ids = routing(T, E, k, seed)
    w1, w2 = experts(E, H, I, seed, dtype)
    x = randn((T, H), seed + 2, dtype=dtype)
    y = kernels.fused_moe(x, w1, w2, weights, ids)
    assert y.shape == (T, H) and y.dtype == dtype
    check_close(y, R.fused_moe(x, w1, w2, weights, ids))


@FEW
@given(T=st.integers(1, 33), E=st.integers(1, 6), data=st.data(), H=st.sampled_from([128, 200, 256]),
       I=st.sampled_from([64, 128, 192]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 2**16))
def test_fp8_fused_moe_matches_loop(T, E, data, H, I, dtype, seed):
    k = data.draw(st.integers(1, min(E, 4)))
    weights, ids = routing(T, E, k, seed)
    q = quantized(*experts(E, H, I, seed, dtype))
    x = randn((T, H), seed + 2, dtype=dtype)
    y = kernels.fused_moe(x, topk_weights=weights, topk_ids=ids, **q)
    assert y.shape == (T, H) and y.dtype == dtype
    check_close(y, R.fused_moe(x, topk_weights=weights, topk_ids=ids, **q), fp8=True)


def test_fp8_fused_moe_is_close_to_full_precision():
    T, E, k, H, I = 32, 8, 2, 256, 128
    weights, ids = routing(T, E, k, 0)
    w1, w2 = experts(E, H, I, 0)
    x = randn((T, H), 1)
    exact = kernels.fused_moe(x, w1, w2, weights, ids)
    y = kernels.fused_moe(x, topk_weights=weights, topk_ids=ids, **quantized(w1, w2))
    rel = ((y - exact).norm() / exact.norm()).item()
    assert rel < 0.08, rel  # four E4M3 roundings on the way (x, w1, SwiGLU output, w2)


# ---- edge cases from the issue ----

def edge_routing(case: str, T: int, E: int) -> tuple[int, torch.Tensor]:
    """(k, topk_ids) for the named routing pattern."""
    if case == "empty experts":  # experts 2.. never chosen
        return 2, torch.tensor([[0, 1]] * T)
    if case == "one expert takes every token":
        return 1, torch.full((T, 1), E - 1)
    if case == "k = 1":
        return 1, torch.arange(T)[:, None] % E
    if case == "k = E":
        return E, torch.stack([torch.randperm(E) for _ in range(T)])
    raise ValueError(case)


@pytest.mark.parametrize("T", [1, 17, 33])  # decode, and token counts that are not a multiple of the block
@pytest.mark.parametrize("case", ["empty experts", "one expert takes every token", "k = 1", "k = E"])
def test_routing_edge_cases(each_backend, case, T):
    E, H, I = 6, 128, 64
    k, ids = edge_routing(case, T, E)
    weights = torch.rand(T, k)
    w1, w2 = experts(E, H, I, T)
    x = randn((T, H), T + 1)
    check_close(kernels.fused_moe(x, w1, w2, weights, ids), R.fused_moe(x, w1, w2, weights, ids))
    q = quantized(w1, w2)
    check_close(kernels.fused_moe(x, topk_weights=weights, topk_ids=ids, **q),
                R.fused_moe(x, topk_weights=weights, topk_ids=ids, **q), fp8=True)


def test_no_tokens(each_backend):
    w1, w2 = experts(4, 128, 64, 0)
    y = kernels.fused_moe(torch.zeros(0, 128), w1, w2, torch.zeros(0, 2), torch.zeros(0, 2, dtype=torch.long))
    assert y.shape == (0, 128)


def test_nan_token_stays_in_its_row(each_backend):
    T, E, k, H, I = 9, 4, 2, 128, 64
    weights, ids = routing(T, E, k, 0)
    w1, w2 = experts(E, H, I, 0)
    x = randn((T, H), 1)
    x[4, 3] = math.nan
    for kwargs in (dict(w1=w1, w2=w2), quantized(w1, w2)):
        y = kernels.fused_moe(x, topk_weights=weights, topk_ids=ids, **kwargs)
        assert y[4].isnan().all() and not y[torch.arange(T) != 4].isnan().any()


# ---- errors ----

def test_errors_name_the_problem(each_backend):
    T, E, k, H, I = 4, 4, 2, 128, 64
    weights, ids = routing(T, E, k, 0)
    w1, w2 = experts(E, H, I, 0)
    x = randn((T, H), 1)
    q = quantized(w1, w2)
    with pytest.raises(TypeError, match="w1 must have dtype torch.float32"):
        kernels.fused_moe(x, w1.bfloat16(), w2, weights, ids)
    with pytest.raises(ValueError, match=r"w2 has shape \(4, 128, 32\), expected \(4, 128, 64\)"):
        kernels.fused_moe(x, w1, w2[..., :32], weights, ids)
    with pytest.raises(ValueError, match="x must be"):
        kernels.fused_moe(x[None], w1, w2, weights, ids)
    with pytest.raises(ValueError, match="topk_ids must be"):
        kernels.fused_moe(x, w1, w2, weights[:2], ids[:2])
    with pytest.raises(TypeError, match="topk_ids must have dtype"):
        kernels.fused_moe(x, w1, w2, weights, ids.float())
    with pytest.raises(ValueError, match="need both w1_scale and w2_scale"):
        kernels.fused_moe(x, q["w1"], q["w2"], weights, ids, w1_scale=q["w1_scale"])
    with pytest.raises(ValueError, match="w1 is not FP8"):
        kernels.fused_moe(x, w1, w2, weights, ids, w1_scale=q["w1_scale"], w2_scale=q["w2_scale"])
    with pytest.raises(ValueError, match="w2_scale has shape"):
        kernels.fused_moe(x, topk_weights=weights, topk_ids=ids, **(q | dict(w2_scale=torch.ones(E, 2, 1))))
    with pytest.raises(ValueError, match="positive ints"):
        kernels.moe_align_block_size(ids, 0, E)
