"""Reference answers to exercises/ex06_grpo.py (the docstrings there are the specification)."""

import re

import torch

from mini_deepseek.data import NUMERAL, numeral_language, parse_number


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(r - group mean) / (group sample std + eps), rewards [n_prompts, G] with G >= 2."""
    if rewards.shape[-1] < 2:
        raise ValueError(f"need at least 2 samples per group, got G = {rewards.shape[-1]}")
    centered = rewards - rewards.mean(dim=-1, keepdim=True)
    return centered / (rewards.std(dim=-1, keepdim=True, correction=1) + eps)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """exp(x) - x - 1 with x = ref_logp - logp."""
    x = ref_logp - logp
    return x.exp() - x - 1


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, clip_eps: float = 0.2, beta: float = 0.04) -> torch.Tensor:
    """Minus the mean over completions of the masked token mean of the clipped surrogate minus beta * k3."""
    keep = mask.bool()
    logp, old_logp, ref_logp = (torch.where(keep, t, torch.zeros_like(t)) for t in (logp, old_logp, ref_logp))
    ratio = (logp - old_logp).exp()
    A = advantages.unsqueeze(1)  # [N, 1]
    surrogate = torch.minimum(ratio * A, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * A)
    term = torch.where(keep, surrogate - beta * kl_k3(logp, ref_logp), torch.zeros_like(surrogate))
    per_completion = term.sum(dim=1) / keep.sum(dim=1).clamp(min=1)
    return -per_completion.mean()


def accuracy_reward(completion: str, answer: int) -> float:
    """1.0 when the first <answer> block parses to answer."""
    found = re.search(r"<answer>(.*?)</answer>", completion, flags=re.DOTALL)
    if found is None:
        return 0.0
    return float(parse_number(found.group(1)) == answer)


def format_reward(completion: str) -> float:
    """1.0 for exactly <think>non-empty</think><answer>non-empty</answer>, whitespace aside."""
    found = re.fullmatch(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", completion, flags=re.DOTALL)
    if found is None:
        return 0.0
    for block in found.groups():
        if not block.strip() or re.search(r"</?(think|answer)>", block):
            return 0.0
    return 1.0


def language_consistency_reward(completion: str, language: str) -> float:
    """Share of the numerals in the first think block written in `language`."""
    if language not in ("digits", "words"):
        raise ValueError(f"language must be 'digits' or 'words', got {language!r}")
    found = re.search(r"<think>(.*?)</think>", completion, flags=re.DOTALL)
    numerals = NUMERAL.findall(found.group(1)) if found else []
    if not numerals:
        return 0.0
    return sum(1 for n in numerals if numeral_language(n) == language) / len(numerals)
