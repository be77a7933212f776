"""Reference answers to exercises/ex02_balancing.py (the docstrings there are the specification)."""

import torch


def expert_balance_loss(scores: torch.Tensor, indices: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * sum_i f_i P_i over all tokens, f_i = E / (k N) * tokens routed to i, P_i = mean normalized affinity."""
    N, E = scores.shape
    k = indices.shape[1]
    counts = torch.bincount(indices.flatten(), minlength=E).to(scores.dtype)  # [E]
    f = counts * E / (k * N)
    P = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=0)  # [E]
    return alpha * (f * P).sum()


def sequence_balance_loss(scores: torch.Tensor, k: int, alpha: float) -> torch.Tensor:
    """The same sum within each sequence, with f from the top-k of the unbiased affinities; mean over sequences."""
    B, T, E = scores.shape
    chosen = torch.zeros_like(scores).scatter_(-1, scores.topk(k, dim=-1).indices, 1.0)  # [B, T, E]
    f = chosen.sum(dim=1) * E / (k * T)  # [B, E]
    P = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)  # [B, E]
    return alpha * (f * P).sum(dim=-1).mean()


def update_bias(bias: torch.Tensor, load: torch.Tensor, gamma: float) -> torch.Tensor:
    """b + gamma * sign(mean load - load): down when overloaded, up when underloaded."""
    load = load.float()
    return bias + gamma * torch.sign(load.mean() - load)


def group_limited_topk(scores: torch.Tensor, bias: torch.Tensor, k: int, n_groups: int, topk_groups: int
                       ) -> torch.Tensor:
    """Top-k of scores + bias among the experts of each token's topk_groups best groups (top-2 sums)."""
    biased = scores + bias  # [N, E]
    if n_groups > 1:
        N, E = biased.shape
        grouped = biased.view(N, n_groups, E // n_groups)  # [N, G, E/G]
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [N, G]
        keep = group_scores.topk(topk_groups, dim=-1).indices  # [N, topk_groups]
        dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)  # [N, G]
        biased = grouped.masked_fill(dropped[..., None], float("-inf")).view(N, E)
    return biased.topk(k, dim=-1).indices


def max_violation(load: torch.Tensor) -> torch.Tensor:
    """max over experts / mean over experts - 1, for every leading index."""
    load = load.float()
    return load.amax(dim=-1) / load.mean(dim=-1) - 1
