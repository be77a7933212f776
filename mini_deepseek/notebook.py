"""What every course notebook does first (print the versions, pick quick or full mode, seed everything) and the
small formatting helpers the notebooks share: Markdown tables, a line per training run, the run's own duration,
and the KV-cache calculator (ipywidgets when installed, a printed table otherwise).

Units shared by every notebook: memory in GB = 10^9 bytes (the unit GPU memory is sold in), and the KV cache priced
at LONG_CONTEXT tokens.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import random
import re
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from .config import ModelConfig

if TYPE_CHECKING:
    from .train import History, TrainConfig

GB = 1e9  # bytes in a GB; every notebook quotes memory in GB (decimal), as GPU datasheets do
LONG_CONTEXT = 128 * 1024  # tokens: the context DeepSeek-V3 was extended to (V3 report, section 4.3), for KV caches
# GPU memory from the vendors' datasheets, in GB.
GPUS_GB = {"H200 (141 GB)": 141, "H100 (80 GB)": 80, "A100 (80 GB)": 80, "A100 (40 GB)": 40, "L40S (48 GB)": 48,
           "RTX 4090 (24 GB)": 24, "laptop (16 GB)": 16}
CACHE_DTYPES = {"bfloat16 (2 bytes)": 2, "float32 (4 bytes)": 4, "FP8 (1 byte)": 1}

_started: float | None = None  # time.perf_counter() at the last setup(), for run_time()


def quick_mode() -> bool:
    """True when MINI_DEEPSEEK_QUICK is set to anything but "" or "0" (the test suite sets it to 1)."""
    return os.environ.get("MINI_DEEPSEEK_QUICK", "0") not in ("", "0")


def device_name() -> str:
    """The GPU's name, or "CPU (N cores)"."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"


def setup(seed: int = 0, threads: int | None = None) -> bool:
    """Print the version line and the mode, seed Python and torch, optionally fix torch's thread count, and start
    the clock that run_time() reads.

    Returns True in quick mode. The printed `mode: full` / `mode: quick` is how the test suite tells that a
    committed notebook holds full-mode outputs.
    """
    from . import __version__

    global _started
    _started = time.perf_counter()
    if threads is not None:
        torch.set_num_threads(threads)
    random.seed(seed)
    torch.manual_seed(seed)
    quick = quick_mode()
    print(f"python {platform.python_version()} | torch {torch.__version__} | mini_deepseek {__version__} | "
          f"{device_name()}")
    print(f"mode: {'quick' if quick else 'full'} (set MINI_DEEPSEEK_QUICK=1 for the quick mode the tests run)")
    return quick


def run_time() -> str:
    """One line: the mode, the time since setup() and where it ran; a notebook's last cell prints it."""
    if _started is None:
        raise RuntimeError("run_time() measures from setup(): call mini_deepseek.notebook.setup() first")
    seconds = time.perf_counter() - _started
    minutes, rest = divmod(round(seconds), 60)
    return (f"this run: {'quick' if quick_mode() else 'full'} mode, {minutes} min {rest:02d} s from setup() to here, "
            f"on {datetime.date.today().isoformat()}, {device_name()}, {torch.get_num_threads()} torch thread(s)")


# ----------------------------------------------------------------------------------------------------------------
# Tables
def md(text: str) -> None:
    """Show text as Markdown in a notebook (the tables and summaries the notebooks compute)."""
    from IPython.display import Markdown, display

    display(Markdown(text))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; cells are formatted with str()."""
    if any(len(row) != len(header) for row in rows):
        raise ValueError(f"every row needs {len(header)} cells (one per header), got {[len(r) for r in rows]}")
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def text_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """The same table as plain text with aligned columns, for print()."""
    cells = [list(map(str, header))] + [list(map(str, row)) for row in rows]
    if any(len(row) != len(header) for row in cells):
        raise ValueError(f"every row needs {len(header)} cells (one per header)")
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def visible_runs(text: str, min_run: int = 16) -> str:
    """text with every run of min_run or more spaces written as "<N spaces>": a small model's generation often
    gets stuck in indentation, and a printed run of a hundred blanks reads as nothing at all."""
    return re.sub(f" {{{min_run},}}", lambda run: f"<{len(run[0])} spaces>", text)


def training_summary(label: str, history: History, cfg: TrainConfig, seconds: float, since_step: int = 0) -> str:
    """One line per training run: steps, tokens, time, and the last training and validation losses.

    since_step: the step a resumed run started from (its history also holds the steps before, from the checkpoint).
    """
    steps = sum(1 for record in history.train if record["step"] > since_step)
    tokens = steps * cfg.batch_size * cfg.seq_len
    line = (f"{label}: {steps} steps, {tokens:,} tokens in {seconds:.1f} s "
            f"({tokens / max(seconds, 1e-9):,.0f} tokens/s); last step ({history.train[-1]['step']}) loss "
            f"{history.train[-1]['loss']:.3f}")
    if history.evals:
        line += f", val loss {history.evals[-1]['val_loss']:.3f} at step {history.evals[-1]['step']}"
    return line


# ----------------------------------------------------------------------------------------------------------------
# The KV-cache calculator of notebook 01
def attention_sizes(preset: str) -> dict[str, int]:
    """The sizes the KV-cache calculator needs, from one of the library's presets (GQA gets min(8, n_h/2) groups)."""
    cfg = ModelConfig.preset(preset)
    return dict(n_layers=cfg.n_layers, n_heads=cfg.n_heads, head_dim=cfg.qk_nope_head_dim,
                n_kv_heads=min(8, max(1, cfg.n_heads // 2)), kv_lora_rank=cfg.kv_lora_rank,
                rope_dim=cfg.qk_rope_head_dim)


def kv_cache_table(n_layers: int, n_heads: int, head_dim: int, n_kv_heads: int, kv_lora_rank: int, rope_dim: int,
                   batch: int, context: int, bytes_per_element: int, gpu_gb: float,
                   reserved_gb: float = 0.0) -> tuple[str, list[str], list[list[str]]]:
    """(caption, header, rows): the cache per sequence and per batch of MHA, GQA, MQA and MLA at these sizes, and
    how many sequences fit in the GPU memory left after reserved_gb. Elements per token come from
    ModelConfig.kv_cache_elements_per_token(); a size the config rejects raises its ValueError."""
    common = dict(n_layers=n_layers, n_dense_layers=n_layers, n_heads=n_heads, head_dim=head_dim,
                  kv_lora_rank=kv_lora_rank, qk_rope_head_dim=rope_dim)
    variants = {
        "MHA": ModelConfig(attn_type="mha", **common),
        f"GQA ({n_kv_heads} KV heads)": ModelConfig(attn_type="gqa", n_kv_heads=n_kv_heads, **common),
        "MQA": ModelConfig(attn_type="mqa", **common),
        "MLA (absorbed cache)": ModelConfig(attn_type="mla", mla_mode="absorb", **common),
        "MLA (naive cache)": ModelConfig(attn_type="mla", mla_mode="naive", qk_nope_head_dim=head_dim,
                                         v_head_dim=head_dim, **common),
    }
    free_gb = gpu_gb - reserved_gb
    caption = (f"batch {batch}, context {context:,} tokens, {bytes_per_element} byte(s) per element, "
               f"{free_gb:g} GB free for the cache (GB = 10^9 bytes)")
    header = ["variant", "elements per token", "GB per sequence", "GB for the batch", "fits the batch?",
              "sequences that fit"]
    rows = []
    for name, cfg in variants.items():
        elements = cfg.kv_cache_elements_per_token()
        per_sequence = context * elements * bytes_per_element / GB
        n_fit = math.floor(free_gb / per_sequence) if free_gb > 0 else 0
        rows.append([name, f"{elements:,}", f"{per_sequence:,.2f}", f"{batch * per_sequence:,.2f}",
                     "yes" if batch * per_sequence <= free_gb else "no", f"{n_fit:,}"])
    return caption, header, rows


def kv_cache_report(markdown: bool = True, **sizes: Any) -> str:
    """kv_cache_table(**sizes) as Markdown (markdown=True) or aligned text; an invalid size gives a message."""
    try:
        caption, header, rows = kv_cache_table(**sizes)
    except ValueError as error:
        return f"Cannot build these sizes: {error}"
    return caption + "\n\n" + (markdown_table(header, rows) if markdown else text_table(header, rows))


def kv_cache_calculator(preset: str = "v3", batch: int = 8, context: int = LONG_CONTEXT, bytes_per_element: int = 2,
                        gpu_gb: float = 141, reserved_gb: float = 0.0) -> None:
    """An interactive KV-cache calculator: pick a preset or type sizes, a batch, a context, a cache dtype, a GPU.

    Needs ipywidgets and a live kernel; a saved notebook shows the table for the starting values as text, and
    without ipywidgets the same table is printed.
    """
    start = dict(attention_sizes(preset), batch=batch, context=context, bytes_per_element=bytes_per_element,
                 gpu_gb=gpu_gb, reserved_gb=reserved_gb)
    text = kv_cache_report(markdown=False, **start)
    try:
        import ipywidgets as widgets
    except ImportError:
        print("ipywidgets is not installed, so here is the table for the starting values "
              "(pip install ipywidgets for the interactive calculator):\n")
        print(text)
        return
    from IPython.display import display

    style = {"description_width": "150px"}
    size_boxes = {key: widgets.BoundedIntText(value=start[key], min=1, max=1_000_000, description=key, style=style)
                  for key in attention_sizes(preset)}
    preset_box = widgets.Dropdown(options=["v3", "v2-lite", "small", "toy"], value=preset, description="preset",
                                  style=style)
    contexts = sorted({2**k for k in range(8, 18)} | {context, 163840})
    controls = dict(
        batch=widgets.BoundedIntText(value=batch, min=1, max=100_000, description="batch", style=style),
        context=widgets.SelectionSlider(options=contexts, value=context, description="context (tokens)", style=style),
        bytes_per_element=widgets.Dropdown(options=CACHE_DTYPES, value=bytes_per_element, description="cache dtype",
                                           style=style),
        gpu_gb=widgets.Dropdown(options=GPUS_GB, value=gpu_gb, description="GPU", style=style),
        reserved_gb=widgets.BoundedFloatText(value=reserved_gb, min=0, max=10_000, description="reserved (GB)",
                                             style=style),
    )

    def fill_from_preset(change: dict) -> None:
        for key, value in attention_sizes(change["new"]).items():
            size_boxes[key].value = value

    preset_box.observe(fill_from_preset, names="value")
    output = widgets.interactive_output(lambda **kw: md(kv_cache_report(**kw)), {**size_boxes, **controls})
    ui = widgets.VBox([widgets.HBox([widgets.VBox([preset_box, *size_boxes.values()]),
                                     widgets.VBox(list(controls.values()))]), output])
    # A saved notebook without the widget's state shows text/plain: the table for the starting values, not a repr.
    bundle = ui._repr_mimebundle_()
    bundle["text/plain"] = "KV-cache calculator (interactive in a live kernel); starting values:\n" + text
    display(bundle, raw=True)
