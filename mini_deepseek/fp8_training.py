"""FP8 training as DeepSeek-V3 was trained (DeepSeek-V3 section 3.3, figures 6 and 7): the GEMMs of every Linear and
of the routed experts take E4M3 inputs with fine-grained scales; master weights, gradients and optimizer state stay
in FP32.

    convert_to_fp8_training(model)   # in place; then train(model, ...) as before

torchao names the same step `convert_to_float8_training(module, module_filter_fn=...)`. A converted layer keeps its
parameters (the same tensors, under the same names, in FP32), so the optimizer, `train()` and checkpoints see
nothing new, and `quantize_to_fp8` still turns the trained model into the FP8 inference model. What changes is how
the layer multiplies. Each of its three GEMMs quantizes both operands to E4M3, as figure 6 of the report draws them:

    Fprop  y  = x W^T    [M, N]: x in 1 x 128 tiles along K (per token), W in 128 x 128 blocks
    Dgrad  dx = dy W     [M, K]: dy in 1 x 128 tiles along N (per token), W^T: the same FP8 blocks, transposed
    Wgrad  dW = dy^T x   [N, K]: dy^T and x^T in 1 x 128 tiles along the M tokens, i.e. 128 x 1 tiles of dy and x

M counts tokens (batch x sequence), K = in_features, N = out_features. Every GEMM sums in FP32 and applies the
scales once per 128-deep step of its contraction, the promotion of section 3.3.2. The activation x is kept for the
backward pass in FP8 (1 byte per element plus one scale per 128); Wgrad converts it from 1 x 128 to 128 x 1 tiles,
as the report does for the activations it caches. Activation gradients are never quantized in 128 x 128 blocks:
appendix B.2 reports that block-wise gradients made a 16B MoE model diverge (token-correlated outliers).

The arithmetic is `kernels.act_quant` and `kernels.fp8_gemm`: the Triton kernels with the kernel switch on
(compiled on a GPU; interpreted on a CPU, slow, for small shapes), else their plain-PyTorch reference, the same codes
and scales. On a CPU the E4M3 values are exact and their products are summed in FP32: the numerics of an FP8 tensor
core that promotes every 128 products, without its speed.

Kept in higher precision, as in the report: the embedding, the output head, the MoE gate, every normalization and the
attention itself (softmax(q k^T) v, not a Linear), and MTP's `eh_proj`, which the published checkpoint also keeps in
BF16. Routed experts train in FP8 (the report runs the MoE GEMMs in FP8), through the fused-MoE loop of
`kernels.reference.fused_moe` with this module's GEMM in place of the plain one: the forward is exactly the
w8a8 fused MoE's arithmetic, and the backward quantizes as above. The grouped Triton kernel has no backward, so
with the kernel switch on each expert's GEMMs run through `fp8_gemm`, forward and backward.

Not reproduced here: the E5M6 format the report uses for some cached activations, recomputing SwiGLU, AdamW moments in
BF16 (ours stay FP32), and FP8 communication; absorbed MLA (an inference path) reads kv_b_proj's master weight
directly, so train in the default naive mode to run that projection in FP8 too.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

import kernels
from kernels.reference import act_dequant

from .fp8 import _KEPT_LINEARS, FP8Linear, FP8RoutedExperts, _ops
from .moe import RoutedExperts

# Linears kept in higher precision besides the ones that are not nn.Linear (embedding, gate): the output head, and
# MTP's projection, which the published FP8 checkpoint stores in BF16: the layers quantize_to_fp8 keeps.
HIGH_PRECISION_LINEARS = _KEPT_LINEARS
# The amax floor of gradient tiles. Activations keep the kernels' 1e-4, but the gradient of a mean loss over M tokens
# is of order 1 / M: with a floor of 1e-4, the floor rather than the values would set the scale of every gradient
# tile below it and push its small entries into the subnormals. This floor only keeps all-zero tiles finite.
GRAD_AMAX_FLOOR = 1e-12


class _FP8Matmul(torch.autograd.Function):
    """y = x W^T for x [M, K] and an FP32 master weight W [N, K], with Fprop, Dgrad and Wgrad in FP8."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, block_size: int) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):  # the FP32 sums must stay FP32 under autocast
            ops = _ops(x)
            x_q, x_s = ops.act_quant(x, block_size)  # [M, K] E4M3, [M, ceil(K / bs)]: 1 x 128 tiles
            w_q, w_s = ops.weight_quant(weight, block_size)  # [N, K] E4M3, [ceil(N / bs), ceil(K / bs)]
            y = ops.fp8_gemm(x_q, x_s, w_q, w_s, block_size, out_dtype=x.dtype)  # [M, N]
        ctx.save_for_backward(x_q, x_s, w_q, w_s)  # the activation is kept in FP8, not in x's dtype
        ctx.block_size = block_size
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x_q, x_s, w_q, w_s = ctx.saved_tensors
        bs, dx, dw = ctx.block_size, None, None
        dy = dy.contiguous()  # [M, N]
        with torch.autocast(dy.device.type, enabled=False):
            ops = _ops(dy)
            if ctx.needs_input_grad[0]:  # Dgrad, contracted over N
                dy_q, dy_s = ops.act_quant(dy, bs, GRAD_AMAX_FLOOR)  # 1 x 128 tiles along N
                w_t_q, w_t_s = w_q.T.contiguous(), w_s.T.contiguous()  # [K, N]: a block's transpose keeps its scale
                dx = ops.fp8_gemm(dy_q, dy_s, w_t_q, w_t_s, bs, out_dtype=dy.dtype)  # [M, K]
            if ctx.needs_input_grad[1]:  # Wgrad, contracted over the M tokens
                if dy.shape[0] == 0:
                    dw = torch.zeros(w_q.shape, dtype=torch.float32, device=dy.device)
                else:
                    dy_t_q, dy_t_s = ops.act_quant(dy.T.contiguous(), bs, GRAD_AMAX_FLOOR)  # [N, M]: 128 x 1 tiles
                    x_t = act_dequant(x_q, x_s, bs).T.contiguous()  # [K, M], from the cached FP8 activation
                    x_t_q, x_t_s = ops.act_quant(x_t, bs)  # requantized in 128 x 1 tiles of x
                    dw = ops.fp8_gemm(dy_t_q, dy_t_s, x_t_q, x_t_s, bs, out_dtype=torch.float32)  # [N, K]
        return dx, dw, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, block_size: int = 128) -> torch.Tensor:
    """x [..., K] @ weight [N, K]^T -> [..., N] in x's dtype, differentiable, every GEMM in FP8 (module docstring).
    weight must be the FP32 master weight."""
    if weight.dtype != torch.float32:
        raise TypeError(f"FP8 training keeps FP32 master weights, got a {weight.dtype} weight {list(weight.shape)}: "
                        "keep the model in float32 (torch.autocast gives BF16 compute elsewhere)")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"fp8_linear: x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"fp8_linear: x has {x.shape[-1]} features, the weight {list(weight.shape)} expects "
                         f"{weight.shape[1]}")
    y = _FP8Matmul.apply(x.reshape(-1, x.shape[-1]), weight, block_size)  # [M, K] -> [M, N]
    return y.view(*x.shape[:-1], weight.shape[0])


def _check_block_size(block_size: int) -> None:
    if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16 (the kernels' tile size; DeepSeek-V3 uses 128), "
                         f"got {block_size!r}")


class FP8TrainingLinear(nn.Linear):
    """An nn.Linear (FP32 master `weight`, optional `bias`) whose forward and backward GEMMs run in FP8; the bias is
    added in the input's precision."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, block_size: int = 128,
                 device=None, dtype=None):
        _check_block_size(block_size)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.block_size = block_size

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = 128) -> FP8TrainingLinear:
        """The same parameters (not copies), now multiplied in FP8."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, block_size, device="meta")
        layer.weight, layer.bias = linear.weight, linear.bias
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_linear(x, self.weight, self.block_size)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block_size={self.block_size}"


class FP8TrainingExperts(RoutedExperts):
    """RoutedExperts (FP32 master w_gate_up [E, 2I, dim], w_down [E, dim, I]) whose GEMMs run in FP8: the fused-MoE
    loop of kernels.reference.fused_moe with fp8_linear as each expert's GEMM."""

    block_size: int

    @classmethod
    def from_experts(cls, experts: RoutedExperts, block_size: int = 128) -> FP8TrainingExperts:
        _check_block_size(block_size)
        n_experts, dim, inter_dim = experts.w_down.shape
        with torch.device("meta"):
            layer = cls(n_experts, dim, inter_dim)
        layer.w_gate_up, layer.w_down = experts.w_gate_up, experts.w_down
        layer.block_size = block_size
        return layer

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x [N, dim], weights/indices [N, k] -> sum_j weights[:, j] * expert_{indices[:, j]}(x), [N, dim]."""
        gemm: Callable = partial(fp8_linear, block_size=self.block_size)
        return kernels.reference.fused_moe(x, self.w_gate_up, self.w_down, weights, indices, block_size=self.block_size,
                                           compute_dtype=x.dtype, gemm=gemm)

    def extra_repr(self) -> str:
        return f"experts={self.w_down.shape[0]}, dim={self.w_down.shape[1]}, inter_dim={self.inter_dim}, " \
               f"block_size={self.block_size}"


def convert_to_fp8_training(model: nn.Module, block_size: int = 128,
                            module_filter_fn: Callable[[nn.Module, str], bool] | None = None) -> nn.Module:
    """Swap, in place, every nn.Linear but the output head and MTP's eh_proj for an FP8TrainingLinear and every
    RoutedExperts for FP8TrainingExperts, sharing their parameters. Returns model (its train/eval mode unchanged).

    module_filter_fn(module, fully_qualified_name) -> bool, as in torchao, can keep more layers in higher precision
    (return False). Layers already converted are left alone. The model must hold FP32 weights and no FP8 inference
    layers (their 1-byte weights cannot be trained).
    """
    _check_block_size(block_size)
    inference = [name for name, m in model.named_modules() if isinstance(m, (FP8Linear, FP8RoutedExperts))]
    if inference:
        raise ValueError(f"{inference[0]} is an FP8 inference layer (quantize_to_fp8 / from_pretrained(fp8=True)): its "
                         "1-byte weights cannot be trained. Convert the plain float32 model instead")
    swaps = []
    for parent_name, parent in model.named_modules():
        for name, child in parent.named_children():
            fqn = f"{parent_name}.{name}" if parent_name else name
            if isinstance(child, (FP8TrainingLinear, FP8TrainingExperts)) or name in HIGH_PRECISION_LINEARS:
                continue
            if not isinstance(child, (nn.Linear, RoutedExperts)):
                continue
            if module_filter_fn is not None and not module_filter_fn(child, fqn):
                continue
            for param_name, p in child.named_parameters():
                if p.dtype != torch.float32:
                    raise TypeError(f"{fqn}.{param_name} is {p.dtype}: FP8 training keeps FP32 master weights. Convert "
                                    "the float32 model (torch.autocast gives BF16 compute for the other layers)")
            swaps.append((parent, name, child))
    for parent, name, child in swaps:
        new = FP8TrainingLinear.from_linear(child, block_size) if isinstance(child, nn.Linear) \
            else FP8TrainingExperts.from_experts(child, block_size)
        setattr(parent, name, new.train(child.training))
    return model
