"""torch.compile as an option: `generate(..., compile=True)` for the decoding step, `TrainConfig.compile` for training.

Eager PyTorch runs one operator at a time; a decoding step of a small model is hundreds of small operators, each
paying Python and dispatch overhead that dwarfs its arithmetic. torch.compile traces the step once and inductor
fuses it into few kernels: C++ with OpenMP on a CPU (built by the system C++ compiler), Triton on a GPU. The first
call pays the compilation (about 80 s for the decoding step on the course CPU, less once inductor has its cache on
disk); shapes that change from call to call (the number of cached positions) are traced as symbols (dynamic=True),
so later steps reuse the same code.

Without a compiler the function runs eagerly, with a warning that says why: never an error.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable

import torch


class CompileNotice(UserWarning):
    """torch.compile could not be used; the function runs eagerly."""


def compiler_missing(device: torch.device) -> str | None:
    """Why inductor cannot build code for this device, or None when it can (as far as can be told beforehand)."""
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "Triton is not installed (inductor builds GPU code with it)"
        return None
    if device.type == "cpu":
        names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
        if not any(shutil.which(name) for name in names):
            return f"no C++ compiler on PATH ({', '.join(names)}): inductor builds CPU code with one"
        return None
    return f"inductor has no backend for {device.type} tensors"


class MaybeCompiled:
    """fn through torch.compile(dynamic=True) when a compiler is there, else fn itself. If compiling fails at the
    first call (compilation is lazy), a CompileNotice gives the reason and every call from then on runs eagerly."""

    def __init__(self, fn: Callable, device: torch.device, what: str):
        self.fn, self.what = fn, what
        missing = compiler_missing(torch.device(device))
        self.compiled = None if missing else torch.compile(fn, dynamic=True)
        self.tried = False
        if missing:
            warnings.warn(f"{what}: torch.compile is not available ({missing}); running eagerly", CompileNotice,
                          stacklevel=3)

    def __call__(self, *args, **kwargs):
        if self.compiled is None:
            return self.fn(*args, **kwargs)
        if self.tried:
            return self.compiled(*args, **kwargs)
        try:
            out = self.compiled(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - any failure to build means: run eagerly, and say so
            warnings.warn(f"{self.what}: torch.compile failed ({type(error).__name__}: {str(error)[:300]}); "
                          "running eagerly", CompileNotice, stacklevel=2)
            self.compiled = None
            return self.fn(*args, **kwargs)
        self.tried = True
        return out
