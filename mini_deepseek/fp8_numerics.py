"""The numerics behind FP8 training (DeepSeek-V3 section 3.3), as small functions notebook 04 measures with:
number formats, scaling granularity, a tensor core's limited-precision accumulator, and the memory of a training step.

- `FORMATS`: FP32, BF16, E5M2 and E4M3: bit layout, bias, range (from torch.finfo), infinities.
- `fake_quantize(x, scaling)`: x through E4M3 (or E5M2) and back, with one scale per tensor, per 1 x 128 tile
  (kernels.act_quant) or per 128 x 128 block (kernels.weight_quant): the error each granularity costs.
- `limited_precision_sum`: a sum that keeps `acc_bits` significant bits after every addition, optionally promoting its
  partial sum to FP32 every `promote_every` products, the model of an FP8 tensor core's accumulator.
- `training_memory(cfg)`: bytes of weights, saved activations and optimizer state per parameter and per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kernels import reference as R

from .config import ModelConfig
from .fp8_training import (
    HIGH_PRECISION_LINEARS,
    FP8TrainingExperts,
    FP8TrainingLinear,
    convert_to_fp8_training,
)
from .model import DeepSeekV3


@dataclass(frozen=True)
class FloatFormat:
    name: str
    dtype: torch.dtype
    exponent_bits: int  # after one sign bit
    mantissa_bits: int  # stored fraction bits (one more, implicit, for normal numbers)
    bias: int  # value = 2^(exponent - bias) * 1.mantissa for normal numbers
    has_inf: bool  # E4M3 ("fn": finite) gives its infinity codes to more finite values: max 448, not 240

    @property
    def max(self) -> float:
        return torch.finfo(self.dtype).max

    @property
    def min_normal(self) -> float:
        return torch.finfo(self.dtype).smallest_normal

    @property
    def min_subnormal(self) -> float:
        return self.min_normal * 2.0**-self.mantissa_bits

    @property
    def relative_step(self) -> float:
        """Spacing of neighbouring normal numbers relative to their size, at most: 2^-mantissa_bits."""
        return 2.0**-self.mantissa_bits


FORMATS = {f.name: f for f in [
    FloatFormat("FP32", torch.float32, 8, 23, 127, True),
    FloatFormat("BF16", torch.bfloat16, 8, 7, 127, True),
    FloatFormat("E5M2", torch.float8_e5m2, 5, 2, 15, True),
    FloatFormat("E4M3", torch.float8_e4m3fn, 4, 3, 7, False),
]}


def representable_values(fmt: FloatFormat) -> torch.Tensor:
    """Every finite non-negative value of an 8- or 16-bit format, sorted, as float64 (one per code, -0 merged)."""
    if fmt.dtype.itemsize > 2:
        raise ValueError(f"{fmt.name} has 2^{8 * fmt.dtype.itemsize} codes: too many to list")
    codes = torch.arange(2 ** (8 * fmt.dtype.itemsize), dtype=torch.int32)
    as_bits = codes.to(torch.uint8) if fmt.dtype.itemsize == 1 else codes.to(torch.int16)
    values = as_bits.view(fmt.dtype).double()
    return values[values.isfinite() & (values >= 0)].unique()


def to_format(x: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """x rounded to the nearest value of fmt (ties to even), saturating at ±max, as float32."""
    return x.float().clamp(-fmt.max, fmt.max).to(fmt.dtype).float()


# ---- scaling granularity -------------------------------------------------------------------------------------------
SCALINGS = ("per-tensor", "1x128", "128x128")


def fake_quantize(x: torch.Tensor, scaling: str, fmt: FloatFormat = FORMATS["E4M3"], block_size: int = 128,
                  amax_floor: float = R.AMAX_FLOOR) -> torch.Tensor:
    """x [..., K] quantized and dequantized, float32. scaling: "per-tensor" (one scale amax / max), "1x128" (per token,
    kernels.act_quant), "128x128" (blocks over the last two dimensions, kernels.weight_quant); the last two are E4M3
    only, the library's own arithmetic. scaling "none" rounds x to fmt unscaled. amax_floor: the smallest amax a scale
    is computed from (FP8 training quantizes gradients with fp8_training.GRAD_AMAX_FLOOR)."""
    if scaling == "none":
        return to_format(x, fmt)
    if scaling == "per-tensor":
        scale = x.abs().amax().float().clamp_min(amax_floor) / fmt.max
        return to_format(x / scale, fmt) * scale
    if fmt.name != "E4M3":
        raise ValueError(f"{scaling} scaling is the E4M3 kernels' (kernels.act_quant / weight_quant), not {fmt.name}")
    if scaling == "1x128":
        return R.act_dequant(*R.act_quant(x, block_size, amax_floor), block_size)
    if scaling == "128x128":
        return R.weight_dequant(*R.weight_quant(x, block_size, amax_floor), block_size, torch.float32)
    raise ValueError(f"unknown scaling {scaling!r}; choose one of {SCALINGS} or 'none'")


@dataclass(frozen=True)
class QuantError:
    relative: float  # ||x̂ - x|| / ||x||
    underflow: float  # share of the non-zero elements that became 0
    median_element: float  # median of |x̂ - x| / |x| over the non-zero elements


def quantization_error(x: torch.Tensor, x_hat: torch.Tensor) -> QuantError:
    x, x_hat = x.float(), x_hat.float()
    nonzero = x != 0
    per_element = ((x_hat - x).abs() / x.abs())[nonzero]
    return QuantError(relative=((x_hat - x).norm() / x.norm()).item(),
                      underflow=(x_hat[nonzero] == 0).float().mean().item(),
                      median_element=per_element.median().item())


def outlier_ratio(t: torch.Tensor, along: str = "channel") -> float:
    """How far the largest channel (column) or token (row) of t [M, K] stands out: its amax over the median amax."""
    amax = t.abs().amax(dim=0 if along == "channel" else 1)
    return (amax.max() / amax.median()).item()


def amplify_outlier(t: torch.Tensor, factor: float, along: str = "channel") -> torch.Tensor:
    """A copy of t [M, K] whose largest channel (or token) is rescaled so that its amax is `factor` times the median
    amax of the channels (tokens): the same activation with a stronger outlier, the kind LLMs grow at scale."""
    dim = 0 if along == "channel" else 1
    amax = t.abs().amax(dim=dim)
    top = int(amax.argmax())
    out = t.clone()
    index = (slice(None), top) if along == "channel" else (top, slice(None))
    out[index] *= factor * amax.median() / amax[top]
    return out


def error_beside_outlier(t: torch.Tensor, factor: float, along: str, scaling: str,
                         amax_floor: float = R.AMAX_FLOOR) -> QuantError:
    """What an outlier costs the rest: t [M, K] with its largest channel (column) or token (row) made `factor` times
    the median (amplify_outlier), quantized with `scaling`; the error of every element outside that channel/token."""
    amplified = amplify_outlier(t, factor, along)
    dim = 0 if along == "channel" else 1
    rest = torch.ones(t.shape[1 - dim], dtype=torch.bool)
    rest[int(t.abs().amax(dim=dim).argmax())] = False  # the outlier itself is not measured
    x_hat = fake_quantize(amplified, scaling, amax_floor=amax_floor)
    keep = (slice(None), rest) if along == "channel" else (rest, slice(None))
    return quantization_error(amplified[keep], x_hat[keep])


def capture_linear_tensors(model: torch.nn.Module, input_ids: torch.Tensor,
                           targets: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One forward and backward pass of model.loss: for every nn.Linear that convert_to_fp8_training would swap, its
    input [M, K] and the gradient of its output [M, N] (the tensors FP8 training quantizes), detached float32. The
    gradients the pass leaves on the parameters are cleared."""
    tensors: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, module in model.named_modules():
        if type(module) is torch.nn.Linear and name.rsplit(".", 1)[-1] not in HIGH_PRECISION_LINEARS:
            def keep_input(m, args, name=name):
                tensors[name] = [args[0].detach().float().reshape(-1, args[0].shape[-1])]

            def keep_grad(m, grad_input, grad_output, name=name):
                tensors[name].append(grad_output[0].detach().float().reshape(-1, grad_output[0].shape[-1]))

            handles += [module.register_forward_pre_hook(keep_input), module.register_full_backward_hook(keep_grad)]
    try:
        loss, _ = model.loss(input_ids, targets)
        loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
    return {name: (pair[0], pair[1]) for name, pair in tensors.items()}


# ---- limited-precision accumulation --------------------------------------------------------------------------------
def round_to_bits(x: torch.Tensor, bits: int, rounding: str = "truncate") -> torch.Tensor:
    """x (float64) with `bits` significant bits kept: truncated towards zero (what an alignment shifter drops), or
    rounded to nearest even ("nearest")."""
    mantissa, exponent = torch.frexp(x)  # x = mantissa * 2^exponent, 0.5 <= |mantissa| < 1
    scaled = torch.ldexp(mantissa, torch.full_like(exponent, bits))  # |scaled| in [2^(bits-1), 2^bits)
    if rounding == "truncate":
        kept = scaled.trunc()
    elif rounding == "nearest":
        kept = scaled.round()  # torch.round: half to even
    else:
        raise ValueError(f"rounding must be 'truncate' or 'nearest', got {rounding!r}")
    return torch.ldexp(kept, exponent - bits)


def limited_precision_sum(products: torch.Tensor, acc_bits: int = 14, promote_every: int | None = None,
                          rounding: str = "truncate") -> torch.Tensor:
    """Sum products [..., K] over the last dimension in order, keeping acc_bits significant bits after each addition.

    promote_every=None: one accumulator for all K products (an FP8 GEMM on the tensor core alone). promote_every=n:
    every n products the partial sum is added to an FP32 total and the accumulator restarts from zero (DeepSeek-V3's
    promotion to CUDA cores every N_C = 128 elements). Returns the sums [...] in float64.
    """
    if acc_bits < 2 or (promote_every is not None and promote_every < 1):
        raise ValueError(f"need acc_bits >= 2 and promote_every >= 1, got {acc_bits}, {promote_every}")
    products = products.double()
    K = products.shape[-1]
    acc = torch.zeros(products.shape[:-1], dtype=torch.float64)
    total = torch.zeros_like(acc, dtype=torch.float32)
    for k in range(K):
        acc = round_to_bits(acc + products[..., k], acc_bits, rounding)
        if promote_every is not None and (k + 1) % promote_every == 0:
            total, acc = total + acc.float(), torch.zeros_like(acc)
    return (total + acc.float()).double() if promote_every is not None else acc


def accumulation_error(K: int, acc_bits: int = 14, promote_every: int | None = None, rounding: str = "truncate",
                       n_outputs: int = 1024, seed: int = 0) -> float:
    """Largest relative error |ĉ - c| / |c| over n_outputs dot products of length K between random E4M3 vectors with
    entries in [0, 1) (positive, so that no output is near zero and the relative error stays meaningful)."""
    g = torch.Generator().manual_seed(seed)
    a = to_format(torch.rand(n_outputs, K, generator=g), FORMATS["E4M3"]).double()
    b = to_format(torch.rand(n_outputs, K, generator=g), FORMATS["E4M3"]).double()
    products = a * b  # exact: two 4-bit significands multiply into 8 bits
    exact = products.sum(-1)  # float64 holds it exactly enough (errors ~1e-16)
    approx = limited_precision_sum(products, acc_bits, promote_every, rounding)
    return ((approx - exact).abs() / exact.abs()).max().item()


# ---- memory --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainingMemory:
    fp8_params: int  # parameters of the layers FP8 training converts
    other_params: int  # embedding, output head, gates, norms, MTP's eh_proj
    fp8_weight_scales: int  # 128 x 128 block scales of the converted weights
    linear_inputs_per_token: int  # elements each token leaves saved for the backward pass of the converted layers

    def bytes_per_token(self, fp8: bool, block_size: int = 128) -> float:
        """Saved inputs of the converted layers: BF16 (2 bytes) or E4M3 plus one float32 scale per 1 x 128 tile."""
        n = self.linear_inputs_per_token
        return n * (1 + 4 / block_size) if fp8 else 2 * n

    def weight_bytes(self, fp8: bool) -> int:
        """The weights the GEMMs read: BF16 everywhere, or E4M3 + block scales for the converted layers."""
        converted = self.fp8_params + 4 * self.fp8_weight_scales if fp8 else 2 * self.fp8_params
        return converted + 2 * self.other_params

    def optimizer_bytes(self, moments_dtype: torch.dtype = torch.float32) -> int:
        """AdamW's two moments per parameter (ours: FP32; DeepSeek-V3's: BF16)."""
        return 2 * moments_dtype.itemsize * (self.fp8_params + self.other_params)

    def master_bytes(self) -> int:
        """FP32 master weights and FP32 gradients, the same in both recipes."""
        return 8 * (self.fp8_params + self.other_params)


def training_memory(config: ModelConfig, block_size: int = 128) -> TrainingMemory:
    """Parameter counts and saved-activation elements of FP8 training for a config, built on the meta device.

    Saved inputs per token, one copy per distinct input as a fused implementation keeps them: MLA's h (shared by the
    q and kv down-projections), c_Q, c_KV and the attention output; an MLP's input (shared by gate and up) and its
    SwiGLU output; for routed experts the same two per chosen expert (k of them). MTP modules included."""
    with torch.device("meta"):
        model = convert_to_fp8_training(DeepSeekV3(config), block_size)
    fp8_params = scales = 0
    for m in model.modules():
        if isinstance(m, FP8TrainingLinear):
            weights = [m.weight]
        elif isinstance(m, FP8TrainingExperts):
            weights = [m.w_gate_up, m.w_down]
        else:
            continue
        for w in weights:
            fp8_params += w.numel()
            scales += math.prod(R.block_scale_shape(tuple(w.shape), block_size))
    total = sum(p.numel() for p in model.parameters())
    return TrainingMemory(fp8_params, total - fp8_params, scales, _linear_inputs_per_token(config))


def _linear_inputs_per_token(cfg: ModelConfig) -> int:
    if cfg.attn_type != "mla":
        raise ValueError(f"training_memory counts MLA models, got attn_type = {cfg.attn_type!r}")
    attention = cfg.dim + (cfg.q_lora_rank or 0) + cfg.kv_lora_rank + cfg.n_heads * cfg.v_head_dim
    dense = cfg.dim + cfg.inter_dim
    shared = (cfg.dim + cfg.n_shared_experts * cfg.moe_inter_dim) if cfg.n_shared_experts else 0
    moe = shared + cfg.n_activated_experts * (cfg.dim + cfg.moe_inter_dim)
    n_moe_layers = cfg.n_layers - cfg.n_dense_layers
    per_layer = cfg.n_layers * attention + cfg.n_dense_layers * dense + n_moe_layers * moe
    # each MTP module: its (kept) eh_proj, then one MoE block
    return per_layer + cfg.n_mtp_modules * (attention + moe)
