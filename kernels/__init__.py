"""Block-scaled FP8 and fused-MoE kernels, with one switch for how they run.

Backends (`backend()` says which is active):
  "triton"     Triton kernels compiled for the GPU (CUDA available, Triton installed);
  "interpret"  the same kernels run by Triton's interpreter on the CPU, to read and step through them;
  "torch"      plain PyTorch (`kernels.reference`), when Triton is missing or asked for.
The backend is chosen per call from the tensors' device: compiled kernels take CUDA tensors only, so under
"triton" tensors on the CPU (or the meta device) take the plain-PyTorch versions. `backend(device)` says which
backend tensors on `device` take.

The choice is made on first use (a kernel call or `backend()`), not on import, so that importing `kernels` (or
`mini_deepseek`) neither imports Triton nor touches the environment: `MINI_DEEPSEEK_KERNELS=torch|triton|auto`
(default auto) and, without a GPU, `TRITON_INTERPRET=1` is set before any kernel is defined (set
`TRITON_INTERPRET` yourself to override). Compiled versus interpreted is fixed then; `set_backend("torch" |
"triton" | "auto")` switches at run time.
The kernels are forward-only (no autograd): they serve inference and FP8 forward passes.

Numerics (see `kernels.reference` for the definitions):
  - E4M3 codes, saturating at ±448, rounded to nearest even: bit-identical to torch's
    `.to(torch.float8_e4m3fn)` of the same clamped scaled value, on every backend.
  - Scales are multipliers (x ≈ q * s): s = max(amax, 1e-4) / 448 per 1 x 128 activation tile or 128 x 128
    weight block, so an all-zero tile gets a finite scale and zero codes.
  - Any size works: the last tile along a dimension may be partial (ceil division, masked loads); a
    576 x 7168 weight has 5 x 56 scales, an activation of width 64 has one.
  - NaN or ±Inf in a tile makes that tile's scale NaN and its codes NaN (0x7F); other tiles are untouched,
    and what is computed from that tile (GEMM rows, dequantized blocks, MoE tokens) is NaN, as in a bf16
    matmul. Nothing is checked on the host, so nothing waits for the GPU.
  - Wrong dtypes, shapes or devices raise TypeError or ValueError before anything runs.

Files: `fp8.py` and `moe.py` hold the Triton kernels, each opening with how it tiles the work (the MoE
module is not called fused_moe.py because importing it would replace the function `kernels.fused_moe`);
`reference.py` the plain-PyTorch versions; `bench.py` is `python -m kernels.bench`.
"""

from __future__ import annotations

import importlib.util
import math
import os
import warnings

import torch

from . import reference
from .reference import AMAX_FLOOR, FP8, block_scale_shape, cdiv

__all__ = ["act_quant", "weight_quant", "weight_dequant", "fp8_gemm", "fused_moe", "moe_align_block_size",
           "backend", "set_backend", "reference"]

_ENV = "MINI_DEEPSEEK_KERNELS"
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_backend: str | None = None  # None until first use (see backend())
_triton_impls: dict | None = None


def _load_triton() -> tuple[str, dict] | None:
    """Import the Triton kernels once; returns (mode, implementations), or None without Triton."""
    global _triton_impls
    if importlib.util.find_spec("triton") is None:
        return None
    if _triton_impls is None:
        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede every @triton.jit below
            _interpret_triton_language()
        from . import fp8, moe

        _triton_impls = dict(act_quant=fp8.act_quant, weight_quant=fp8.weight_quant,
                             weight_dequant=fp8.weight_dequant, fp8_gemm=fp8.fp8_gemm, fused_moe=moe.fused_moe)
    import triton

    return ("interpret" if triton.knobs.runtime.interpret else "triton"), _triton_impls


def _interpret_triton_language() -> None:
    """Let the interpreter run triton.language's own @jit functions (tl.max, tl.sum, tl.cdiv, ...) when Triton was
    imported before TRITON_INTERPRET was set (torch._dynamo imports it, for one): `@triton.jit` decides at
    decoration time, so those are compiled-mode JITFunctions, which an interpreted kernel cannot call. Without a
    GPU nothing could run them compiled anyway."""
    import sys

    from triton import knobs
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    if not knobs.runtime.interpret:  # TRITON_INTERPRET=0 set by the user: leave Triton as it is
        return
    interpreted: dict[int, InterpretedFunction] = {}
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "triton.language" or name.startswith("triton.language.")):
            continue
        for attr, value in list(vars(module).items()):
            if isinstance(value, JITFunction):
                setattr(module, attr, interpreted.setdefault(id(value), InterpretedFunction(value.fn)))


def backend(device: torch.device | str | None = None) -> str:
    """The active backend: "triton", "interpret" or "torch" (chosen from the environment on the first call). Given
    a device, the backend its tensors take: the same, except that compiled Triton runs CUDA tensors only and tensors
    elsewhere take "torch"."""
    if _backend is None:
        _init_backend()
    if device is not None and _backend == "triton" and torch.device(device).type != "cuda":
        return "torch"
    return _backend


def set_backend(name: str) -> str:
    """Select "torch", "triton" (the Triton kernels, compiled or interpreted as arranged at import) or "auto"
    (Triton when installed, else torch). Returns the backend now active."""
    global _backend
    if name not in ("auto", "triton", "torch"):
        raise ValueError(f"unknown kernels backend {name!r}; choose 'auto', 'triton' or 'torch'")
    loaded = None if name == "torch" else _load_triton()
    if name == "triton" and loaded is None:
        raise ValueError("the 'triton' kernels backend needs Triton, which is not installed (Linux wheels only)")
    _backend = loaded[0] if loaded else "torch"
    return _backend


def _init_backend() -> None:
    requested = os.environ.get(_ENV, "auto").strip().lower() or "auto"
    if requested not in ("auto", "triton", "torch"):
        warnings.warn(f"{_ENV}={requested!r} is not one of auto, triton, torch; using auto", stacklevel=4)
        requested = "auto"
    if set_backend("auto" if requested == "triton" else requested) == "torch" and requested != "torch":
        warnings.warn("Triton is not installed: kernels run their plain-PyTorch versions", stacklevel=4)


def _impl(name: str, device: torch.device):
    """The implementation of `name` for tensors on `device` (see `backend`)."""
    return getattr(reference, name) if backend(device) == "torch" else _triton_impls[name]


# ---- argument checks, shared by every backend ----

def _check_tensor(t, name: str, dtypes: tuple[torch.dtype, ...], min_dim: int = 1,
                  nonempty: int | None = None) -> None:
    """t is a tensor of one of `dtypes` with >= min_dim dimensions, the last `nonempty` (default all
    min_dim) of them non-zero; leading (batch) dimensions may be empty."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")
    nonempty = min_dim if nonempty is None else nonempty
    if t.dim() < min_dim or 0 in t.shape[t.dim() - nonempty:]:
        raise ValueError(f"{name} needs {min_dim} or more dimensions, the last {nonempty} non-empty; got shape "
                         f"{tuple(t.shape)}")


def _check_shape(t: torch.Tensor, name: str, expected: tuple[int, ...], why: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(expected)} ({why})")


def _check_devices(fp8: bool = True, **tensors: torch.Tensor) -> torch.device:
    """One device for all, returned; compiled kernels on it need FP8 support (compute capability 8.9+) if `fp8`."""
    devices = {t.device for t in tensors.values()}
    if len(devices) > 1:
        raise ValueError("tensors on different devices: " + ", ".join(f"{n} on {t.device}" for n, t in tensors.items()))
    device = devices.pop()
    if backend(device) != "triton":
        return device
    if fp8 and torch.cuda.get_device_capability(device) < (8, 9):
        raise ValueError(f"{torch.cuda.get_device_name(device)} has no FP8 (E4M3) support, which needs compute "
                         "capability 8.9+ (Ada, Hopper or later); use kernels.set_backend('torch')")
    return device


def _check_block(block_size) -> None:
    if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16 (Triton tile sizes), got {block_size!r}")


def _check_amax_floor(amax_floor) -> None:
    if isinstance(amax_floor, bool) or not isinstance(amax_floor, (int, float)) or not 1e-30 <= amax_floor < math.inf:
        raise ValueError(f"amax_floor must be a number in [1e-30, inf) (a normal float32 scale), got {amax_floor!r}")


def _check_out_dtype(dtype, name: str) -> None:
    if dtype not in _FLOATS:
        raise TypeError(f"{name} must be one of {', '.join(map(str, _FLOATS))}, got {dtype}")


# ---- public API ----

def act_quant(x: torch.Tensor, block_size: int = 128,
              amax_floor: float = AMAX_FLOOR) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations per token in 1 x block_size tiles along the last dimension.

    x [..., K] float32/bf16/fp16 -> q [..., K] float8_e4m3fn, s [..., ceil(K / block_size)] float32 with
    x ≈ q * s, s = max(amax, amax_floor) / 448 per tile (the default floor suits activations; gradients, far
    smaller, need a smaller one).
    """
    _check_tensor(x, "x", _FLOATS)
    _check_block(block_size)
    _check_amax_floor(amax_floor)
    device = _check_devices(x=x)
    return _impl("act_quant", device)(x, block_size, float(amax_floor))


def weight_quant(w: torch.Tensor, block_size: int = 128,
                 amax_floor: float = AMAX_FLOOR) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize weights in block_size x block_size blocks over the last two dimensions.

    w [..., N, K] -> q [..., N, K] float8_e4m3fn, s [..., ceil(N / bs), ceil(K / bs)] float32 (the published
    checkpoints' `weight_scale_inv`), s = max(amax, amax_floor) / 448 per block. Leading dimensions (e.g. experts)
    are independent.
    """
    _check_tensor(w, "w", _FLOATS, min_dim=2)
    _check_block(block_size)
    _check_amax_floor(amax_floor)
    device = _check_devices(w=w)
    return _impl("weight_quant", device)(w, block_size, float(amax_floor))


def weight_dequant(q: torch.Tensor, s: torch.Tensor, block_size: int = 128,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """q [..., N, K] float8_e4m3fn and s [..., ceil(N / bs), ceil(K / bs)] float32 -> q * s, [..., N, K] in
    `dtype` (default: torch.get_default_dtype())."""
    _check_tensor(q, "q", (FP8,), min_dim=2)
    _check_tensor(s, "s", (torch.float32,), min_dim=2)
    _check_block(block_size)
    _check_out_dtype(dtype or torch.get_default_dtype(), "dtype")
    _check_shape(s, "s", block_scale_shape(q.shape, block_size), f"one scale per {block_size} x {block_size} block of q")
    device = _check_devices(q=q, s=s)
    return _impl("weight_dequant", device)(q, s, block_size, dtype)


def fp8_gemm(a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor,
             block_size: int = 128, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """C = (a_q * a_s) @ (b_q * b_s)^T with float32 accumulation, scales applied per block_size-wide K step.

    a_q [..., K] and a_s [..., ceil(K / bs)] from `act_quant`; b_q [N, K] and b_s [ceil(N / bs),
    ceil(K / bs)] from `weight_quant` -> C [..., N] in out_dtype (bf16, fp16 or float32).
    b may also come from `act_quant` (b_s [N, ceil(K / bs)], one scale per 1 x bs tile of each row): the
    weight-gradient GEMM of FP8 training, whose operands are both activations or gradients.
    """
    _check_tensor(a_q, "a_q", (FP8,))
    _check_tensor(a_s, "a_s", (torch.float32,))
    _check_tensor(b_q, "b_q", (FP8,), min_dim=2)
    _check_tensor(b_s, "b_s", (torch.float32,), min_dim=2)
    _check_block(block_size)
    _check_out_dtype(out_dtype, "out_dtype")
    K = a_q.shape[-1]
    _check_shape(a_s, "a_s", (*a_q.shape[:-1], cdiv(K, block_size)), f"one scale per 1 x {block_size} tile of a_q")
    if b_q.dim() != 2 or b_q.shape[1] != K:
        raise ValueError(f"b_q must be [N, K] with K = {K} (the last dimension of a_q), got {tuple(b_q.shape)}")
    if tuple(b_s.shape) != (b_q.shape[0], cdiv(K, block_size)):  # else: 1 x bs tiles, from act_quant
        _check_shape(b_s, "b_s", block_scale_shape(b_q.shape, block_size),
                     f"one scale per {block_size} x {block_size} block of b_q, or [N, ceil(K / {block_size})] "
                     f"for 1 x {block_size} tiles")
    device = _check_devices(a_q=a_q, a_s=a_s, b_q=b_q, b_s=b_s)
    return _impl("fp8_gemm", device)(a_q, a_s, b_q, b_s, block_size, out_dtype)


def moe_align_block_size(topk_ids: torch.Tensor, block_size: int,
                         num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the (token, expert) slots by expert, padding each expert's run to a multiple of block_size.

    topk_ids [T, k] -> sorted_token_ids [P] (slot ids t * k + j; padding = T * k), expert_ids [P / block_size]
    (one expert per block; num_experts past the end), num_tokens_post_padded [1]; all int32. Ids must lie
    in [0, num_experts): that is not checked, since checking would wait for the GPU.
    """
    _check_tensor(topk_ids, "topk_ids", (torch.int32, torch.int64), min_dim=2, nonempty=1)
    if not isinstance(block_size, int) or block_size < 1 or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"block_size and num_experts must be positive ints, got {block_size!r}, {num_experts!r}")
    return reference.moe_align_block_size(topk_ids, block_size, num_experts)


def fused_moe(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, *, w1_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
              block_size: int = 128) -> torch.Tensor:
    """Routed SwiGLU experts: y[t] = sum_j topk_weights[t, j] * W2[e] (silu(W_gate[e] x[t]) * W_up[e] x[t]).

    x [T, H]; w1 [E, 2I, H] (gate rows, then up rows); w2 [E, H, I]; topk_weights, topk_ids [T, k] with
    e = topk_ids[t, j] in [0, E) (not checked) -> y [T, H] in x.dtype.
    Plain: w1 and w2 in x.dtype. FP8 (w8a8): w1, w2 float8_e4m3fn with float32 w1_scale [E, ceil(2I / bs),
    ceil(H / bs)] and w2_scale [E, ceil(H / bs), ceil(I / bs)] (`weight_quant` of the stacked weights);
    activations are quantized per token in 1 x block_size tiles on the way.
    """
    _check_tensor(x, "x", _FLOATS, min_dim=2, nonempty=1)
    fp8 = isinstance(w1, torch.Tensor) and w1.dtype == FP8
    if fp8 and (w1_scale is None or w2_scale is None):
        raise ValueError("float8_e4m3fn weights need both w1_scale and w2_scale")
    if not fp8 and (w1_scale is not None or w2_scale is not None):
        raise ValueError("w1_scale and w2_scale are for float8_e4m3fn weights; w1 is not FP8")
    w_dtypes = (FP8,) if fp8 else (x.dtype,)
    _check_tensor(w1, "w1", w_dtypes, min_dim=3)
    _check_tensor(w2, "w2", w_dtypes, min_dim=3)
    _check_tensor(topk_weights, "topk_weights", _FLOATS, min_dim=2, nonempty=1)
    _check_tensor(topk_ids, "topk_ids", (torch.int32, torch.int64), min_dim=2, nonempty=1)
    _check_block(block_size)
    if x.dim() != 2 or w1.dim() != 3 or w1.shape[1] % 2:
        raise ValueError(f"x must be [T, H] and w1 [E, 2I, H], got {tuple(x.shape)} and {tuple(w1.shape)}")
    (T, H), (E, two_i) = x.shape, w1.shape[:2]
    _check_shape(w1, "w1", (E, two_i, H), "[E, 2I, H] with H from x")
    _check_shape(w2, "w2", (E, H, two_i // 2), "[E, H, I] with E, I from w1")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != T:
        raise ValueError(f"topk_ids must be [T, k] with T = {T}, got {tuple(topk_ids.shape)}")
    _check_shape(topk_weights, "topk_weights", tuple(topk_ids.shape), "same as topk_ids")
    tensors = dict(x=x, w1=w1, w2=w2, topk_weights=topk_weights, topk_ids=topk_ids)
    if fp8:
        for name, w, sc in (("w1_scale", w1, w1_scale), ("w2_scale", w2, w2_scale)):
            _check_tensor(sc, name, (torch.float32,), min_dim=3)
            _check_shape(sc, name, block_scale_shape(w.shape, block_size),
                         f"one scale per {block_size} x {block_size} block of each expert's weight")
        tensors.update(w1_scale=w1_scale, w2_scale=w2_scale)
    device = _check_devices(fp8=fp8, **tensors)
    return _impl("fused_moe", device)(x, w1, w2, topk_weights, topk_ids, w1_scale=w1_scale, w2_scale=w2_scale,
                              block_size=block_size)
