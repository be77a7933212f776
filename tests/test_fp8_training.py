"""FP8 training (mini_deepseek/fp8_training.py): which layers convert, gradients against the dequantized arithmetic
(tight) and against FP32 within the error E4M3 explains, padding, the kernels in both passes, train() and checkpoints
on a converted model, and what the conversion refuses.

The E4M3 bound used below. A value v = x / s in [-448, 448] rounds to nearest even on a grid whose spacing is 2^(e-3)
in [2^e, 2^(e+1)) (3 mantissa bits) and 2^-9 below 2^-6 (subnormals), so |round(v) - v| <= 2^-4 |v| + 2^-10 and the
dequantized element is off by at most  E(x) = 2^-4 |x| + 2^-10 s,  with s its tile's (or block's) scale. A product of
two quantized operands then obeys, elementwise over the contraction,
    |Â B̂^T - A B^T| <= E_A |B|^T + |A| E_B^T + E_A E_B^T,
plus float32 summation error. Wgrad quantizes x twice (1 x 128, then 128 x 1 from the dequantized values), which adds
the second rounding's E to the first's.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

import kernels
from kernels import reference as R
from mini_deepseek import (
    DeepSeekV3,
    FP8Linear,
    FP8TrainingExperts,
    FP8TrainingLinear,
    ModelConfig,
    TokenDataset,
    TrainConfig,
    arithmetic_text,
    convert_to_fp8_training,
    load_checkpoint,
    quantize_to_fp8,
    set_kernels,
    train,
)
from mini_deepseek.fp8_training import GRAD_AMAX_FLOOR, fp8_linear
from mini_deepseek.moe import RoutedExperts

FP8_SPACING = 2.0**-4  # half the relative spacing of E4M3's normal numbers
SUBNORMAL_HALF_STEP = 2.0**-10  # half the spacing of E4M3's subnormals, in units of the scale


@pytest.fixture(autouse=True)
def plain_pytorch_kernels():
    previous = kernels.backend()
    kernels.set_backend("torch")
    torch.set_num_threads(1)
    yield
    set_kernels("auto")
    kernels.set_backend("torch" if previous == "torch" else "triton")


def tiny_model(seed: int = 0, **overrides) -> DeepSeekV3:
    torch.manual_seed(seed)
    return DeepSeekV3(ModelConfig.preset("toy", **{**dict(n_layers=2, max_seq_len=64), **overrides}))


def outlier_inputs(M: int, K: int, N: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] with a few outlier channels, W [N, K], dy [M, N] with a few outlier tokens (appendix B.2's case)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    x[:, torch.randperm(K, generator=g)[:3]] *= 300.0
    w = torch.randn(N, K, generator=g) * 0.05
    dy = torch.randn(M, N, generator=g) * 1e-3
    dy[torch.randperm(M, generator=g)[:2]] *= 1e4
    return x, w, dy


def fp8_grads(x, w, dy, block_size=128):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fp8_linear(x, w, block_size)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


# --- the bound ------------------------------------------------------------------------------------------------------
def tile_error(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """E(t) for t [.., K] quantized with `scale` broadcast to t's shape."""
    return FP8_SPACING * t.abs() + SUBNORMAL_HALF_STEP * scale


def row_tile_scales(t: torch.Tensor, bs: int = 128, floor: float = R.AMAX_FLOOR) -> torch.Tensor:
    """The 1 x bs tile scale of every element of t [R, C], from t itself: max(amax, floor) / 448."""
    C = t.shape[1]
    amax = F.pad(t.abs(), (0, -C % bs)).unflatten(1, (-1, bs)).amax(-1).clamp_min(floor)
    return (amax / R.FP8_MAX).repeat_interleave(bs, 1)[:, :C]


def block_scales(w: torch.Tensor, bs: int = 128) -> torch.Tensor:
    N, K = w.shape
    blocks = F.pad(w.abs(), (0, -K % bs, 0, -N % bs)).unflatten(1, (-1, bs)).unflatten(0, (-1, bs))
    amax = blocks.amax(dim=(1, 3)).clamp_min(R.AMAX_FLOOR)  # [nN, nK]
    return (amax / R.FP8_MAX).repeat_interleave(bs, 0).repeat_interleave(bs, 1)[:N, :K]


def product_bound(a, e_a, b, e_b) -> torch.Tensor:
    """Elementwise bound on |Â B̂^T - A B^T| for |Â - A| <= e_a, |B̂ - B| <= e_b, plus float32 summation slack."""
    a, b = a.abs(), b.abs()
    return e_a @ b.T + a @ e_b.T + e_a @ e_b.T + 1e-5 * (a + e_a) @ (b + e_b).T


def fp32_bounds(x, w, dy) -> dict[str, torch.Tensor]:
    e_x, e_w = tile_error(x, row_tile_scales(x)), tile_error(w, block_scales(w))
    e_dy_rows = tile_error(dy, row_tile_scales(dy, floor=GRAD_AMAX_FLOOR))  # 1 x 128 along N (Dgrad)
    dy_t = dy.T
    e_dy_cols = tile_error(dy_t, row_tile_scales(dy_t, floor=GRAD_AMAX_FLOOR))  # 1 x 128 along M (Wgrad)
    x_t, e_x_t = x.T, e_x.T
    upper = x_t.abs() + e_x_t  # bounds |x̂|, so that the second rounding's scale is bounded too
    e_x_twice = e_x_t + tile_error(upper, row_tile_scales(upper))
    return {"y": product_bound(x, e_x, w, e_w),
            "dx": product_bound(dy, e_dy_rows, w.T, e_w.T),
            "dw": product_bound(dy_t, e_dy_cols, x_t, e_x_twice)}


def violations(results: dict[str, torch.Tensor], x, w, dy) -> dict[str, int]:
    exact = {"y": x @ w.T, "dx": dy @ w, "dw": dy.T @ x}
    bounds = fp32_bounds(x, w, dy)
    return {k: int(((results[k] - exact[k]).abs() > bounds[k]).sum()) for k in exact}


# --- gradients ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("M, K, N", [(256, 256, 128), (150, 200, 300), (7, 64, 33)])
def test_gradients_equal_autograd_of_the_dequantized_arithmetic(M, K, N):
    x, w, dy = outlier_inputs(M, K, N)
    y, dx, dw = fp8_grads(x, w, dy)

    def fake_act(t, floor=R.AMAX_FLOOR):  # quantize in 1 x 128 tiles along the last dimension, dequantize
        return R.act_dequant(*R.act_quant(t, 128, floor))

    w_deq = R.weight_dequant(*R.weight_quant(w), dtype=torch.float32)
    x_deq = fake_act(x).requires_grad_()
    w_for_dgrad = w_deq.clone().requires_grad_()
    (x_deq @ w_for_dgrad.T).backward(fake_act(dy, GRAD_AMAX_FLOOR))  # Dgrad: dy in 1 x 128 tiles along N
    x_twice = fake_act(fake_act(x).T).T  # 1 x 128, then 128 x 1 tiles
    w_for_wgrad = w_deq.clone().requires_grad_()
    (x_twice @ w_for_wgrad.T).backward(fake_act(dy.T, GRAD_AMAX_FLOOR).T)  # Wgrad: dy in 128 x 1 tiles
    torch.testing.assert_close(y, (x_deq @ w_deq.T).detach(), rtol=1e-5, atol=1e-5 * y.abs().max().item())
    torch.testing.assert_close(dx, x_deq.grad, rtol=1e-5, atol=1e-5 * dx.abs().max().item())
    torch.testing.assert_close(dw, w_for_wgrad.grad, rtol=1e-5, atol=1e-5 * dw.abs().max().item())
    assert dx.dtype == x.dtype and dw.dtype == torch.float32


@pytest.mark.parametrize("M, K, N", [(256, 256, 128), (150, 200, 300)])
def test_gradients_within_the_e4m3_bound_of_fp32(M, K, N):
    x, w, dy = outlier_inputs(M, K, N)
    y, dx, dw = fp8_grads(x, w, dy)
    assert violations({"y": y, "dx": dx, "dw": dw}, x, w, dy) == {"y": 0, "dx": 0, "dw": 0}
    exact_dw = dy.T @ x
    error = ((dw - exact_dw).norm() / exact_dw.norm()).item()
    assert 1e-3 < error < 0.1, error  # E4M3 noise: present, and a few percent


def test_tiny_gradients_lose_nothing_to_the_amax_floor():
    """Gradients of a mean loss are small; scaling dy by 2^-20 (exact) must scale the gradients by 2^-20 exactly."""
    x, w, dy = outlier_inputs(150, 200, 300)
    _, dx, dw = fp8_grads(x, w, dy)
    _, dx_tiny, dw_tiny = fp8_grads(x, w, dy * 2.0**-20)
    assert torch.equal(dx_tiny, dx * 2.0**-20) and torch.equal(dw_tiny, dw * 2.0**-20)


def test_the_bound_catches_coarser_scaling():
    """The bound has teeth: per-tensor scaling of x, or 128 x 128 blocks for dy (appendix B.2), break it.

    Positive operands leave no cancellation: a token whose small values a coarse scale flushes towards zero loses
    a whole output, far beyond 2^-4 of it."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(256, 256, generator=g) * 1e-3
    x[1:, 7] = 1e3  # an outlier channel in every token but the first
    w = torch.rand(128, 256, generator=g)
    dy = torch.rand(256, 128, generator=g) * 1e-3
    dy[5] = 1e3  # an outlier token

    def per_tensor(t):
        s = t.abs().amax() / R.FP8_MAX
        return R.to_e4m3(t / s).float() * s

    def dy_in_blocks(t):
        return R.weight_dequant(*R.weight_quant(t), dtype=torch.float32)

    w_deq = R.weight_dequant(*R.weight_quant(w), dtype=torch.float32)
    y, dx, dw = fp8_grads(x, w, dy)
    assert violations({"y": y, "dx": dx, "dw": dw}, x, w, dy) == {"y": 0, "dx": 0, "dw": 0}
    coarse_x = {"y": per_tensor(x) @ w_deq.T, "dx": dx, "dw": dw}
    coarse_dy = {"y": y, "dx": dy_in_blocks(dy) @ w_deq, "dw": dw}
    assert violations(coarse_x, x, w, dy)["y"] > 0
    assert violations(coarse_dy, x, w, dy)["dx"] > 0


def test_shapes_off_the_block_grid_are_padded_not_refused():
    """A partial tile or block is the same as zero-padding to a multiple of 128 (zeros never raise an amax)."""
    x, w, dy = outlier_inputs(150, 200, 300)
    y, dx, dw = fp8_grads(x, w, dy)
    xp, wp, dyp = F.pad(x, (0, 56, 0, 106)), F.pad(w, (0, 56, 0, 84)), F.pad(dy, (0, 84, 0, 106))
    y_p, dx_p, dw_p = fp8_grads(xp, wp, dyp)
    torch.testing.assert_close(y, y_p[:150, :300], rtol=1e-6, atol=1e-6 * y.abs().max().item())
    torch.testing.assert_close(dx, dx_p[:150, :200], rtol=1e-6, atol=1e-6 * dx.abs().max().item())
    torch.testing.assert_close(dw, dw_p[:300, :200], rtol=1e-6, atol=1e-6 * dw.abs().max().item())
    # batch dimensions, a width below one tile, and one token
    layer = FP8TrainingLinear(48, 20, bias=True)
    for shape in [(2, 3, 48), (1, 48), (48,)]:
        out = layer(torch.randn(shape, requires_grad=True))
        out.sum().backward()
        assert out.shape == (*shape[:-1], 20) and layer.weight.grad.isfinite().all()


def test_the_kernels_run_in_forward_and_backward(monkeypatch):
    x, w, dy = outlier_inputs(40, 200, 136)
    reference = fp8_grads(x, w, dy)
    try:
        kernels.set_backend("triton")  # compiled on a GPU, interpreted here
    except ValueError:
        pytest.skip("Triton is not installed")
    calls = {"act_quant": 0, "weight_quant": 0, "fp8_gemm": 0}
    for name in calls:
        original = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _f=original, _n=name, **k: calls.__setitem__(_n, calls[_n] + 1)
                            or _f(*a, **k))
    set_kernels("on")
    result = fp8_grads(x, w, dy)
    assert calls == {"act_quant": 4, "weight_quant": 1, "fp8_gemm": 3}  # Fprop, Dgrad, Wgrad
    for out, ref in zip(result, reference, strict=True):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_activations_are_saved_in_fp8():
    layer = FP8TrainingLinear(256, 128, bias=False)
    x = torch.randn(4, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    assert [(t.dtype, tuple(t.shape)) for t in saved] == [
        (torch.float8_e4m3fn, (4, 256)), (torch.float32, (4, 2)),  # x in 1 x 128 tiles
        (torch.float8_e4m3fn, (128, 256)), (torch.float32, (1, 2))]  # W in 128 x 128 blocks


# --- routed experts -------------------------------------------------------------------------------------------------
def test_experts_forward_is_the_fused_moe_fp8_arithmetic_and_backward_reaches_every_used_expert():
    torch.manual_seed(0)
    E, dim, inter, T, k = 6, 200, 136, 40, 2
    plain = RoutedExperts(E, dim, inter)
    nn.init.normal_(plain.w_gate_up, std=0.05)
    nn.init.normal_(plain.w_down, std=0.05)
    experts = FP8TrainingExperts.from_experts(plain)
    assert experts.w_gate_up is plain.w_gate_up
    x = torch.randn(T, dim, requires_grad=True)
    weights, ids = torch.rand(T, E).topk(k, dim=-1)
    ids[ids == 5] = 4  # expert 5 gets no token
    y = experts(x, weights, ids)
    (q1, s1), (q2, s2) = R.weight_quant(plain.w_gate_up.detach()), R.weight_quant(plain.w_down.detach())
    w8a8 = R.fused_moe(x.detach(), q1, q2, weights, ids, w1_scale=s1, w2_scale=s2)
    torch.testing.assert_close(y.detach(), w8a8, rtol=1e-5, atol=1e-6)
    dy = torch.randn_like(y)
    y.backward(dy)
    grads_fp8 = x.grad.clone(), plain.w_gate_up.grad.clone(), plain.w_down.grad.clone()
    assert (grads_fp8[1][5] == 0).all() and (grads_fp8[1][:5].abs().sum(dim=(1, 2)) > 0).all()
    x.grad = plain.w_gate_up.grad = plain.w_down.grad = None
    RoutedExperts.forward(experts, x, weights, ids).backward(dy)  # the FP32 loop
    for g8, g32 in zip(grads_fp8, (x.grad, plain.w_gate_up.grad, plain.w_down.grad), strict=True):
        assert ((g8 - g32).norm() / g32.norm()).item() < 0.1


# --- the model ------------------------------------------------------------------------------------------------------
def test_conversion_swaps_what_the_report_runs_in_fp8():
    model = tiny_model()
    params = dict(model.named_parameters())
    convert_to_fp8_training(model)
    assert dict(model.named_parameters()) == params  # the same tensors under the same names
    assert type(model.lm_head) is nn.Linear and type(model.mtp[0].eh_proj) is nn.Linear
    converted = {name for name, m in model.named_modules() if isinstance(m, (FP8TrainingLinear, FP8TrainingExperts))}
    plain_left = {name for name, m in model.named_modules()
                  if type(m) in (nn.Linear, RoutedExperts)} - {"lm_head", "mtp.0.eh_proj"}
    assert not plain_left
    assert "layers.0.self_attn.kv_b_proj" in converted and "layers.1.mlp.experts" in converted
    assert "mtp.0.mlp.shared_experts.down_proj" in converted and "mtp.0.self_attn.o_proj" in converted
    assert convert_to_fp8_training(model) is model  # idempotent
    kept = convert_to_fp8_training(tiny_model(), module_filter_fn=lambda m, fqn: "self_attn" not in fqn)
    assert type(kept.layers[0].self_attn.q_a_proj) is nn.Linear
    assert isinstance(kept.layers[0].mlp.gate_proj, FP8TrainingLinear)


def test_train_checkpoint_and_quantize_a_converted_model(tmp_path):
    dataset = TokenDataset.from_text(arithmetic_text(200, seed=0), seed=0)
    cfg = TrainConfig(steps=4, batch_size=2, seq_len=32, warmup_steps=1, eval_every=0, log_every=2, seed=0,
                      out_dir=str(tmp_path / "run"))
    model = convert_to_fp8_training(tiny_model())
    history = train(model, dataset, cfg)
    losses = [r["loss"] for r in history.train]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    path = tmp_path / "run" / "step-000004"
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}  # FP32 master weights
        assert set(f.keys()) == set(tiny_model().state_dict())  # the plain model's names
    with safe_open(str(path / "optimizer.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys() if not k.startswith("rng.")} == {"F32"}

    # Resume a converted model from step 2: the same losses as straight through.
    cfg2 = TrainConfig(**{**cfg.__dict__, "out_dir": str(tmp_path / "resume")})
    train(convert_to_fp8_training(tiny_model()), dataset, cfg2, stop_at_step=2)
    resumed = train(convert_to_fp8_training(tiny_model(seed=1)), dataset, cfg2,
                    resume_from=tmp_path / "resume" / "step-000002")
    assert [r["loss"] for r in resumed.train[2:]] == losses[2:]

    # The checkpoint loads into a plain model, and quantize_to_fp8 gives the inference model of either.
    plain = tiny_model(seed=2)
    load_checkpoint(path, plain)
    x = torch.randint(0, 264, (2, 16))
    fp8_from_plain = quantize_to_fp8(plain)
    fp8_from_converted = quantize_to_fp8(copy.deepcopy(model))
    assert isinstance(fp8_from_converted.layers[0].self_attn.q_a_proj, FP8Linear)
    with torch.no_grad():
        assert torch.equal(fp8_from_converted(x), fp8_from_plain(x))


def test_converted_loss_is_close_to_fp32():
    model = tiny_model()
    x = torch.randint(0, 264, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, _ = model.loss(x, x)
        fp8, _ = convert_to_fp8_training(model).loss(x, x)
    assert abs(fp8.item() / ref.item() - 1) < 1e-2


def test_gate_routes_in_float32_under_autocast():
    """The BF16 baseline runs under torch.autocast; the MoE gate must still route in FP32 (report section 3.3.1)."""
    model = tiny_model(n_layers=2).eval()
    x = torch.randint(0, 264, (2, 32), generator=torch.Generator().manual_seed(0))
    gate = model.layers[1].mlp.gate
    h = torch.randn(64, model.config.dim)
    with torch.no_grad():
        weights, ids = gate(h, seq_len=32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            weights_bf16, ids_bf16 = gate(h, seq_len=32)
            model(x)
    assert torch.equal(ids, ids_bf16) and torch.equal(weights, weights_bf16)


def test_bad_input_is_refused_by_name():
    with pytest.raises(TypeError, match=r"layers\.0\.self_attn\.q_a_proj\.weight is torch\.bfloat16.*FP32 master"):
        convert_to_fp8_training(tiny_model().bfloat16())
    with pytest.raises(ValueError, match="layers.0.self_attn.q_a_proj is an FP8 inference layer"):
        convert_to_fp8_training(quantize_to_fp8(tiny_model()))
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        convert_to_fp8_training(tiny_model(), block_size=100)
    model = convert_to_fp8_training(tiny_model())
    with pytest.raises(TypeError, match="keeps FP32 master weights, got a torch.bfloat16 weight"):
        model.bfloat16()(torch.randint(0, 264, (1, 4)))
    layer = FP8TrainingLinear(64, 8)
    with pytest.raises(ValueError, match="x has 32 features, the weight \\[8, 64\\] expects 64"):
        layer(torch.randn(2, 32))
    with pytest.raises(TypeError, match="x must be float32, bfloat16 or float16, got torch.int64"):
        layer(torch.ones(2, 64, dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_kernels_train_on_the_gpu():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 kernels need compute capability 8.9+")
    kernels.set_backend("triton")  # compiled: "auto" now sends CUDA tensors through the kernels
    x, w, dy = (t.cuda() for t in outlier_inputs(300, 7168, 1536))
    set_kernels("off")
    reference = fp8_grads(x, w, dy)
    set_kernels("auto")
    compiled = fp8_grads(x, w, dy)
    x16, dy16 = x.bfloat16(), dy.bfloat16()
    compiled_bf16 = fp8_grads(x16, w, dy16)
    for out, ref, out16 in zip(compiled, reference, compiled_bf16, strict=True):
        # the same FP8 arithmetic; FP32 sums in another order can move a value across an E4M3 rounding tie
        assert ((out - ref).norm() / ref.norm()).item() < 1e-2
        assert ((out16.float() - ref).norm() / ref.norm()).item() < 5e-2
