"""Figures of notebook 03 (multi-token prediction and speculative decoding), drawn from code with the course's
FlowDiagram (plots.py): DeepSeek-V3's chain of MTP modules, Gloeckle et al.'s parallel heads, one round of draft
and verify, what each prediction reads, and the experiments' charts."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .plots import FlowDiagram


def mtp_chain_diagram(D: int = 2, n_tokens: int = 4) -> Figure:
    """DeepSeek-V3's sequential MTP (its Figure 3) on inputs t_1..t_n: the main model predicts t_{i+1}; module k
    reads h^{k-1}_i and the embedding of t_{i+k} and predicts t_{i+k+1}; embedding and output head are shared."""
    fig, ax = plt.subplots(figsize=(4.3 * (D + 1), 6.8))
    ax.set(xlim=(0, 1), ylim=(0, 1))
    g = FlowDiagram(ax, fontsize=8.5)
    width = 1 / (D + 1)
    for k in range(D + 1):
        x = (k + 0.5) * width
        inputs = " ".join(f"$t_{{{i + k}}}$" for i in range(1, n_tokens + 1))
        targets = " ".join(f"$t_{{{i + k + 1}}}$" for i in range(1, n_tokens + 1))
        g.note(x, 0.985, "main model" if k == 0 else f"MTP module {k}", fontweight="bold", va="top")
        g.box(f"in{k}", x, 0.03, f"tokens {inputs}")
        g.box(f"emb{k}", x, 0.12, "Embedding (shared)", "weight")
        g.box(f"head{k}", x, 0.80, "Output head (shared)", "weight")
        g.box(f"out{k}", x, 0.90, f"predicts {targets}\n" + ("$L_{main}$" if k == 0 else f"$L^{k}_{{MTP}}$"))
        g.arrow(f"in{k}", f"emb{k}", "")
        if k == 0:
            g.box("trunk", x, 0.42, "transformer blocks x L\n(MLA + dense or MoE FFN)", "weight")
            g.box("norm0", x, 0.66, "RMSNorm (final)  ->  $h^0_i$", "op")
            g.arrow("emb0", "trunk", "")
            g.arrow("trunk", "norm0", "")
        else:
            g.box(f"hnorm{k}", x - 0.22 * width, 0.27, f"RMSNorm\n$h^{{{k - 1}}}_i$", "op")
            g.box(f"enorm{k}", x + 0.22 * width, 0.27, f"RMSNorm\nEmb($t_{{i+{k}}}$)", "op")
            g.box(f"cat{k}", x, 0.38, "concatenate [embedding ; hidden]", "op")
            g.box(f"proj{k}", x, 0.465, f"$M_{k}$ (eh_proj)", "weight")
            g.box(f"trm{k}", x, 0.56, f"one transformer block TRM$_{k}$", "weight")
            g.box(f"norm{k}", x, 0.66, f"RMSNorm (shared_head.norm)  ->  $h^{k}_i$", "op")
            g.arrow(f"emb{k}", f"enorm{k}", "")
            g.arrow(f"hnorm{k}", f"cat{k}", "")
            g.arrow(f"enorm{k}", f"cat{k}", "")
            g.arrow(f"cat{k}", f"proj{k}", "")
            g.arrow(f"proj{k}", f"trm{k}", "")
            g.arrow(f"trm{k}", f"norm{k}", "")
            # h^{k-1} runs from the previous column's last norm down the gap into this column's hnorm
            x_gap = k * width
            ax.annotate("", xy=(x_gap, 0.66), xycoords="data", xytext=(1.0, 0.5), textcoords=g.boxes[f"norm{k - 1}"],
                        arrowprops=dict(arrowstyle="-", color="#990000", lw=1.1, shrinkA=0, shrinkB=0))
            ax.plot([x_gap, x_gap], [0.66, 0.27], color="#990000", lw=1.1, zorder=1)
            ax.annotate("", xy=(0.0, 0.5), xycoords=g.boxes[f"hnorm{k}"], xytext=(x_gap, 0.27), textcoords="data",
                        arrowprops=dict(arrowstyle="-|>", color="#990000", lw=1.1, shrinkA=0, shrinkB=1))
            g.note(x_gap + 0.006, 0.47, f"$h^{{{k - 1}}}$", color="#990000", ha="left", rotation=90)
        g.arrow(f"norm{k}", f"head{k}", "")
        g.arrow(f"head{k}", f"out{k}", "")
    fig.suptitle("DeepSeek-V3's MTP: one module per extra depth, each reading the depth before it and one more "
                 "true token", y=0.995)
    fig.tight_layout()
    return fig


def parallel_heads_diagram(n_heads: int = 3) -> Figure:
    """Gloeckle et al. (2024): n independent heads on one shared trunk state z_t, head k predicting t_{t+k}."""
    fig, ax = plt.subplots(figsize=(10, 4.2))
    ax.set(xlim=(0, 1), ylim=(0, 1))
    g = FlowDiagram(ax)
    g.box("in", 0.14, 0.08, "tokens $t_1 \\ldots t_t$")
    g.box("emb", 0.14, 0.25, "Embedding", "weight")
    g.box("trunk", 0.14, 0.5, "shared trunk\n(transformer blocks)\n$\\rightarrow z_t$", "weight")
    g.arrow("in", "emb", "")
    g.arrow("emb", "trunk", "")
    xs = [0.42 + 0.2 * k for k in range(n_heads)]
    ax.annotate("", xy=(0.28, 0.33), xycoords="data", xytext=(1.0, 0.3), textcoords=g.boxes["trunk"],
                arrowprops=dict(arrowstyle="-", color="#333333", lw=1.0, shrinkA=0, shrinkB=0))
    ax.plot([0.28, xs[-1]], [0.33, 0.33], color="#333333", lw=1.0)  # z_t, handed to every head
    g.note(0.3, 0.36, "$z_t$", ha="left")
    for k, x in enumerate(xs):
        g.box(f"f{k}", x, 0.5, f"head {k + 1}: one\ntransformer layer $f_{k + 1}$", "weight")
        g.box(f"u{k}", x, 0.72, "unembedding\n(shared)", "weight")
        g.box(f"p{k}", x, 0.9, f"predicts $t_{{t+{k + 1}}}$")
        ax.annotate("", xy=(0.5, 0.0), xycoords=g.boxes[f"f{k}"], xytext=(x, 0.33), textcoords="data",
                    arrowprops=dict(arrowstyle="-|>", color="#333333", lw=1.0, shrinkA=0, shrinkB=1))
        g.arrow(f"f{k}", f"u{k}", "")
        g.arrow(f"u{k}", f"p{k}", "")
    g.note(0.62, 0.13, "every head reads the same $z_t$ and none sees the tokens in between:\n"
           "the prediction of $t_{t+2}$ cannot use the token $t_{t+1}$", color="#990000")
    fig.suptitle("Gloeckle et al. (2024): parallel heads on a shared trunk")
    fig.tight_layout()
    return fig


def draft_verify_diagram(n_draft: int = 2, accepted: int = 1) -> Figure:
    """One round of speculative decoding with the MTP modules: draft d_1..d_g (chained), verify [t_{n-1}, d_1..d_g]
    with one main-model forward, accept the leading drafts, then one token of the main model's own."""
    g_ = n_draft
    fig, ax = plt.subplots(figsize=(12, 5.8))
    ax.set(xlim=(0, 1), ylim=(0, 1))
    g = FlowDiagram(ax)
    step = 0.11
    x_of = lambda i: 0.26 + step * i  # noqa: E731  (column of token position n-3+i)
    committed = ["$t_{n-3}$", "$t_{n-2}$", "$t_{n-1}$"]
    y_draft, y_tok, y_main, y_p, y_acc, y_out = 0.08, 0.28, 0.47, 0.63, 0.76, 0.9
    for i, name in enumerate(committed):
        g.box(f"t{i}", x_of(i), y_tok, name)
    for k in range(1, g_ + 1):
        x = x_of(len(committed) + k - 1)
        g.box(f"mtp{k}", x, y_draft, f"MTP {k}", "moe")
        g.box(f"d{k}", x, y_tok, f"$d_{k}$", "op")
        g.arrow(f"mtp{k}", f"d{k}", "")
        if k > 1:
            g.arrow(f"mtp{k - 1}", f"mtp{k}", "")
    first = len(committed) - 1
    g.box("main", (x_of(first) + x_of(first + g_)) / 2, y_main,
          f"main model: ONE forward over {g_ + 1} positions, with its KV cache", "weight")
    for j in range(g_ + 1):
        source = f"t{first}" if j == 0 else f"d{j}"
        g.arrow(source, "main", "")
        g.box(f"p{j}", x_of(first + j), y_p, f"$p_{j + 1}$", "tensor")
        g.arrow("main", f"p{j}", "")
        if j < g_:
            ok = j < accepted
            mark = "accept" if ok else ("reject" if j == accepted else "not checked")
            g.note(x_of(first + j), y_acc, f"$d_{j + 1}$: {mark}", color="#2a7a2a" if ok else "#990000")
    emitted = [f"$d_{j + 1}$" for j in range(accepted)]
    emitted.append(f"bonus token ~ $p_{g_ + 1}$" if accepted == g_ else
                   f"~ norm(max(0, $p_{accepted + 1} - q_{accepted + 1}$))")
    for j, name in enumerate(emitted):
        g.box(f"e{j}", x_of(len(committed) + j) + (0.05 if j == len(emitted) - 1 else 0), y_out, name,
              "cache" if j < len(emitted) - 1 else "tensor")
    for y, label in ((y_draft, "1. draft (chained; each\nmodule has its KV cache)"), (y_tok, "tokens"),
                     (y_main, "2. verify"), (y_acc, "3. accept"), (y_out, "emitted")):
        g.note(0.15, y, label, ha="right")
    g.note(x_of(len(committed) + g_) + 0.08, 0.2,
           f"{accepted + 1} new token(s) for one main-model forward.\nCache entries written for rejected drafts lie "
           "after the last\naccepted position: the next round writes over them.", ha="left", fontsize=8.5)
    fig.suptitle("Speculative decoding with the MTP modules: draft, verify, accept")
    fig.tight_layout()
    return fig


def causal_reach_plot(reach: Sequence[torch.Tensor]) -> Figure:
    """mtp_experiments.causal_reach side by side: rows are positions i, columns the input token j that was changed;
    blue where the prediction moved, a red frame on the token the prediction is trained to match."""
    fig, axes = plt.subplots(1, len(reach), figsize=(3.8 * len(reach), 3.8), squeeze=False)
    for k, (ax, r) in enumerate(zip(axes[0], reach, strict=True)):
        ax.imshow(r.float().numpy(), cmap="Blues", vmin=0, vmax=1.3, aspect="auto")
        T = r.shape[1]
        title = "main model: predicts $t_{i+1}$" if k == 0 else f"MTP depth {k}: predicts $t_{{i+{k + 1}}}$"
        ax.set(title=title, xlabel="input token j changed", ylabel="position i", xticks=range(T),
               yticks=range(r.shape[0]))
        for i in range(r.shape[0]):
            if i + k + 1 < T:
                ax.add_patch(Rectangle((i + k + 1 - 0.5, i - 0.5), 1, 1, fill=False, ec="#cc0000", lw=1.2))
    fig.suptitle("what each prediction reads (blue) and the token it must predict (red frame)")
    fig.tight_layout()
    return fig


def depth_comparison_plot(val_losses: Mapping[int, Sequence[float]],
                          curves: Mapping[int, Sequence[tuple[Sequence[int], Sequence[float]]]],
                          seeds: Sequence[int], steps: int) -> Figure:
    """Left: final next-token validation loss per MTP depth D (dots: seeds; bar: mean ± std). Right: the next-token
    validation loss during training, one line per run."""
    fig, (ax_dots, ax_curve) = plt.subplots(1, 2, figsize=(13, 4.3))
    for i, (D, values) in enumerate(val_losses.items()):
        color = f"C{i}"
        mean = statistics.fmean(values)
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        ax_dots.scatter([D] * len(values), values, color=color, alpha=0.4)
        ax_dots.errorbar(D, mean, yerr=spread, fmt="o", ms=9, capsize=4, color=color,
                         label=f"D = {D}: {mean:.4f}" + (" (no MTP)" if D == 0 else ""))
        for j, (run_steps, losses) in enumerate(curves[D]):
            ax_curve.plot(run_steps, losses, "o-", color=color, alpha=0.8 if j == 0 else 0.35, ms=3,
                          label=f"D = {D}" if j == 0 else None)
    ax_dots.set(xlabel="MTP depth D", ylabel="next-token validation loss (nats/byte)", xticks=list(val_losses),
                title=f"after {steps} steps; dots: seeds {list(seeds)}, big: mean ± std")
    ax_dots.legend()
    ax_curve.set(xlabel="step", ylabel="next-token validation loss", title="during training")
    ax_curve.legend()
    fig.tight_layout()
    return fig


def speedup_plot(rows: Sequence[dict], paper_acceptance: tuple[float, float] = (0.85, 0.90),
                 paper_speedup: float = 1.8) -> Figure:
    """Left: acceptance of the first draft per run beside the V3 report's 85-90%. Right: measured speed-up over
    model.generate and tokens per forward, beside its 1.8x. rows: {"label", "acceptance", "speedup",
    "tokens_per_forward"}."""
    fig, (ax_acc, ax_speed) = plt.subplots(1, 2, figsize=(13, 4.2))
    labels = [r["label"] for r in rows]
    x = range(len(rows))
    ax_acc.bar(x, [r["acceptance"][0] for r in rows], color="C0", label="first draft (depth 1)")
    second = [r["acceptance"][1] if len(r["acceptance"]) > 1 else float("nan") for r in rows]
    ax_acc.scatter(x, second, color="C1", zorder=3, label="second draft (depth 2), given the first passed")
    ax_acc.axhspan(*paper_acceptance, color="C2", alpha=0.25, label="V3 report: 85-90% (second token)")
    ax_acc.set(ylim=(0, 1.05), ylabel="acceptance", title="acceptance per draft depth (greedy)")
    ax_acc.set_xticks(list(x), labels, rotation=15)
    ax_acc.legend(fontsize=8, loc="lower left")
    ax_speed.bar([i - 0.2 for i in x], [r["speedup"] for r in rows], width=0.4, color="C0",
                 label="measured tokens/s over model.generate")
    ax_speed.bar([i + 0.2 for i in x], [r["tokens_per_forward"] for r in rows], width=0.4, color="C1", alpha=0.6,
                 label="tokens per main-model forward")
    ax_speed.axhline(paper_speedup, color="C2", ls="--", label=f"V3 report: {paper_speedup}x tokens/s")
    ax_speed.axhline(1, color="k", lw=0.8)
    ax_speed.set(ylabel="x", title="speed-up on this CPU")
    ax_speed.set_xticks(list(x), labels, rotation=15)
    ax_speed.legend(fontsize=8)
    fig.tight_layout()
    return fig


def acceptance_temperature_plot(results: Mapping[str, Mapping[float, dict]]) -> Figure:
    """Acceptance per draft depth against the sampling temperature, one colour per kind of text; results from
    mtp_experiments.acceptance_by_temperature, keyed by kind."""
    fig, (ax_acc, ax_tpf) = plt.subplots(1, 2, figsize=(13, 4.2))
    for i, (kind, by_temperature) in enumerate(results.items()):
        temperatures = list(by_temperature)
        n_depths = len(next(iter(by_temperature.values()))["acceptance"])
        for k in range(n_depths):
            ax_acc.plot(temperatures, [by_temperature[t]["acceptance"][k] for t in temperatures],
                        "o-" if k == 0 else "s--", color=f"C{i}", label=f"{kind}, depth {k + 1}")
        ax_tpf.plot(temperatures, [by_temperature[t]["tokens_per_forward"] for t in temperatures], "o-",
                    color=f"C{i}", label=kind)
    ax_acc.set(xlabel="temperature (0 = greedy)", ylabel="acceptance", ylim=(0, 1.05),
               title="acceptance per draft depth")
    ax_acc.legend(fontsize=8)
    ax_tpf.set(xlabel="temperature (0 = greedy)", ylabel="new tokens per main-model forward",
               title="tokens per forward")
    ax_tpf.legend(fontsize=8)
    fig.tight_layout()
    return fig
