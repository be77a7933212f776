"""FP8 inference as DeepSeek-V3 serves it (DeepSeek-V3 section 3.3): weights held as 1-byte E4M3 codes with one
float32 scale per 128 x 128 block, activations quantized per token in 1 x 128 tiles on the way into each GEMM.

    quantize_to_fp8(model)                     # in place: attention, MLPs, experts; returns it in eval mode
    model = from_pretrained(path, fp8=True)    # the published FP8 weights, kept in FP8 (checkpoint.py)

Kept in higher precision, as in DeepSeek-V3's FP8 framework and its published checkpoints: the embedding, the
output head, the MoE gate and every RMSNorm, components the paper found sensitive to low precision, and the MTP
modules' `eh_proj`, which the published checkpoint stores in BF16 (model.layers.61.eh_proj.weight has no scale).

The layers hold what the checkpoints hold, under the same names: `weight` float8_e4m3fn [out, in] and
`weight_scale_inv` float32 [ceil(out / 128), ceil(in / 128)], a multiplier despite its name (w ≈ weight * scale).
They run `act_quant`, `fp8_gemm` and `fused_moe` from `kernels`, or the same arithmetic from `kernels.reference`
when the kernel switch (kernel_switch.py) is off.

FP8 layers are forward-only: the kernels have no autograd and 1-byte weights cannot take optimizer steps.
Train the plain model, then quantize it.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

import kernels
from kernels.reference import FP8, block_scale_shape, weight_quant

from .kernel_switch import use_kernels
from .moe import RoutedExperts


def _ops(x: torch.Tensor) -> ModuleType:
    """Where the FP8 arithmetic for x comes from: the kernels, or their plain-PyTorch reference."""
    return kernels if use_kernels(x, fp8=True) else kernels.reference


def _frozen(t: torch.Tensor) -> nn.Parameter:
    # Parameters rather than buffers, as in DeepSeek's inference code: they count in parameter totals and move
    # with the model; requires_grad=False keeps them out of every optimizer.
    return nn.Parameter(t, requires_grad=False)


def _check_pair(codes: torch.Tensor, scale: torch.Tensor, block_size: int, name: str) -> None:
    expected = block_scale_shape(codes.shape, block_size)
    if codes.dtype != FP8 or scale.dtype != torch.float32 or tuple(scale.shape) != expected:
        raise ValueError(f"{name}: expected float8_e4m3fn codes and float32 scales of shape {list(expected)} "
                         f"({block_size} x {block_size} blocks), got {codes.dtype} {list(codes.shape)} and "
                         f"{scale.dtype} {list(scale.shape)}")


def _check_forward(module: nn.Module) -> None:
    """Raise if module is being trained, or if its FP8 tensors were cast to another dtype."""
    if module.training and torch.is_grad_enabled():
        raise RuntimeError(f"{type(module).__name__} is forward-only (FP8 weights take no optimizer steps and the "
                           "kernels have no autograd): call model.eval() or run under torch.no_grad(). To train, "
                           "train the plain model and quantize it afterwards")
    for name, p in module.named_parameters(recurse=False):
        expected = torch.float32 if name.endswith("_scale_inv") else FP8
        if p.dtype != expected:
            raise TypeError(f"{type(module).__name__}.{name} is {p.dtype}, not {expected}: model.to(dtype), "
                            ".half() and .bfloat16() cast FP8 tensors too. Cast the model before quantize_to_fp8, "
                            "or give from_pretrained its dtype=")


class FP8Linear(nn.Module):
    """A bias-free Linear with E4M3 weight codes and 128 x 128 block scales; y = x W^T in x's dtype."""

    def __init__(self, weight: torch.Tensor, weight_scale_inv: torch.Tensor, block_size: int = 128):
        super().__init__()
        _check_pair(weight, weight_scale_inv, block_size, "FP8Linear")
        self.out_features, self.in_features = weight.shape
        self.block_size = block_size
        self.weight = _frozen(weight)  # [out, in] float8_e4m3fn
        self.weight_scale_inv = _frozen(weight_scale_inv)  # [ceil(out / bs), ceil(in / bs)] float32

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = 128) -> FP8Linear:
        if linear.bias is not None:
            raise ValueError("FP8Linear has no bias (no DeepSeek projection has one)")
        return cls(*weight_quant(linear.weight.detach(), block_size), block_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_forward(self)
        ops = _ops(x)
        x_q, x_s = ops.act_quant(x, self.block_size)  # [..., in] codes, [..., ceil(in / bs)] per-token scales
        return ops.fp8_gemm(x_q, x_s, self.weight, self.weight_scale_inv, self.block_size, out_dtype=x.dtype)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """weight * scale, [out, in] in dtype."""
        return _ops(self.weight).weight_dequant(self.weight, self.weight_scale_inv, self.block_size, dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, block_size={self.block_size}"


def dense_weight(layer: nn.Linear | FP8Linear, dtype: torch.dtype) -> torch.Tensor:
    """The [out, in] weight of a Linear or FP8Linear as an ordinary tensor: MLA's absorbed mode reads kv_b_proj's
    weight directly (DeepSeek's inference code calls weight_dequant at the same place)."""
    return layer.dequantized_weight(dtype) if isinstance(layer, FP8Linear) else layer.weight


class FP8RoutedExperts(nn.Module):
    """RoutedExperts with E4M3 weights: w_gate_up [E, 2I, dim] and w_down [E, dim, I], each with block scales
    per expert (`w_gate_up_scale_inv` [E, ceil(2I / bs), ceil(dim / bs)], `w_down_scale_inv`); runs fused_moe."""

    def __init__(self, w_gate_up: torch.Tensor, w_gate_up_scale_inv: torch.Tensor, w_down: torch.Tensor,
                 w_down_scale_inv: torch.Tensor, block_size: int = 128):
        super().__init__()
        _check_pair(w_gate_up, w_gate_up_scale_inv, block_size, "FP8RoutedExperts.w_gate_up")
        _check_pair(w_down, w_down_scale_inv, block_size, "FP8RoutedExperts.w_down")
        self.inter_dim, self.block_size = w_down.shape[2], block_size
        self.w_gate_up, self.w_gate_up_scale_inv = _frozen(w_gate_up), _frozen(w_gate_up_scale_inv)
        self.w_down, self.w_down_scale_inv = _frozen(w_down), _frozen(w_down_scale_inv)

    @classmethod
    def from_experts(cls, experts: RoutedExperts, block_size: int = 128) -> FP8RoutedExperts:
        return cls(*weight_quant(experts.w_gate_up.detach(), block_size),
                   *weight_quant(experts.w_down.detach(), block_size), block_size)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x [N, dim], weights/indices [N, k] -> sum_j weights[:, j] * expert_{indices[:, j]}(x), [N, dim]."""
        _check_forward(self)
        return _ops(x).fused_moe(x, self.w_gate_up, self.w_down, weights, indices, w1_scale=self.w_gate_up_scale_inv,
                                 w2_scale=self.w_down_scale_inv, block_size=self.block_size)


_KEPT_LINEARS = ("lm_head", "eh_proj")  # Linear layers the published FP8 checkpoint keeps in BF16


def quantize_to_fp8(model: nn.Module, block_size: int = 128) -> nn.Module:
    """Replace, in place, every nn.Linear but the output head (`lm_head`) and the MTP projections (`eh_proj`) by an
    FP8Linear and every RoutedExperts by FP8RoutedExperts, quantized with `weight_quant` in block_size x block_size
    blocks. Returns model in eval mode.

    Quantizing happens once per weight, so `kernels.reference.weight_quant` does it whatever the kernel switch
    says: its codes are bit-identical to the kernel's, and it also runs on the meta device, where from_pretrained
    builds the FP8 model before reading the weights into it."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and name not in _KEPT_LINEARS:
                setattr(parent, name, FP8Linear.from_linear(child, block_size))
            elif isinstance(child, RoutedExperts):
                setattr(parent, name, FP8RoutedExperts.from_experts(child, block_size))
    return model.eval()


def fp8_block_size(model: nn.Module) -> int | None:
    """The block size of model's FP8 layers; None if it has none."""
    sizes = {m.block_size for m in model.modules() if isinstance(m, (FP8Linear, FP8RoutedExperts))}
    if len(sizes) > 1:
        raise ValueError(f"the model's FP8 layers use different block sizes {sorted(sizes)}; a checkpoint has one")
    return sizes.pop() if sizes else None
