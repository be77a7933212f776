"""Figures for the course notebooks: data-flow diagrams drawn from a ModelConfig, and the notebooks' charts.

Every diagram takes its sizes from the config it is given, so the same call draws the toy and the 671B model.
matplotlib is a course dependency (pip install -e ".[course]"), not a library one: only this module imports it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.text import Text

from .config import ModelConfig
from .notebook import GB

if TYPE_CHECKING:
    from .train import History

# Box colours by role, the same in every diagram.
COLORS = {
    "tensor": "#f4f4f4",  # an activation or a cached tensor
    "weight": "#dbe9f6",  # a learned projection
    "op": "#fbe5c8",  # a parameter-free operation (norm, RoPE, softmax, concatenation)
    "cache": "#d9f0d3",  # what stays in memory between decoding steps
    "moe": "#ead7f0",  # experts
}


# ----------------------------------------------------------------------------------------------------------------
# A tiny flow-diagram helper: boxes placed by hand in data coordinates, arrows that start and end at the boxes'
# edges (matplotlib measures the boxes when it draws), and a tensor shape written beside every arrow.
@dataclass
class FlowDiagram:
    ax: Axes
    fontsize: float = 9.0

    def __post_init__(self) -> None:
        self.boxes: dict[str, Text] = {}
        self.ax.set_axis_off()

    def box(self, key: str, x: float, y: float, text: str, kind: str = "tensor", **text_kw) -> Text:
        """A rounded box centred at (x, y) holding text; kind picks its colour from COLORS."""
        style = dict(boxstyle="round,pad=0.35", facecolor=COLORS[kind], edgecolor="#555555", linewidth=0.8)
        self.boxes[key] = self.ax.text(x, y, text, ha="center", va="center", fontsize=self.fontsize, bbox=style,
                                       zorder=3, **text_kw)
        return self.boxes[key]

    def arrow(self, a: str, b: str, shape: str = "", side: str = "right", dashed: bool = False,
              label_at: float = 0.5, offset: float = 0.012, rad: float = 0.0) -> None:
        """An arrow from box a to box b, with `shape` (a tensor shape) written beside it. Drawn after the boxes
        (higher zorder): a box's outline, which the arrow is clipped to, is only placed when the box is drawn."""
        ta, tb = self.boxes[a], self.boxes[b]
        self.ax.annotate("", xy=(0.5, 0.5), xycoords=tb, xytext=(0.5, 0.5), textcoords=ta, zorder=3.5,
                         arrowprops=dict(arrowstyle="-|>", color="#333333", lw=1.0, ls="--" if dashed else "-",
                                         patchA=ta.get_bbox_patch(), patchB=tb.get_bbox_patch(), shrinkA=2,
                                         shrinkB=2, connectionstyle=f"arc3,rad={rad}"))
        if shape:
            (xa, ya), (xb, yb) = ta.get_position(), tb.get_position()
            x, y = xa + label_at * (xb - xa), ya + label_at * (yb - ya)
            dx = {"right": offset, "left": -offset, "center": 0.0}[side]
            self.ax.text(x + dx, y, shape, ha={"right": "left", "left": "right", "center": "center"}[side],
                         va="center", fontsize=self.fontsize - 1, color="#1f4e99", zorder=4,
                         bbox=dict(boxstyle="square,pad=0.1", facecolor="white", edgecolor="none", alpha=0.8))

    def note(self, x: float, y: float, text: str, **text_kw) -> Text:
        """Free text (titles, remarks) in the same coordinates."""
        kw = dict(ha="center", va="center", fontsize=self.fontsize, zorder=4) | text_kw
        return self.ax.text(x, y, text, **kw)


def _shape(*dims: int | str) -> str:
    return "[" + ", ".join(f"{d:,}" if isinstance(d, int) else d for d in dims) + "]"


# ----------------------------------------------------------------------------------------------------------------
def architecture_diagram(cfg: ModelConfig, seq_len: int = 8) -> Figure:
    """The data flow of a DeepSeek-V3 model for one sequence of seq_len tokens, with cfg's shapes on the arrows:
    embedding, the blocks (MLA, then a dense MLP or DeepSeekMoE), final norm and head, and the MTP modules."""
    T, d, V = seq_len, cfg.dim, cfg.vocab_size
    n_moe = cfg.n_layers - cfg.n_dense_layers
    fig, ax = plt.subplots(figsize=(13, 8.2))
    ax.set(xlim=(0, 1), ylim=(0, 1))
    g = FlowDiagram(ax)

    # main model, top to bottom
    x = 0.26
    g.note(x, 0.995, "main model", fontweight="bold", va="top")
    g.box("ids", x, 0.95, "token ids $t_1 \\ldots t_T$")
    g.box("emb", x, 0.86, f"Embedding  ({V:,} x {d:,})", "weight")
    g.box("n1", x, 0.735, "RMSNorm", "op")
    attn = "MLA" if cfg.attn_type == "mla" else cfg.attn_type.upper()
    g.box("attn", x, 0.65, f"{attn}: {cfg.n_heads} heads", "weight")
    g.box("add1", x, 0.565, "+", "op")
    g.box("n2", x, 0.475, "RMSNorm", "op")
    g.box("ffn", x, 0.37, _ffn_text(cfg), "moe" if n_moe else "weight")
    g.box("add2", x, 0.265, "+", "op")
    g.box("norm", x, 0.165, "RMSNorm", "op")
    g.box("head", x, 0.085, f"Output head  ({d:,} x {V:,})", "weight")
    g.box("logits", x, 0.01, "logits: next token $t_{i+1}$ at position $i$")
    g.arrow("ids", "emb", _shape(T))
    g.arrow("emb", "n1", _shape(T, d), label_at=0.3)
    g.arrow("n1", "attn", _shape(T, d))
    g.arrow("attn", "add1", _shape(T, d))
    g.arrow("add1", "n2", _shape(T, d), label_at=0.6)
    g.arrow("n2", "ffn", _shape(T, d), label_at=0.4)
    g.arrow("ffn", "add2", _shape(T, d), label_at=0.55)
    g.arrow("add2", "norm", _shape(T, d), side="left")
    g.arrow("norm", "head", _shape(T, d))
    g.arrow("head", "logits", _shape(T, V))
    # residual connections: from the block's input (and the input of its second half) around to the "+"
    for y_branch, end in ((0.775, "add1"), (0.522, "add2")):
        y_end = g.boxes[end].get_position()[1]
        ax.plot([x, x - 0.17, x - 0.17], [y_branch, y_branch, y_end], color="#888888", lw=1.0, zorder=1)
        ax.annotate("", xy=(0.0, 0.5), xycoords=g.boxes[end], xytext=(x - 0.17, y_end),
                    textcoords="data", zorder=1,
                    arrowprops=dict(arrowstyle="-|>", color="#888888", lw=1.0, shrinkA=0, shrinkB=1))
    g.note(x - 0.165, 0.60, "residual", rotation=90, fontsize=8, color="#777777", ha="left")
    ax.add_patch(plt.Rectangle((0.035, 0.235), 0.46, 0.555, fill=False, ls="--", lw=1.0, ec="#777777"))
    g.note(0.49, 0.785, f"block, x {cfg.n_layers}", ha="right", va="top", fontweight="bold")

    # MTP modules, to the right
    if cfg.n_mtp_modules:
        n = T - 1
        mx = 0.76
        depth = "D = 1" if cfg.n_mtp_modules == 1 else f"k = 1 .. D = {cfg.n_mtp_modules}"
        g.note(mx, 0.995, f"MTP module ({depth}): training signal; a draft at inference", fontweight="bold",
               va="top")
        g.box("h", 0.64, 0.86, "$h^{k-1}_i$: main model after its final\nRMSNorm (k = 1), else depth k-1\nafter its head RMSNorm")
        g.box("embk", 0.88, 0.86, "Embedding (shared)\nof token $t_{i+k}$", "weight")
        g.box("hnorm", 0.64, 0.745, "RMSNorm", "op")
        g.box("enorm", 0.88, 0.745, "RMSNorm", "op")
        g.box("cat", mx, 0.655, "concatenate [embedding ; hidden]", "op")
        g.box("eh", mx, 0.565, f"$M_k$ (eh_proj, {2 * d:,} x {d:,})", "weight")
        g.box("trm", mx, 0.455, "one transformer block $\\mathrm{TRM}_k$\n(MLA + FFN, as on the left)", "weight")
        g.box("mnorm", mx, 0.345, "RMSNorm", "op")
        g.box("mhead", mx, 0.255, "Output head (shared)", "weight")
        g.box("mlogits", mx, 0.165, "logits: token $t_{i+k+1}$ at position $i$\n"
              f"loss weight $\\lambda$ = {cfg.mtp_loss_weight:g}")
        g.arrow("h", "hnorm", _shape(f"T-k = {n}", d))
        g.arrow("embk", "enorm", _shape(f"T-k = {n}", d))
        g.arrow("hnorm", "cat", "", side="center")
        g.arrow("enorm", "cat", "", side="center")
        g.arrow("cat", "eh", _shape(n, 2 * d))
        g.arrow("eh", "trm", _shape(n, d))
        g.arrow("trm", "mnorm", _shape(n, d))
        g.arrow("mnorm", "mhead", _shape(n, d))
        g.arrow("mhead", "mlogits", _shape(n, V))
        # k = 1: h^0 is the main model's output after its final RMSNorm (what the published MTP weights expect;
        # see mtp.py), tapped between that norm and the head
        y_tap, x_turn = 0.125, 0.53
        ax.plot([x, x_turn, x_turn], [y_tap, y_tap, 0.86], color="#888888", lw=1.0, ls="--", zorder=1)
        ax.annotate("", xy=(0.0, 0.5), xycoords=g.boxes["h"], xytext=(x_turn, 0.86),
                    textcoords="data", zorder=1,
                    arrowprops=dict(arrowstyle="-|>", color="#888888", lw=1.0, ls="--", shrinkA=0, shrinkB=1))
        g.note(x_turn + 0.005, 0.5, "$h^0$ (k = 1)", rotation=90, fontsize=8, color="#555555", ha="left")
    g.note(0.99, 0.01, f"shapes for one sequence of T = {T} tokens (batch omitted); d = {d:,}, vocabulary {V:,}",
           ha="right", fontsize=8, color="#555555")
    fig.tight_layout()
    return fig


def mla_diagram(cfg: ModelConfig) -> Figure:
    """Multi-head latent attention for one new token t attending to S cached positions, with cfg's sizes:
    (1) the projections of h_t and what each mode caches, (2a) the naive path that decompresses keys and values
    per head, (2b) the absorbed path that moves the query into latent space and attends to the cache directly."""
    if cfg.attn_type != "mla":
        raise ValueError(f"mla_diagram needs attn_type='mla', got ModelConfig.attn_type = {cfg.attn_type!r}")
    H, d = cfg.n_heads, cfg.dim
    d_h, d_r, d_v, d_c = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    fig, axes = plt.subplots(1, 3, figsize=(17, 8.5), gridspec_kw=dict(wspace=0.02))
    for ax in axes:
        ax.set(xlim=(0, 1), ylim=(0, 1))
    a, b, c = (FlowDiagram(ax) for ax in axes)

    # (1) projections of the new token, shared by both modes
    a.note(0.5, 1.0, "1 · the new token $h_t$: queries, latent and rope key", fontweight="bold", va="top")
    a.box("h", 0.5, 0.92, "$h_t$")
    if cfg.q_lora_rank:
        a.box("qa", 0.27, 0.81, "q_a_proj  $W^{DQ}$", "weight")
        a.box("qn", 0.27, 0.70, "RMSNorm  ($c^Q_t$)", "op")
        a.box("qb", 0.27, 0.59, "q_b_proj  $W^{UQ}$; $W^{QR}$", "weight")
        a.arrow("h", "qa", _shape(d), side="left")
        a.arrow("qa", "qn", _shape(cfg.q_lora_rank), side="left")
        a.arrow("qn", "qb", _shape(cfg.q_lora_rank), side="left")
    else:  # V2-Lite: queries straight from h
        a.box("qb", 0.27, 0.70, "q_proj  $W^{UQ}$; $W^{QR}$\n(no query compression)", "weight")
        a.arrow("h", "qb", _shape(d), side="left")
    a.box("qc", 0.13, 0.44, "$q^C_t$", "tensor")
    a.box("qr", 0.38, 0.44, "RoPE: $q^R_t$", "op")
    a.arrow("qb", "qc", _shape(H, d_h), side="left")
    a.arrow("qb", "qr", _shape(H, d_r), side="right")
    a.box("kva", 0.73, 0.81, "kv_a_proj_with_mqa\n$W^{DKV}$; $W^{KR}$", "weight")
    a.box("ckv", 0.62, 0.62, "RMSNorm: $c^{KV}_t$", "op")
    a.box("kr", 0.87, 0.62, "RoPE: $k^R_t$\n(one for all heads)", "op")
    a.box("row", 0.73, 0.44, "absorbed cache row\n$[c^{KV}_t ; k^R_t]$", "cache")
    a.arrow("h", "kva", _shape(d))
    a.arrow("kva", "ckv", _shape(d_c), side="left")
    a.arrow("kva", "kr", _shape(d_r))
    a.arrow("ckv", "row", _shape(d_c), side="left")
    a.arrow("kr", "row", _shape(d_r))
    naive, absorbed, mha = H * (d_h + d_r + d_v), d_c + d_r, 2 * H * d_v
    a.note(0.5, 0.22, "cached per token and layer\n"
           f"naive: $k_t$, $v_t$ of every head = {H} x ({d_h} + {d_r} + {d_v}) = {naive:,}\n"
           f"absorbed: $[c^{{KV}}_t ; k^R_t]$ = {d_c} + {d_r} = {absorbed:,}\n"
           f"(MHA with {H} heads of {d_v}: 2 x {H} x {d_v} = {mha:,})", fontsize=9.5,
           bbox=dict(boxstyle="round,pad=0.5", facecolor=COLORS["cache"], edgecolor="#555555", linewidth=0.8))

    # (2a) naive: decompress per head, cache keys and values
    b.note(0.5, 1.0, "2a · naive: decompress keys and values per head", fontweight="bold", va="top")
    b.box("in", 0.5, 0.92, "$c^{KV}_t$, $k^R_t$ from 1")
    b.box("kvb", 0.5, 0.81, "kv_b_proj  $W^{UK}$; $W^{UV}$", "weight")
    b.box("kv", 0.5, 0.68, "$k_t = [k^C_t ; k^R_t]$ (rope key copied\ninto every head),  $v_t$", "op")
    b.box("cache", 0.5, 0.54, f"cache: keys {_shape(H, 'S', d_h + d_r)},\nvalues {_shape(H, 'S', d_v)}", "cache")
    b.box("q", 0.12, 0.40, "$q_t = [q^C_t ; q^R_t]$\nfrom 1")
    b.box("score", 0.5, 0.40, f"scores $q_t \\cdot k$  x softmax scale {cfg.softmax_scale:.4g}", "op")
    b.box("soft", 0.5, 0.27, "softmax over S, then $\\cdot v$", "op")
    b.box("o", 0.5, 0.15, "o_proj  $W^O$", "weight")
    b.box("u", 0.5, 0.04, "$u_t$")
    b.arrow("in", "kvb", _shape(d_c))
    b.arrow("kvb", "kv", _shape(H, f"{d_h} + {d_v}"))
    b.arrow("kv", "cache", f"append {_shape(H, d_h + d_r)}, {_shape(H, d_v)}")
    b.arrow("cache", "score", _shape(H, "S", d_h + d_r))
    b.arrow("q", "score", "")
    b.note(0.13, 0.345, _shape(H, d_h + d_r), fontsize=8, color="#1f4e99")
    b.arrow("score", "soft", _shape(H, "S"))
    b.arrow("soft", "o", _shape(H, d_v))
    b.arrow("o", "u", _shape(d))

    # (2b) absorbed: fold W^UK into the query and W^UV into the output, attend to the latent cache
    c.note(0.5, 1.0, "2b · absorbed: attend in latent space", fontweight="bold", va="top")
    c.box("qc", 0.25, 0.92, "$q^C_t$ from 1")
    c.box("wuk", 0.25, 0.80, "$W^{UK\\top}_i q^C_{t,i}$  per head\n(W_UK: " + _shape(H, d_h, d_c) + ")", "weight")
    c.box("qr", 0.62, 0.80, "$q^R_t$ from 1")
    c.box("query", 0.3, 0.65, "latent query\n$[W^{UK\\top} q^C_t ; q^R_t]$", "op")
    c.box("row", 0.82, 0.80, "row from 1", "cache")
    c.box("cache", 0.78, 0.62, f"latent cache {_shape('S', d_c + d_r)}\nshared by all heads", "cache")
    c.box("score", 0.5, 0.45, f"scores against the cache\nx softmax scale {cfg.softmax_scale:.4g}", "op")
    c.box("soft", 0.5, 0.30, f"softmax over S, then $\\cdot\\, c^{{KV}}$ (first {d_c} of each row)", "op")
    c.box("wuv", 0.5, 0.16, "$W^{UV}_i$ per head, then o_proj  $W^O$", "weight")
    c.box("u", 0.5, 0.04, "$u_t$ (the same as 2a)")
    c.arrow("qc", "wuk", _shape(H, d_h), side="left")
    c.arrow("wuk", "query", _shape(H, d_c), side="left")
    c.arrow("qr", "query", _shape(H, d_r))
    c.arrow("row", "cache", "append")
    c.arrow("query", "score", _shape(H, d_c + d_r), side="left")
    c.arrow("cache", "score", _shape("S", d_c + d_r))
    c.arrow("score", "soft", _shape(H, "S"))
    c.arrow("soft", "wuv", _shape(H, d_c))
    c.arrow("wuv", "u", f"{_shape(H, d_v)} -> {_shape(d)}")
    fig.suptitle(f"Multi-head latent attention, decoding token t against S cached positions: {H} heads, "
                 f"d = {d:,}, $d_c$ = {d_c}, $d_h$ = {d_h}, $d^R_h$ = {d_r}, $d_v$ = {d_v} (batch omitted)",
                 fontsize=11)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.92, bottom=0.01)
    return fig


def _ffn_text(cfg: ModelConfig) -> str:
    def layers(first: int, last: int) -> str:
        return f"layer {first}" if first == last else f"layers {first}..{last}"

    parts = []
    if cfg.n_dense_layers:
        parts.append(f"dense SwiGLU MLP (width {cfg.inter_dim:,}): {layers(0, cfg.n_dense_layers - 1)}")
    if cfg.n_layers > cfg.n_dense_layers:
        parts.append(f"DeepSeekMoE: {cfg.n_shared_experts} shared + {cfg.n_routed_experts} routed experts "
                     f"(width {cfg.moe_inter_dim:,}),\neach token to {cfg.n_activated_experts} routed: "
                     f"{layers(cfg.n_dense_layers, cfg.n_layers - 1)}")
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------------------------
# Charts
def smooth(values: Sequence[float], window: int = 25) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start): single training steps are noisy."""
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


class TrainingPlot:
    """Training curves redrawn in place while train() runs: pass the object as train(..., callback=plot).

    Left: next-token and MTP losses per step (faint) with their `window`-step means, and the validation loss.
    Right: MaxVio, the expert-load imbalance of the MoE layers (0 = balanced), when the model has MoE layers.
    """

    def __init__(self, window: int = 25, figsize: tuple[float, float] = (11, 3.6), show: bool = True):
        self.window = window
        self.fig, (self.ax_loss, self.ax_vio) = plt.subplots(1, 2, figsize=figsize)
        self.handle = None
        if show:
            from IPython.display import display

            plt.close(self.fig)  # shown through the display handle only, not again at the end of the cell
            self.handle = display(self.fig, display_id=True)

    def __call__(self, history: History) -> None:
        self.draw(history)
        if self.handle is not None:
            self.handle.update(self.fig)

    def draw(self, history: History) -> None:
        ax = self.ax_loss
        ax.clear()
        for key, label, color in (("lm_loss", "train: next token", "C0"), ("mtp_loss", "train: MTP module", "C1")):
            steps, values = history.series(key)
            if values:
                ax.plot(steps, values, color=color, lw=0.5, alpha=0.25)
                ax.plot(steps, smooth(values, self.window), color=color, lw=1.5,
                        label=f"{label} ({self.window}-step mean)")
        if history.evals:
            ax.plot(*history.series("val_lm_loss"), "o-", color="C2", label="val: next token")
        ax.set(xlabel="step", ylabel="cross-entropy (nats/byte)", title="loss")
        ax.legend()
        ax = self.ax_vio
        ax.clear()
        steps, values = history.series("maxvio")
        if values:
            ax.plot(steps, values, color="C3", lw=0.5, alpha=0.25)
            ax.plot(steps, smooth(values, self.window), color="C3", lw=1.5)
        ax.set(xlabel="step", ylabel="MaxVio", title="expert load imbalance (0 = balanced)")
        self.fig.tight_layout()


def kv_cache_memory_plot(cache_per_token: Mapping[str, int], bytes_per_element: int, gpu_gb: float, gpu_name: str,
                         max_context: int, batches: Sequence[int] = (1, 8, 64), title: str = "") -> Figure:
    """KV cache in GB against context length (1K .. max_context, log scales), one panel per batch size, one line
    per variant (elements per token over all layers), with the GPU's memory as a dashed line."""
    contexts = [1024 * 2 ** (k / 4) for k in range(int(4 * math.log2(max_context / 1024)) + 1)]
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4.2), sharey=True, squeeze=False)
    for ax, batch in zip(axes[0], batches, strict=True):
        for name, elements in cache_per_token.items():
            ax.plot(contexts, [batch * n * elements * bytes_per_element / GB for n in contexts], label=name, lw=2)
        ax.axhline(gpu_gb, color="k", ls="--", lw=1)
        ax.text(contexts[0], gpu_gb * 1.15, f"{gpu_name}: {gpu_gb:g} GB", fontsize=9)
        ticks = [c for c in (1024, 4096, 16384, 65536, 131072, 262144) if c <= max_context]
        ax.set(xscale="log", yscale="log", xlabel="context length (tokens)", title=f"batch {batch}")
        ax.set_xticks(ticks, [f"{c // 1024}K" for c in ticks])
        ax.minorticks_off()
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel(f"KV cache, GB ({bytes_per_element} bytes per element)")
    axes[0][0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def variant_comparison_plot(cache_per_token: Mapping[str, int], val_losses: Mapping[str, Sequence[float]],
                            curves: Mapping[str, Sequence[tuple[Sequence[int], Sequence[float]]]],
                            seeds: Sequence[int], steps: int, n_layers: int) -> Figure:
    """Left: final validation loss of each variant against its KV cache per token (small dots: seeds; big:
    mean and standard deviation). Right: validation loss during training, one line per run."""
    names = list(val_losses)
    colors = dict(zip(names, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    fig, (ax_scatter, ax_curve) = plt.subplots(1, 2, figsize=(13, 4.5))
    for name in names:
        values = list(val_losses[name])
        mean = statistics.fmean(values)
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        ax_scatter.scatter([cache_per_token[name]] * len(values), values, color=colors[name], alpha=0.4)
        ax_scatter.errorbar(cache_per_token[name], mean, yerr=spread, fmt="o", ms=9, capsize=4, color=colors[name],
                            label=f"{name}: {mean:.3f}")
        for i, (run_steps, losses) in enumerate(curves[name]):
            ax_curve.plot(run_steps, losses, color=colors[name], alpha=0.8 if i == 0 else 0.3,
                          label=name if i == 0 else None)
    ax_scatter.set(xscale="log", xlabel=f"KV cache elements per token ({n_layers} layers)",
                   ylabel="validation loss (nats/byte)",
                   title=f"after {steps} steps; small dots: seeds {list(seeds)}, big: mean ± std")
    ax_scatter.set_xticks([cache_per_token[n] for n in names], [str(cache_per_token[n]) for n in names])
    ax_scatter.minorticks_off()
    ax_scatter.legend()
    ax_curve.set(xlabel="step", ylabel="validation loss (nats/byte)", title="validation loss during training")
    ax_curve.legend()
    fig.tight_layout()
    return fig


def decode_latency_plot(latency_ms: Mapping[str, Mapping[int, float]], cache_per_token: Mapping[str, int],
                        title: str, ylabel: str = "ms per decoding step") -> Figure:
    """Milliseconds per decoding step against context length, one line per variant, labelled with its cache."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    contexts: list[int] = []
    for name, series in latency_ms.items():
        ax.plot(list(series), list(series.values()), "o-", label=f"{name}: {cache_per_token[name]:,} cached/token")
        contexts = sorted(set(contexts) | set(series))
    ax.set(xscale="log", xlabel="context length (tokens)", ylabel=ylabel, title=title)
    ax.set_xticks(contexts, [str(c) for c in contexts])
    ax.minorticks_off()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    fig.tight_layout()
    return fig
