"""What every course notebook does first: print the versions, pick quick or full mode, seed everything."""

from __future__ import annotations

import os
import platform
import random

import torch


def quick_mode() -> bool:
    """True when MINI_DEEPSEEK_QUICK is set to anything but "" or "0" (the test suite sets it to 1)."""
    return os.environ.get("MINI_DEEPSEEK_QUICK", "0") not in ("", "0")


def setup(seed: int = 0, threads: int | None = None) -> bool:
    """Print the version line and the mode, seed Python and torch, optionally fix torch's thread count.

    Returns True in quick mode. The printed `mode: full` / `mode: quick` is how the test suite tells that a
    committed notebook holds full-mode outputs.
    """
    from . import __version__

    if threads is not None:
        torch.set_num_threads(threads)
    random.seed(seed)
    torch.manual_seed(seed)
    quick = quick_mode()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"python {platform.python_version()} | torch {torch.__version__} | mini_deepseek {__version__} | {device}")
    print(f"mode: {'quick' if quick else 'full'} (set MINI_DEEPSEEK_QUICK=1 for the quick mode the tests run)")
    return quick
