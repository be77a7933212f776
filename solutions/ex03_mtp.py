"""Reference answers to exercises/ex03_mtp.py (the docstrings there are the specification)."""

import torch
import torch.nn.functional as F

from mini_deepseek.mtp import MTPModule


def mtp_combine(module: MTPModule, h_prev: torch.Tensor, emb_next: torch.Tensor) -> torch.Tensor:
    """eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)]), embedding first as the published weights expect."""
    both = torch.cat([module.enorm(emb_next), module.hnorm(h_prev)], dim=-1)  # [B, n, 2*dim]
    return module.eh_proj(both)  # [B, n, dim]


def mtp_loss(mtp_logits: list[torch.Tensor], targets: torch.Tensor, weight: float) -> torch.Tensor | None:
    """weight * mean over the depths with targets of CE(depth k logits, targets[:, k:])."""
    losses = []
    for k, logits in enumerate(mtp_logits, start=1):
        shifted = targets[:, k:]  # [B, T-k]: position i of depth k predicts token i + k + 1 = targets[:, i + k]
        if not bool((shifted != -100).any()):
            continue
        losses.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=-100))
    if not losses:
        return None
    return weight * torch.stack(losses).mean()


def greedy_accept(target_logits: torch.Tensor, drafts: torch.Tensor) -> tuple[int, int]:
    """(leading drafts equal to the argmax, the argmax after them)."""
    target = target_logits.argmax(dim=-1)  # [g+1]
    n = 0
    while n < len(drafts) and drafts[n] == target[n]:
        n += 1
    return n, int(target[n])


def sampled_accept(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor,
                   generator: torch.Generator | None = None) -> tuple[int, int]:
    """Accept d_j with probability min(1, p/q); at the first rejection sample max(0, p - q); else sample p_g."""
    for j, d in enumerate(drafts.tolist()):
        u = torch.rand((), generator=generator)
        if u < p[j, d] / q[j, d]:
            continue
        residual = (p[j] - q[j]).clamp(min=0)
        return j, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
    return len(drafts), int(torch.multinomial(p[-1], 1, generator=generator))
