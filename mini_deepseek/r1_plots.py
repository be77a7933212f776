"""Figures and tables of notebook 06 (GRPO and the R1 recipe). matplotlib is imported inside each function, so the
library itself does not need it."""

from __future__ import annotations

import torch

from .grpo import group_advantages, kl_k3, per_token_objective
from .notebook import text_table
from .plots import smooth
from .train import History


def _box(ax, xy: tuple[float, float], text: str, color: str, width: float = 0.2, height: float = 0.16) -> None:
    from matplotlib.patches import FancyBboxPatch

    x, y = xy
    ax.add_patch(FancyBboxPatch((x - width / 2, y - height / 2), width, height, boxstyle="round,pad=0.01",
                                facecolor=color, edgecolor="0.3"))
    ax.text(x, y, text, ha="center", va="center", fontsize=8.5)


def _arrow(ax, start: tuple[float, float], end: tuple[float, float], label: str = "") -> None:
    ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle="->", color="0.25", lw=1.2))
    if label:
        ax.text((start[0] + end[0]) / 2, (start[1] + end[1]) / 2 + 0.045, label, ha="center", fontsize=7.5,
                color="0.25")


TRAINED, FROZEN, RULE = "#f6c89f", "#cfe2f3", "#d9ead3"  # box colors: trained model, frozen model, no model


# Each panel as data: boxes (center, text, color, width) and arrows (start, end, label).
_PANELS = {
    "PPO": ([((0.1, 0.5), "prompt q", "white", 0.14), ((0.33, 0.5), "policy\n(trained)", TRAINED, 0.2),
             ((0.58, 0.82), "reference\n(frozen)", FROZEN, 0.2), ((0.58, 0.5), "reward\n(rule or model)", RULE, 0.2),
             ((0.58, 0.18), "value model\n(trained)", TRAINED, 0.2),
             ((0.86, 0.5), "GAE advantage\nper token", "white", 0.22)],
            [((0.17, 0.5), (0.23, 0.5), ""), ((0.43, 0.55), (0.48, 0.78), "o"), ((0.43, 0.5), (0.48, 0.5), "o"),
             ((0.43, 0.45), (0.48, 0.22), "o"), ((0.68, 0.82), (0.8, 0.58), "KL in r"),
             ((0.68, 0.5), (0.75, 0.5), "r"), ((0.68, 0.18), (0.8, 0.42), "V")]),
    "GRPO (no value model)": (
        [((0.1, 0.5), "prompt q", "white", 0.14), ((0.33, 0.5), "policy\n(trained)", TRAINED, 0.2),
         ((0.58, 0.82), "reference\n(frozen)", FROZEN, 0.2), ((0.58, 0.42), "rule rewards\nr_1 .. r_G", RULE, 0.2),
         ((0.86, 0.42), "(r_i - mean)\n/ std", "white", 0.2)],
        [((0.17, 0.5), (0.23, 0.5), ""), ((0.43, 0.55), (0.48, 0.78), "o_1..o_G"),
         ((0.43, 0.45), (0.48, 0.42), "o_1..o_G"), ((0.68, 0.42), (0.76, 0.42), "")]),
}


def draw_ppo_vs_grpo(axes) -> None:
    """Two panels: PPO's models (policy, value model, reference; a reward) against GRPO's (policy, reference)."""
    for ax, (title, (boxes, arrows)) in zip(axes, _PANELS.items(), strict=True):
        ax.set(xlim=(0, 1), ylim=(0, 1), title=title)
        ax.axis("off")
        for center, text, color, width in boxes:
            _box(ax, center, text, color, width)
        for start, end, label in arrows:
            _arrow(ax, start, end, label)
    axes[1].text(0.62, 0.66, "KL (k3) in the loss", fontsize=7.5, color="0.25")


def plot_clipped_objective(axes, clip_eps: float = 0.2) -> None:
    """min(r A, clip(r, 1 - eps, 1 + eps) A) against the ratio r, for A = +1 and A = -1 (where the gradient stops)."""
    ratio = torch.linspace(0.4, 1.8, 281)
    for ax, adv in zip(axes, (1.0, -1.0), strict=True):
        unclipped = ratio * adv
        objective = torch.min(unclipped, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
        ax.plot(ratio, unclipped, "--", color="0.6", label="r A (unclipped)")
        ax.plot(ratio, objective, color="C3", lw=2, label="min(r A, clip(r) A)")
        flat = (ratio > 1 + clip_eps) if adv > 0 else (ratio < 1 - clip_eps)
        ax.fill_between(ratio, objective.min().item() - 0.1, objective.max().item() + 0.1, where=flat.numpy(),
                        color="C3", alpha=0.08, label="clipped: no gradient")
        for edge in (1 - clip_eps, 1 + clip_eps):
            ax.axvline(edge, color="0.8", lw=0.8)
        ax.set(xlabel="ratio r = pi_theta / pi_old", title=f"advantage A = {adv:+.0f}")
        ax.legend(fontsize=7.5, loc="upper left" if adv > 0 else "lower left")
    axes[0].set_ylabel("per-token objective")


def plot_kl_estimators(ax) -> None:
    """k1, k2 and k3 of KL(pi_theta || pi_ref) for one token, against pi_ref / pi_theta."""
    ratio = torch.linspace(0.05, 4.0, 400)  # pi_ref / pi_theta
    log_ratio = ratio.log()
    ax.plot(ratio, -log_ratio, label="k1 = -log(pi_ref / pi_theta)", color="0.6")
    ax.plot(ratio, 0.5 * log_ratio**2, label="k2 = (log ratio)^2 / 2", color="C0")
    ax.plot(ratio, kl_k3(torch.zeros_like(ratio), log_ratio), label="k3 = ratio - log ratio - 1", color="C3", lw=2)
    ax.axhline(0, color="k", lw=0.6)
    ax.set(xlabel="pi_ref / pi_theta for the sampled token", ylabel="estimate", ylim=(-1.5, 3),
           title="per-token KL estimators (unbiased: k1, k3; never negative: k2, k3)")
    ax.legend(fontsize=8)


# ----------------------------------------------------------------------------------------------------------------
# The GRPO group explorer: one group's rewards -> advantages -> the per-token objective against the ratio

GROUP_RATIOS = (0.5, 0.8, 1.0, 1.2, 1.5)  # ratios pi_theta / pi_old at which the explorer's table gives the objective


def parse_rewards(text: str) -> torch.Tensor:
    """The rewards of one group as a learner types them: '2, 2, 1, 0' -> tensor([2., 2., 1., 0.])."""
    try:
        values = [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"rewards {text!r}: type numbers separated by commas, e.g. '2, 2, 1, 0'") from None
    if not values:
        raise ValueError("no rewards typed: type the group's rewards separated by commas, e.g. '2, 2, 1, 0'")
    return torch.tensor(values)


def group_objective(rewards: torch.Tensor, ratios: torch.Tensor, clip_eps: float,
                    beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The advantages [G] of one group's rewards [G], and GRPO's per-token objective [G, R] of a token of each
    sample at each ratio r = pi_theta / pi_old of ratios [R]. The reference is taken equal to pi_old (as at the
    first update after sampling from the reference), so the KL term is k3 = 1/r + log r - 1."""
    advantages = group_advantages(rewards.float()[None])[0]  # [G]
    logp = ratios.log()[None].expand(len(rewards), -1)  # [G, R]: log r, with log pi_old = log pi_ref = 0
    zeros = torch.zeros_like(logp)
    return advantages, per_token_objective(logp, zeros, zeros, advantages, clip_eps, beta)


def _clipped_where(advantage: float, clip_eps: float) -> str:
    """Where the clip stops the ratio term's gradient for a token of this advantage."""
    if advantage > 0:
        return f"r > {1 + clip_eps:g}"
    return f"r < {1 - clip_eps:g}" if advantage < 0 else "nowhere (A = 0: only the KL term pulls)"


def group_table(rewards: torch.Tensor, clip_eps: float, beta: float, ratios: tuple[float, ...] = GROUP_RATIOS) -> str:
    """One row per sample of the group: reward, advantage, the per-token objective at each ratio, and where the
    clip stops the gradient: the printed form of the explorer."""
    advantages, objective = group_objective(rewards, torch.tensor(ratios), clip_eps, beta)
    rows = [(i + 1, f"{r:g}", f"{a:+.3f}", *(f"{o:+.3f}" for o in obj), _clipped_where(float(a), clip_eps))
            for i, (r, a, obj) in enumerate(zip(rewards.tolist(), advantages, objective, strict=True))]
    return text_table(["sample", "reward", "advantage", *(f"r = {x:g}" for x in ratios), "clipped where"], rows)


def plot_group_objective(axes, rewards: torch.Tensor, clip_eps: float, beta: float) -> None:
    """Left: each sample's reward and group-normalized advantage. Right: the per-token objective against the
    ratio, one curve per distinct advantage, the clipped (gradient-free) range of each shaded."""
    ratios = torch.linspace(0.4, 1.8, 281)
    advantages, objective = group_objective(rewards, ratios, clip_eps, beta)
    samples = list(range(1, len(rewards) + 1))
    axes[0].bar([i - 0.2 for i in samples], rewards.tolist(), width=0.4, color="0.75", label="reward")
    axes[0].bar([i + 0.2 for i in samples], advantages.tolist(), width=0.4, color="C0",
                label="advantage (r - mean) / std")
    axes[0].axhline(0, color="k", lw=0.6)
    axes[0].set(xlabel="sample of the group", xticks=samples, title=f"one group of G = {len(rewards)}")
    axes[0].legend(fontsize=7.5)
    distinct = sorted({round(float(a), 4) for a in advantages}, reverse=True)
    for k, value in enumerate(distinct):
        rows = [i for i, a in enumerate(advantages) if round(float(a), 4) == value]
        axes[1].plot(ratios, objective[rows[0]], color=f"C{k + 1}", lw=2,
                     label=f"A = {value:+.2f} ({len(rows)} sample{'s' if len(rows) > 1 else ''})")
        flat = (ratios > 1 + clip_eps) if value > 0 else (ratios < 1 - clip_eps) if value < 0 else None
        if flat is not None:
            axes[1].fill_between(ratios, objective.min().item(), objective.max().item(), where=flat.numpy(),
                                 color=f"C{k + 1}", alpha=0.07)
    for edge in (1 - clip_eps, 1 + clip_eps):
        axes[1].axvline(edge, color="0.8", lw=0.8)
    axes[1].set(xlabel="ratio r = pi_theta / pi_old (pi_ref = pi_old)", ylabel="per-token objective",
                title=f"min(r A, clip(r, 1 ± {clip_eps:g}) A) - {beta:g} k3; shaded: clipped")
    axes[1].legend(fontsize=7.5)


def show_grpo_group(clip_eps: float, beta: float, rewards: str) -> None:
    """The explorer's output: the two panels of plot_group_objective and group_table, or what is wrong with the
    typed rewards."""
    import matplotlib.pyplot as plt

    try:
        values = parse_rewards(rewards)
        table = group_table(values, clip_eps, beta)
    except ValueError as error:
        print(f"not a group GRPO can use: {error}")
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.4))
    plot_group_objective(axes, values, clip_eps, beta)
    fig.tight_layout()
    plt.show()
    print(table)


def draw_r1_pipeline(ax, accuracies: dict[str, str] | None = None) -> None:
    """DeepSeek-R1's stages as boxes; accuracies: optional text under each stage (keys as the stage names)."""
    stages = [("base model", FROZEN), ("cold start\nSFT", TRAINED), ("reasoning RL\n(GRPO)", TRAINED),
              ("rejection sampling\n+ SFT", TRAINED), ("distillation\ninto a smaller model", TRAINED)]
    ax.set(xlim=(0, 1), ylim=(0, 1))
    ax.axis("off")
    xs = [0.09 + i * 0.205 for i in range(len(stages))]
    for x, (name, color) in zip(xs, stages, strict=True):
        _box(ax, (x, 0.6), name, color, width=0.17, height=0.3)
        if accuracies and name in accuracies:
            ax.text(x, 0.3, accuracies[name], ha="center", va="top", fontsize=8)
    for a, b in zip(xs, xs[1:], strict=False):
        _arrow(ax, (a + 0.087, 0.6), (b - 0.087, 0.6))
    ax.text(0.5, 0.97, "R1-Zero skips the cold start and the later stages: base model -> GRPO", ha="center",
            fontsize=8.5, color="0.3")


CURVES = (("reward", "reward (mean of the samples)"), ("val_accuracy", "held-out accuracy (greedy)"),
          ("kl", "KL to the reference (k3)"), ("length", "completion length (tokens)"),
          ("clip_fraction", "clip fraction"))


def plot_grpo_curves(axes, histories: dict[str, History | list[History]], window: int = 5) -> None:
    """One panel per curve of CURVES, one color per run (name -> History, or a list of one History per seed).
    With seeds, each seed is a thin line and their mean at each step a thick one."""
    for ax, (key, title) in zip(axes, CURVES, strict=True):
        for i, (name, runs) in enumerate(histories.items()):
            runs = runs if isinstance(runs, list) else [runs]
            series = [h.series(key) for h in runs]
            if not series[0][0]:
                continue
            steps = series[0][0]
            curves = [values if key.startswith("val_") else smooth(values, window) for _, values in series]
            style = "o-" if key.startswith("val_") else "-"
            if len(runs) > 1:
                for values in curves:
                    ax.plot(steps, values, style, color=f"C{i}", lw=0.7, alpha=0.35, ms=3)
            label = f"{name} (mean of {len(runs)} seeds)" if len(runs) > 1 else name
            ax.plot(steps, mean_over_seeds(curves), style, color=f"C{i}", lw=1.6, label=label)
        ax.set(title=title, xlabel="GRPO step")
    axes[0].legend(fontsize=8)


def mean_over_seeds(runs: list) -> list[float] | dict[str, float]:
    """Mean over seeds of equally long lists (one per seed) or of dicts with the same keys: [[1, 2], [3, 4]] ->
    [2.0, 3.0]; [{"a": 0.5}, {"a": 0.7}] -> {"a": 0.6}."""
    if not runs:
        raise ValueError("mean_over_seeds needs at least one seed's values")
    if isinstance(runs[0], dict):
        if any(set(r) != set(runs[0]) for r in runs):
            raise ValueError(f"the seeds' metrics have different keys: {[sorted(r) for r in runs]}")
        return {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}
    if len({len(r) for r in runs}) != 1:
        raise ValueError(f"the seeds' curves have different lengths: {[len(r) for r in runs]}")
    return [sum(values) / len(runs) for values in zip(*runs, strict=True)]


def format_seeds(values: list[float], percent: bool = True, digits: int = 1) -> str:
    """The mean over seeds, then each seed's value: [0.53, 0.505, 0.55] -> '52.8% (53.0 / 50.5 / 55.0)';
    percent=False for plain numbers: [27.5, 30.25] -> '28.9 (27.5 / 30.2)'; digits after the point:
    [0.0312, 0.0254], percent=False, digits=3 -> '0.028 (0.031 / 0.025)'. One seed: just its value."""
    scale, unit = (100, "%") if percent else (1, "")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean * scale:.{digits}f}{unit}"
    return f"{mean * scale:.{digits}f}{unit} ({' / '.join(f'{v * scale:.{digits}f}' for v in values)})"


def format_gb(n: float) -> str:
    """Bytes in GB (10^9 bytes, the course's unit): 1.34e13 -> '13,421 GB'; below 1 GB in MB."""
    return f"{n / 1e9:,.0f} GB" if n >= 1e9 else f"{n / 1e6:,.1f} MB"


def format_count(n: float) -> str:
    """A parameter count: 671026404352 -> '671.0B'."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:,.1f}{unit}"
    return str(int(n))


__all__ = ["CURVES", "GROUP_RATIOS", "draw_ppo_vs_grpo", "draw_r1_pipeline", "format_count", "format_gb",
           "format_seeds", "group_objective", "group_table", "mean_over_seeds", "parse_rewards",
           "plot_clipped_objective", "plot_group_objective", "plot_grpo_curves", "plot_kl_estimators",
           "show_grpo_group"]
