"""MoE load balancing, measured and drawn: the tools of notebook 02.

- `simulate_routing`: routing alone (the library's `Gate`, no language model) on skewed router logits, balanced by
  the bias rule (gamma), the expert-level auxiliary loss (alpha) or both, with group-limited top-k.
- `evaluate_routing`: a trained model over a whole token split: its loss, and the expert load of every MoE layer
  split by data domain (code, arithmetic, prose), from which MaxVio_global follows.
- `gate_gradient_interference`: how the auxiliary loss's gradient on the gate weights compares with the
  language-model gradient (its size and direction).
- plots: the gate's decision for one token, MaxVio over training, loss against MaxVio, load heatmaps, load per
  domain, and the expert-parallel work and time per rank.
The plots need matplotlib (the `course` extra of pyproject.toml).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import matplotlib
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .moe import Gate
from .train import History, max_violation

# ----------------------------------------------------------------------------------------------------------------
# A routing-only simulation


@dataclass
class RoutingSimulation:
    maxvio: list[float]  # MaxVio_batch of every step
    load: torch.Tensor  # [E] tokens per expert in the last step
    bias: torch.Tensor  # [E] the routing bias at the end
    affinity_change: float  # mean |s_after - s_before| on fixed probe tokens: what balancing did to the router
    n_groups: int


def simulate_routing(n_experts: int = 16, top_k: int = 2, n_groups: int = 1, topk_groups: int = 1,
                     gamma: float = 0.0, alpha: float = 0.0, skew: float = 3.0, steps: int = 200,
                     tokens_per_step: int = 512, lr: float = 1.0, dim: int = 16, seed: int = 0) -> RoutingSimulation:
    """Route fresh random tokens for `steps` steps through a `Gate` whose logits favour low-numbered experts.

    Token features are [1, z] with z ~ N(0, I); the gate's weight on the constant feature is skew * (a line from
    +1 for expert 0 to -1 for the last), so without balancing the first experts take most tokens. Each step:
    route (bias and group limits as in the library), then nudge the bias by gamma (Gate.update_bias) and take one
    SGD step of size lr on the expert-level auxiliary loss alpha * sum_i f_i P_i (there is no language-model loss
    here, so the only force on the router weights is balancing).
    """
    cfg = ModelConfig(dim=dim, n_routed_experts=n_experts, n_activated_experts=top_k, n_expert_groups=n_groups,
                      n_limited_groups=topk_groups, bias_update_speed=gamma, aux_loss_alpha=alpha, seq_aux_alpha=0.0)
    generator = torch.Generator().manual_seed(seed)
    gate = Gate(cfg).train()
    with torch.no_grad():
        gate.weight.copy_(torch.randn(n_experts, dim, generator=generator) / math.sqrt(dim))
        gate.weight[:, 0] = skew * torch.linspace(1, -1, n_experts)

    def tokens(n: int) -> torch.Tensor:
        return torch.cat([torch.ones(n, 1), torch.randn(n, dim - 1, generator=generator)], dim=1)  # [n, dim]

    probe = tokens(1024)
    with torch.no_grad():
        before = torch.sigmoid(probe @ gate.weight.T)
    optimizer = torch.optim.SGD(gate.parameters(), lr=lr)
    maxvio = []
    for _ in range(steps):
        gate(tokens(tokens_per_step), seq_len=tokens_per_step)
        maxvio.append(max_violation(gate.last_load[None]))
        gate.update_bias()
        if alpha > 0:
            optimizer.zero_grad()
            gate.expert_balance_loss.backward()
            optimizer.step()
    with torch.no_grad():
        after = torch.sigmoid(probe @ gate.weight.T)
    return RoutingSimulation(maxvio=maxvio, load=gate.last_load.clone(), bias=gate.e_score_correction_bias.clone(),
                             affinity_change=(after - before).abs().mean().item(), n_groups=n_groups)


def plot_simulation(sim: RoutingSimulation, title: str = "") -> plt.Figure:
    """MaxVio over the simulated steps, and the last step's load per expert (groups shaded alternately)."""
    fig, (ax_vio, ax_load) = plt.subplots(1, 2, figsize=(12, 3.6))
    ax_vio.plot(sim.maxvio, lw=1.5)
    ax_vio.set(xlabel="step", ylabel="MaxVio_batch", ylim=(0, None), title="imbalance while routing")
    ax_vio.grid(alpha=0.3)
    n_experts = sim.load.numel()
    per_group = n_experts // sim.n_groups
    colors = [f"C{(e // per_group) % 2}" for e in range(n_experts)]
    ax_load.bar(range(n_experts), (sim.load / sim.load.mean()).tolist(), color=colors)
    ax_load.axhline(1, color="k", lw=1, ls="--")
    ax_load.set(xlabel="expert (colour: group)", ylabel="load / mean load", title="last step's load")
    fig.suptitle(title or f"final MaxVio {sim.maxvio[-1]:.2f}; mean |change of affinities| {sim.affinity_change:.3f}")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------------------------
# Measurements on a trained model


def _main_gates(model: nn.Module) -> list[Gate]:
    """The gates of the main model's MoE layers, first to last (MTP modules left out, as in expert_load)."""
    return [layer.mlp.gate for layer in model.layers if isinstance(getattr(layer.mlp, "gate", None), Gate)]


@dataclass
class RoutingEval:
    loss: float  # mean next-token loss over every position of the split (nats per token)
    load: torch.Tensor  # [n_moe_layers, n_domains, E] tokens per expert, by the domain of the routed token
    n_tokens: int

    @property
    def maxvio_global(self) -> float:
        """MaxVio over the whole split (loads summed over domains)."""
        return max_violation(self.load.sum(dim=1))


@torch.no_grad()
def evaluate_routing(model: nn.Module, tokens: torch.Tensor, domains: torch.Tensor, n_domains: int,
                     seq_len: int, batch_size: int = 64) -> RoutingEval:
    """Run model over tokens [n] cut into consecutive windows of seq_len (every position once, no overlap) and
    count, per MoE layer, which experts the tokens of each domain (domains [n], ints < n_domains) were sent to."""
    if tokens.shape != domains.shape or tokens.dim() != 1:
        raise ValueError(f"tokens {tuple(tokens.shape)} and domains {tuple(domains.shape)} must be equal 1-D shapes")
    n_windows = (tokens.numel() - 1) // seq_len
    if n_windows == 0:
        raise ValueError(f"{tokens.numel()} tokens are too few for one window of seq_len = {seq_len} (+1 target)")
    n = n_windows * seq_len
    inputs, targets = tokens[:n].view(n_windows, seq_len), tokens[1:n + 1].view(n_windows, seq_len)
    labels = domains[:n].view(n_windows, seq_len)
    gates = _main_gates(model)
    routed: list[torch.Tensor] = []
    hooks = [gate.register_forward_hook(lambda _m, _i, out: routed.append(out[1])) for gate in gates]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n_experts, k = gates[0].n_experts, gates[0].topk
    load = torch.zeros(len(gates), n_domains, n_experts, dtype=torch.long)
    loss_sum = 0.0
    try:
        for start in range(0, n_windows, batch_size):
            x, y = inputs[start:start + batch_size].to(device), targets[start:start + batch_size].to(device)
            routed.clear()
            logits = model(x)  # [b, T, vocab]; the hooks fill `routed` with one [b*T, k] per layer
            loss_sum += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            domain_of_slot = labels[start:start + batch_size].flatten().repeat_interleave(k)  # [b*T*k]
            for layer, indices in enumerate(routed):
                pair = domain_of_slot * n_experts + indices.flatten().cpu()  # (domain, expert) as one index
                load[layer] += torch.bincount(pair, minlength=n_domains * n_experts).view(n_domains, n_experts)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return RoutingEval(loss=loss_sum / n, load=load, n_tokens=n)


@torch.no_grad()
def capture_moe_inputs(model: nn.Module, layer: int, input_ids: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """What MoE layer model.layers[layer] receives (its normalized hidden states) for input_ids [B, T]: [B, T, dim]."""
    captured: list[torch.Tensor] = []
    hook = model.layers[layer].mlp.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            model(input_ids[start:start + batch_size])
    finally:
        hook.remove()
        model.train(was_training)
    return torch.cat(captured)


def dispatch_matrix(indices: torch.Tensor, world_size: int, n_experts: int) -> torch.Tensor:
    """indices [N, k] of N tokens split evenly over world_size ranks (rank r owns tokens r*N/W ..) -> [W, W]:
    token copies rank r sends to rank q, the owner of experts q*E/W .. (q+1)*E/W - 1, under expert parallelism."""
    N, k = indices.shape
    source = (torch.arange(N) * world_size // N).repeat_interleave(k)  # [N*k]
    destination = indices.flatten().cpu() // (n_experts // world_size)
    return torch.bincount(source * world_size + destination, minlength=world_size**2).view(world_size, world_size)


def gate_gradient_interference(model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor
                               ) -> list[dict[str, float]]:
    """Per MoE layer: |grad of the auxiliary loss| / |grad of the LM loss| on the gate weights, and their cosine.

    The model must have aux_loss_alpha > 0. A cosine near 0 means the balancing force pushes the router in a
    direction the language model does not care about; a negative one, against what the language model wants.
    """
    gates = _main_gates(model)
    if not gates or gates[0].aux_loss_alpha <= 0:
        raise ValueError("gate_gradient_interference needs an MoE model with aux_loss_alpha > 0")
    was_training = model.training
    model.train()
    logits = model(input_ids)
    lm = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    aux = [gate.expert_balance_loss for gate in gates]
    weights = [gate.weight for gate in gates]
    lm_grads = torch.autograd.grad(lm, weights, retain_graph=True)
    aux_grads = torch.autograd.grad(torch.stack(aux).sum(), weights)
    for gate in model.gates():
        gate.balance_loss = gate.expert_balance_loss = None
    model.train(was_training)
    return [{"ratio": (a.norm() / g.norm()).item(), "cosine": F.cosine_similarity(a.flatten(), g.flatten(), dim=0).item()}
            for a, g in zip(aux_grads, lm_grads, strict=True)]


# ----------------------------------------------------------------------------------------------------------------
# Plots


def plot_gate_decision(gate: Gate, x: torch.Tensor) -> plt.Figure:
    """Draw what the gate does with one token x [dim]: affinities, biased scores with the chosen experts (and the
    dropped groups), and the gating weights (computed from the unbiased affinities)."""
    with torch.no_grad():
        scores = torch.sigmoid(x.float() @ gate.weight.float().T)  # [E]
        bias = gate.e_score_correction_bias
        weights, indices = gate(x[None], seq_len=1)
        biased = scores + bias
        masked = gate._mask_groups(biased[None])[0] if gate.n_groups > 1 else biased
    E = scores.numel()
    chosen = set(indices[0].tolist())
    experts = range(E)
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.4))
    axes[0].bar(experts, scores.tolist(), color="C0")
    axes[0].set(title="1. affinities s_i = sigmoid(u · e_i)", xlabel="expert", ylim=(0, 1))
    colors = ["C3" if e in chosen else ("0.85" if torch.isinf(masked[e]) else "C1") for e in experts]
    axes[1].bar(experts, biased.tolist(), color=colors)
    axes[1].bar(experts, bias.tolist(), color="none", edgecolor="k", hatch="//", lw=0.5, label="bias b_i")
    axes[1].axhline(0, color="k", lw=0.8)
    axes[1].set_ylim(min(0.0, bias.min().item()) - 0.05, biased.max().item() * 1.3)  # room for the legend
    title = f"2. select top-{gate.topk} of s_i + b_i (red)"
    if gate.n_groups > 1:
        title += f";\ngrey: groups outside the best {gate.topk_groups} of {gate.n_groups}"
    axes[1].set(title=title, xlabel="expert")
    axes[1].legend(loc="upper left", fontsize=8)
    gating = torch.zeros(E)
    gating[indices[0]] = weights[0].float()
    axes[2].bar(experts, gating.tolist(), color=["C3" if e in chosen else "C0" for e in experts])
    axes[2].set(title="3. gating weights: the chosen s_i, normalized\n(the bias is not in them)", xlabel="expert")
    for ax in axes:
        ax.set_xticks(list(experts)[:: max(1, E // 16)])
    fig.tight_layout()
    return fig


def _method_colors(methods: list[str]) -> dict[str, str]:
    return {name: f"C{i % 10}" for i, name in enumerate(methods)}


def plot_maxvio_over_training(histories: dict[str, list[History]], smooth: int = 10) -> plt.Figure:
    """Left: MaxVio_batch per training step (a running mean over `smooth` steps, mean over seeds); right:
    MaxVio_global over the validation batches at every evaluation. One line per method."""
    fig, (ax_batch, ax_global) = plt.subplots(1, 2, figsize=(14, 4.5), sharey=True)
    colors = _method_colors(list(histories))
    for name, runs in histories.items():
        steps, _ = runs[0].series("maxvio")
        per_seed = torch.tensor([h.series("maxvio")[1] for h in runs])  # [seeds, steps]
        mean = per_seed.mean(dim=0)
        kernel = torch.ones(1, 1, smooth) / smooth
        smoothed = F.conv1d(F.pad(mean[None, None], (smooth - 1, 0), mode="replicate"), kernel)[0, 0]
        ax_batch.plot(steps, smoothed.tolist(), color=colors[name], label=name, lw=1.5)
        eval_steps, _ = runs[0].series("val_maxvio_global")
        glob = torch.tensor([h.series("val_maxvio_global")[1] for h in runs]).mean(dim=0)
        ax_global.plot(eval_steps, glob.tolist(), "o-", color=colors[name], label=name, lw=1.5, ms=4)
    ax_batch.set(xlabel="step", ylabel="MaxVio", ylim=(0, None), title=f"MaxVio_batch (running mean of {smooth} steps)")
    ax_global.set(xlabel="step", title="MaxVio_global over the validation batches")
    for ax in (ax_batch, ax_global):
        ax.grid(alpha=0.3)
    ax_global.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return fig


def plot_loss_against_maxvio(results: dict[str, list[tuple[float, float]]]) -> plt.Figure:
    """results: method -> [(MaxVio_global, validation loss) per seed]. Small dots: seeds; big: the mean."""
    fig, ax = plt.subplots(figsize=(9, 5.5))
    colors = _method_colors(list(results))
    for name, points in results.items():
        vio, loss = torch.tensor(points).T
        ax.scatter(vio.tolist(), loss.tolist(), color=colors[name], alpha=0.35, s=25)
        ax.errorbar(vio.mean().item(), loss.mean().item(), xerr=vio.std().item() if len(points) > 1 else None,
                    yerr=loss.std().item() if len(points) > 1 else None, fmt="o", ms=8, capsize=3,
                    color=colors[name], label=name)
    ax.set(xscale="log", xlabel="MaxVio_global over the validation split (log scale; lower = more balanced)",
           ylabel="validation loss (nats/byte)", title="quality against balance, per method (mean ± std over seeds)")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))  # 0.5, 1, 2 rather than 5x10^-1
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    lo, hi = ax.get_xlim()
    ax.set_xticks([t for t in (0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10) if lo <= t <= hi])
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return fig


def plot_load_heatmaps(histories: dict[str, History], bins: int = 40) -> plt.Figure:
    """One panel per (method, MoE layer): load / mean load of every expert (columns) over training (rows, steps
    averaged into `bins` bands). White is a fair share; red above, blue below."""
    methods = list(histories)
    first = torch.tensor(histories[methods[0]].train[0]["expert_load"])
    n_layers, n_experts = first.shape
    fig, axes = plt.subplots(len(methods), n_layers, figsize=(4.4 * n_layers + 1, 2.4 * len(methods)), squeeze=False,
                             sharex=True, layout="constrained")
    for row, name in enumerate(methods):
        loads = torch.tensor([r["expert_load"] for r in histories[name].train], dtype=torch.float)  # [S, L, E]
        steps = loads.shape[0]
        edges = torch.linspace(0, steps, min(bins, steps) + 1).long()
        banded = torch.stack([loads[a:b].mean(dim=0) for a, b in zip(edges[:-1], edges[1:], strict=True)])
        relative = banded / banded.mean(dim=-1, keepdim=True)  # [bins, L, E]
        for layer in range(n_layers):
            ax = axes[row, layer]
            image = ax.imshow(relative[:, layer].log2().clamp(-3, 3).numpy(), aspect="auto", cmap="RdBu_r",
                              vmin=-3, vmax=3, extent=(-0.5, n_experts - 0.5, steps, 0))
            ax.set(title=f"{name}: MoE layer {layer + 1}", xlabel="expert" if row == len(methods) - 1 else None,
                   ylabel="step" if layer == 0 else None)
    bar = fig.colorbar(image, ax=axes, shrink=0.8, ticks=[-3, -2, -1, 0, 1, 2, 3])
    bar.ax.set_yticklabels(["≤1/8", "1/4", "1/2", "1", "2", "4", "≥8"])
    bar.set_label("load / mean load")
    return fig


def plot_domain_load(loads: dict[str, torch.Tensor], domain_names: tuple[str, ...]) -> plt.Figure:
    """loads: method -> [n_moe_layers, n_domains, E] tokens. Each panel: the share of each domain's tokens that
    goes to each expert, relative to a uniform share (k/E): a specialised expert is red in one row only."""
    methods = list(loads)
    n_layers, n_domains, n_experts = loads[methods[0]].shape
    fig, axes = plt.subplots(len(methods), n_layers, figsize=(4.4 * n_layers + 1, 0.6 + 1.5 * len(methods)),
                             squeeze=False, sharex=True, layout="constrained")
    for row, name in enumerate(methods):
        share = loads[name].float() / loads[name].sum(dim=-1, keepdim=True)  # [L, D, E], rows sum to 1
        for layer in range(n_layers):
            ax = axes[row, layer]
            image = ax.imshow((share[layer] * n_experts).log2().clamp(-3, 3).numpy(), aspect="auto", cmap="RdBu_r",
                              vmin=-3, vmax=3)
            ax.set_yticks(range(n_domains), domain_names if layer == 0 else [""] * n_domains)
            ax.set(title=f"{name}: MoE layer {layer + 1}", xlabel="expert" if row == len(methods) - 1 else None)
    bar = fig.colorbar(image, ax=axes, shrink=0.8, ticks=[-3, -2, -1, 0, 1, 2, 3])
    bar.ax.set_yticklabels(["≤1/8", "1/4", "1/2", "1", "2", "4", "≥8"])
    bar.set_label("share / uniform share")
    return fig


def domain_specialisation(load: torch.Tensor) -> float:
    """How much the domain decides the expert, averaged over layers: the mean total-variation distance between
    each domain's distribution over experts and the distribution of all tokens (0: the domain does not matter;
    1: disjoint experts). load: [n_moe_layers, n_domains, E]."""
    load = load.float()
    per_domain = load / load.sum(dim=-1, keepdim=True).clamp_min(1)  # [L, D, E]; a domain with no tokens: zeros
    overall = load.sum(dim=1, keepdim=True) / load.sum(dim=(1, 2), keepdim=True)  # [L, 1, E]
    weight = load.sum(dim=-1) / load.sum(dim=(1, 2))[:, None]  # [L, D] each domain's share of the tokens (0 if none)
    tv = 0.5 * (per_domain - overall).abs().sum(dim=-1)  # [L, D]
    return (tv * weight).sum(dim=1).mean().item()


def plot_dispatch(matrices: dict[str, torch.Tensor]) -> plt.Figure:
    """matrices: label -> [W, W] token copies sent from rank (row) to rank (column). One heatmap per label."""
    fig, axes = plt.subplots(1, len(matrices), figsize=(4.6 * len(matrices), 3.8), squeeze=False)
    for ax, (label, matrix) in zip(axes[0], matrices.items(), strict=True):
        W = matrix.shape[0]
        ax.imshow(matrix.numpy(), cmap="Blues", vmin=0)
        for r in range(W):
            for q in range(W):
                ax.text(q, r, f"{int(matrix[r, q]):,}", ha="center", va="center", fontsize=9,
                        color="white" if matrix[r, q] > 0.6 * matrix.max() else "black")
        received = matrix.sum(dim=0)
        ax.set_xticks(range(W), [f"rank {q}\n← {int(received[q]):,}" for q in range(W)])
        ax.set_yticks(range(W), [f"rank {r}" for r in range(W)])
        ax.set(title=f"{label}\nbusiest rank receives {received.max() / received.float().mean():.2f}x the mean",
               xlabel="to (owner of the experts)", ylabel="from (owner of the tokens)")
    fig.tight_layout()
    return fig


def plot_expert_parallel(profiles: dict[str, list[dict]], title: str = "") -> plt.Figure:
    """profiles: label -> every rank's counters (ExpertParallelMoE.gather_stats, per forward call). Left: tokens
    received per rank; right: each rank's time in its experts and in the exchanges, per forward call."""
    labels = list(profiles)
    fig, (ax_tokens, ax_time) = plt.subplots(1, 2, figsize=(14, 0.6 + 0.45 * sum(len(p) for p in profiles.values())))
    y, ticks, names = 0, [], []
    for i, label in enumerate(labels):
        for stats in profiles[label]:
            calls = max(1, stats["calls"])
            ax_tokens.barh(y, stats["tokens"] / calls, color=f"C{i}")
            expert, exchange = stats["expert_seconds"] / calls * 1e3, stats["exchange_seconds"] / calls * 1e3
            ax_time.barh(y, expert, color=f"C{i}")
            ax_time.barh(y, exchange, left=expert, color=f"C{i}", alpha=0.35, hatch="//")
            ticks.append(y)
            names.append(f"{label}, rank {stats['rank']}")
            y += 1
        y += 0.6
    for ax in (ax_tokens, ax_time):
        ax.set_yticks(ticks, names if ax is ax_tokens else [""] * len(names))
        ax.invert_yaxis()
        ax.grid(alpha=0.3, axis="x")
    ax_tokens.set(xlabel="token copies received per forward (k per token)", title="work per rank")
    ax_time.set(xlabel="ms per forward: experts (solid) then exchanges, waiting included (hatched)",
                title="time per rank")
    fig.suptitle(title)
    fig.tight_layout()
    return fig
