"""Whether the library runs its FP8 layers and MoE layers through the `kernels` package: one switch.

`kernels.backend()` decides *how* a kernel runs (compiled Triton on a GPU, Triton's interpreter on a CPU, or
plain PyTorch); this switch decides *whether* the library calls the kernels at all:

    mini_deepseek.set_kernels("auto")  # the default: the kernels when compiled Triton runs them and x is on the GPU
    mini_deepseek.set_kernels("on")    # always (on a CPU with Triton, interpreted: slow, but it steps through them)
    mini_deepseek.set_kernels("off")   # never: the grouped experts of moe.py, and `kernels.reference` for FP8 layers

"auto" leaves the interpreter out because it takes tens to hundreds of milliseconds per kernel call: right for
reading and testing the kernels, far too slow to train or generate on a laptop. Without the kernels, FP8 layers
still quantize their inputs and multiply in blocks: `kernels.reference` is the same arithmetic in plain PyTorch.
"""

from __future__ import annotations

import torch

import kernels

_MODES = ("auto", "on", "off")
_mode = "auto"


def set_kernels(mode: str) -> None:
    """"auto", "on" or "off": see the module docstring."""
    global _mode
    if mode not in _MODES:
        raise ValueError(f"set_kernels({mode!r}): choose one of {', '.join(map(repr, _MODES))}")
    _mode = mode


def use_kernels(x: torch.Tensor, fp8: bool = False) -> bool:
    """Whether an operation on x goes through `kernels` rather than plain PyTorch.

    In "auto", FP8 work (fp8=True) also needs FP8 tensor cores (compute capability 8.9+: Ada, Hopper): on an older
    GPU such as the A100 it runs the reference arithmetic instead of stopping at the kernels' error.
    """
    if _mode == "auto":  # CPU tensors first: on a CPU, "auto" never loads the kernels (nor imports Triton)
        if not x.is_cuda or kernels.backend() != "triton":
            return False
        return not fp8 or torch.cuda.get_device_capability(x.device) >= (8, 9)
    return _mode == "on"
