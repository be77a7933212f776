"""Figures of notebook 04 (FP8): bit layouts, the spacing of representable values, scaling grids and the tiling of
the FP8 GEMM kernel. Each function draws on a matplotlib Axes it is given (matplotlib is imported by the caller)."""

from __future__ import annotations

import torch

from .fp8_numerics import FORMATS, SCALINGS, FloatFormat, error_beside_outlier, representable_values
from .notebook import text_table

_FIELD_COLORS = {"sign": "#d62728", "exponent": "#1f77b4", "mantissa": "#2ca02c"}


def draw_bit_layouts(ax, names: tuple[str, ...] = ("FP32", "BF16", "E5M2", "E4M3")) -> None:
    """One row of boxes per format: sign, exponent and mantissa bits, drawn to scale (one box per bit)."""
    from matplotlib.patches import Rectangle

    for row, name in enumerate(names):
        fmt = FORMATS[name]
        y = len(names) - 1 - row
        fields = [("sign", 1), ("exponent", fmt.exponent_bits), ("mantissa", fmt.mantissa_bits)]
        x = 0
        for field, width in fields:
            for _ in range(width):
                ax.add_patch(Rectangle((x, y + 0.15), 1, 0.7, facecolor=_FIELD_COLORS[field], edgecolor="white",
                                       alpha=0.85))
                x += 1
        ax.text(-0.6, y + 0.5, name, ha="right", va="center", fontsize=11, fontweight="bold")
        ax.text(x + 0.6, y + 0.5, f"1 + {fmt.exponent_bits} + {fmt.mantissa_bits} bits, bias {fmt.bias}, max "
                f"{fmt.max:.4g}" + ("" if fmt.has_inf else ", no inf"), va="center", fontsize=9)
    for i, (field, color) in enumerate(_FIELD_COLORS.items()):
        ax.add_patch(Rectangle((i * 9, -1.0), 1, 0.5, facecolor=color))
        ax.text(i * 9 + 1.4, -0.75, field, va="center", fontsize=9)
    ax.set(xlim=(-6, 58), ylim=(-1.3, len(names) + 0.1))
    ax.axis("off")


def plot_spacing(ax, names: tuple[str, ...] = ("E4M3", "E5M2", "BF16")) -> None:
    """Gap to the next representable value, relative to the value, over the positive range of each format; the dashed
    line is FP32's 2^-23."""
    for name in names:
        fmt: FloatFormat = FORMATS[name]
        values = representable_values(fmt)[1:]  # positive values
        gaps = (values[1:] - values[:-1]) / values[:-1]
        ax.step(values[:-1], gaps, where="post", label=f"{name} ({fmt.min_subnormal:.2g} .. {fmt.max:.4g})")
    ax.axhline(2.0**-23, color="gray", ls="--", lw=1, label="FP32 (2^-23 for normal numbers)")
    ax.set(xscale="log", yscale="log", xlabel="value", ylabel="gap to the next value / value", xlim=(1e-6, 1e6),
           title="Spacing of representable values (BF16 and FP32 continue to 3e38)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)


def draw_scaling_grids(axes, rows: int = 256, cols: int = 512, block: int = 128) -> None:
    """Three panels: one scale per tensor, per 1 x block tile (per token), per block x block block."""
    from matplotlib.patches import Rectangle

    titles = ["per tensor: 1 scale", f"1 x {block} tiles: {rows * cols // block} scales",
              f"{block} x {block} blocks: {rows * cols // block**2} scales"]
    for panel, (ax, title) in enumerate(zip(axes, titles, strict=True)):
        ax.add_patch(Rectangle((0, 0), cols, rows, facecolor="#c6dbef", edgecolor="black"))
        if panel == 1:
            for r in range(0, rows, 8):  # every 8th token drawn, or the lines merge
                ax.plot([0, cols], [r, r], color="#08519c", lw=0.3)
            for c in range(0, cols, block):
                ax.plot([c, c], [0, rows], color="#08519c", lw=1.5)
            ax.add_patch(Rectangle((block, rows - 16), block, 8, facecolor="#e6550d"))  # one tile, drawn 8 rows high
        if panel == 2:
            for r in range(0, rows, block):
                ax.plot([0, cols], [r, r], color="#08519c", lw=1.5)
            for c in range(0, cols, block):
                ax.plot([c, c], [0, rows], color="#08519c", lw=1.5)
            ax.add_patch(Rectangle((block, 0), block, block, facecolor="#e6550d", alpha=0.8))
        ax.set(xlim=(-5, cols + 5), ylim=(-5, rows + 5), title=title, xlabel="features (K)", ylabel="tokens (M)")
        ax.invert_yaxis()
        ax.set_aspect("equal")


def draw_gemm_tiling(ax, M: int, N: int, K: int, block_m: int, block_n: int, block_k: int = 128) -> None:
    """A [M, K] and B [N, K] side by side with C [M, N]: the tiles program (0, 0) reads per K step and the one C tile it
    writes; the scale each step uses is marked on the operands' edges."""
    from matplotlib.patches import Rectangle

    gap = max(K, N) * 0.25
    layout = {f"A [{M}, {K}]\n1 x 128 scales": (0, M, K), f"B^T [{K}, {N}]\n128 x 128 scales": (K + gap, K, N),
              f"C [{M}, {N}]": (K + N + 2 * gap, M, N)}
    for label, (x0, height, width) in layout.items():
        ax.add_patch(Rectangle((x0, 0), width, height, facecolor="#f0f0f0", edgecolor="black"))
        ax.text(x0 + width / 2, height + 0.04 * max(M, K), label, ha="center", va="top", fontsize=9)
    n_steps = -(-K // block_k)
    cmap = torch.linspace(0.35, 0.95, n_steps).tolist()
    for step in range(n_steps):
        k0, width = step * block_k, min(block_k, K - step * block_k)
        color = (0.1, 0.3, cmap[step])
        ax.add_patch(Rectangle((k0, 0), width, min(block_m, M), facecolor=color, alpha=0.7))  # A tile
        ax.add_patch(Rectangle((K + gap, k0), min(block_n, N), width, facecolor=color, alpha=0.7))  # B tile
        ax.text(k0 + width / 2, min(block_m, M) / 2, f"k{step}", ha="center", va="center", color="white", fontsize=8)
    x_c = K + N + 2 * gap
    ax.add_patch(Rectangle((x_c, 0), min(block_n, N), min(block_m, M), facecolor="#e6550d", alpha=0.85))
    ax.text(x_c + min(block_n, N) / 2, min(block_m, M) / 2, "program\n(0, 0)", ha="center", va="center",
            color="white", fontsize=8)
    for c in range(block_n, N, block_n):
        ax.plot([x_c + c, x_c + c], [0, M], color="gray", lw=0.6)
    for r in range(block_m, M, block_m):
        ax.plot([x_c, x_c + N], [r, r], color="gray", lw=0.6)
    ax.set(xlim=(-gap * 0.3, x_c + N + gap * 0.3), ylim=(max(M, K) * 1.25, -0.05 * max(M, K)))
    ax.set_aspect("equal")
    ax.axis("off")


def outlier_table(t: torch.Tensor, factor: float, along: str, amax_floor: float) -> str:
    """Notebook 04's outlier explorer as text: for each scaling, the error of the elements beside t's largest
    channel or token once that one is `factor` times the median (fp8_numerics.error_beside_outlier)."""
    rows = []
    for scaling in SCALINGS:
        e = error_beside_outlier(t, factor, along, scaling, amax_floor)
        rows.append([scaling, f"{e.median_element:.2%}", f"{e.relative:.2%}", f"{e.underflow:.2%}"])
    return text_table(["scaling", "median element error", "relative error", "flushed to zero"], rows)
