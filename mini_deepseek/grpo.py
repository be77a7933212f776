"""Group Relative Policy Optimization and the rule-based rewards of DeepSeek-R1, as pure functions.

GRPO (DeepSeekMath, arXiv 2402.03300, section 4.1, eq. 3) samples a group of G completions o_1..o_G for each
prompt q from the old policy and maximizes

    J = 1/G sum_i 1/|o_i| sum_t { min(r_it A_i, clip(r_it, 1 - eps, 1 + eps) A_i) - beta KL_it },
    r_it = pi_theta(o_it | q, o_i<t) / pi_old(o_it | q, o_i<t),

with no value model: the advantage of every token of o_i is its completion's reward normalized within the group,
A_i = (R_i - mean(R)) / std(R) (eq. 4 and section 4.1.2, outcome supervision), and the KL to a frozen reference
policy is Schulman's unbiased, always non-negative estimator k3 (eq. 4):

    KL_it = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1.

DeepSeek-R1 (arXiv 2501.12948, sections 2.2.2 and 2.3.2) trains with rule-based rewards only: accuracy (the final
answer, in a fixed format, checked by a rule), format (the reasoning inside <think> and </think>), and from R1 on
a language-consistency reward (the share of target-language words in the reasoning).

Tensors here are per token of N completions padded to length L: logp [N, L] holds log pi(o_it) of each sampled
token, mask [N, L] is 1 on a completion's tokens and 0 on padding.
"""

from __future__ import annotations

import re

import torch

from .data import NUMBER_LANGUAGES, NUMERAL, numeral_language, parse_number

LOSS_TYPES = ("grpo", "dapo")
REWARD_NAMES = ("accuracy", "format", "language")


# ----------------------------------------------------------------------------------------------------------------
# Advantages, KL, loss

def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """rewards [n_prompts, G] -> advantages [n_prompts, G]: (r - group mean) / (group std + eps).

    std is the sample standard deviation (torch.std, n - 1 in the denominator), as TRL computes it. A group whose
    rewards are all equal teaches nothing and gets zeros. A group of one sample has no std: G >= 2 is required.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [n_prompts, G], got shape {tuple(rewards.shape)}")
    if rewards.shape[1] < 2:
        raise ValueError(f"GRPO compares the samples of a group, so it needs G >= 2 samples per prompt; got "
                         f"G = {rewards.shape[1]} (the standard deviation of one reward is undefined)")
    if not rewards.is_floating_point() or not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards must be finite floating-point numbers")
    mean = rewards.mean(dim=1, keepdim=True)  # [n_prompts, 1]
    std = rewards.std(dim=1, keepdim=True)  # [n_prompts, 1], sample std (Bessel's correction)
    return (rewards - mean) / (std + eps)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi_theta || pi_ref) estimate k3 = exp(ref - logp) - (ref - logp) - 1 (Schulman, 2020).

    logp, ref_logp: log-probabilities of the sampled tokens under the policy and the reference, same shape. k3 is
    unbiased for samples from pi_theta and never negative (e^x >= 1 + x).
    """
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and ref_logp {tuple(ref_logp.shape)} must have the same shape")
    log_ratio = ref_logp - logp  # log(pi_ref / pi_theta)
    return torch.exp(log_ratio) - log_ratio - 1


def per_token_objective(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor,
                        advantages: torch.Tensor, clip_eps: float = 0.2, beta: float = 0.04) -> torch.Tensor:
    """GRPO's objective per token, before any averaging (DeepSeekMath eq. 3, inside the sums):
    min(r A, clip(r, 1 - eps, 1 + eps) A) - beta k3, with r = pi_theta / pi_old = exp(logp - old_logp).

    logp, old_logp, ref_logp [N, L]; advantages [N], shared by every token of a completion. Returns [N, L]. No
    masking here: grpo_loss zeroes the padding first and averages; notebook 06's explorer plots it against r.
    """
    return _clipped_objective(torch.exp(logp - old_logp), advantages, kl_k3(logp, ref_logp), clip_eps, beta)


def _clipped_objective(ratio: torch.Tensor, advantages: torch.Tensor, kl: torch.Tensor, clip_eps: float,
                       beta: float) -> torch.Tensor:
    """per_token_objective from the ratio [N, L], the advantages [N] and k3 [N, L], for callers that keep them."""
    adv = advantages[:, None].to(ratio.dtype)  # [N, 1]: every token of a completion shares its advantage
    surrogate = torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)  # [N, L]
    return surrogate - beta * kl


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, clip_eps: float = 0.2, beta: float = 0.04,
              loss_type: str = "grpo") -> tuple[torch.Tensor, dict[str, float]]:
    """The negated GRPO objective, and statistics of the step.

    logp [N, L] (with gradients), old_logp and ref_logp [N, L] (without), advantages [N] (one per completion),
    mask [N, L] (1 = a completion token, 0 = padding; values at padding are ignored, whatever they are).
    loss_type "grpo": DeepSeekMath's eq. 3, the token mean within each completion, then the mean over
    completions (an empty completion counts as 0). "dapo": the mean over all completion tokens of the batch
    (DAPO, arXiv 2503.14476, and TRL's default), so long completions weigh more.
    Returns (loss, {"kl": mean k3, "clip_fraction": share of tokens whose clipped term is the minimum, i.e.
    ratio < 1 - eps with A < 0 or ratio > 1 + eps with A > 0, "ratio": mean ratio}), the statistics over the
    unmasked tokens.
    """
    if logp.dim() != 2:
        raise ValueError(f"logp must be [N completions, L tokens], got shape {tuple(logp.shape)}")
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp), ("mask", mask)):
        if t.shape != logp.shape:
            raise ValueError(f"{name} {tuple(t.shape)} must have the shape of logp {tuple(logp.shape)}")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be [N] = [{logp.shape[0]}], one per completion, got "
                         f"{tuple(advantages.shape)}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type = {loss_type!r}: choose one of {LOSS_TYPES}")
    if clip_eps < 0 or beta < 0:
        raise ValueError(f"need clip_eps >= 0 and beta >= 0, got {clip_eps} and {beta}")
    keep = mask.bool()
    # Padding may hold anything (even inf): zero it before the arithmetic, so it cannot turn into NaN.
    logp, old_logp, ref_logp = (torch.where(keep, t, 0.0) for t in (logp, old_logp, ref_logp))
    ratio = torch.exp(logp - old_logp)  # [N, L], pi_theta / pi_old
    kl = kl_k3(logp, ref_logp)  # [N, L]
    per_token = torch.where(keep, _clipped_objective(ratio, advantages, kl, clip_eps, beta), 0.0)  # [N, L]
    n_tokens = keep.sum(dim=1)  # [N]
    if loss_type == "grpo":
        objective = (per_token.sum(dim=1) / n_tokens.clamp(min=1)).mean()
    else:
        objective = per_token.sum() / n_tokens.sum().clamp(min=1)

    with torch.no_grad():
        adv = advantages[:, None]  # [N, 1]
        clipped = ((ratio < 1 - clip_eps) & (adv < 0)) | ((ratio > 1 + clip_eps) & (adv > 0))  # [N, L]
        total = max(int(n_tokens.sum()), 1)
        stats = {"kl": float(torch.where(keep, kl, 0.0).sum()) / total,
                 "clip_fraction": float((clipped & keep).sum()) / total,
                 "ratio": float(torch.where(keep, ratio, 0.0).sum()) / total}
    return -objective, stats


# ----------------------------------------------------------------------------------------------------------------
# Rule-based rewards, on the decoded text of a completion

_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_THINK_THEN_ANSWER = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
_ANY_TAG = re.compile(r"</?(?:think|answer)>")


def reasoning_of(completion: str) -> str | None:
    """The text of the first <think>...</think> block, or None without one."""
    match = _THINK.search(completion)
    return match.group(1) if match else None


def accuracy_reward(completion: str, answer: int) -> float:
    """1.0 when the first <answer>...</answer> of the completion holds exactly the right number (digits or words,
    surrounding spaces allowed), else 0.0. No answer tag, no reward: the format is part of the rule."""
    match = _ANSWER.search(completion)
    return 1.0 if match is not None and parse_number(match.group(1)) == answer else 0.0


def format_reward(completion: str) -> float:
    """1.0 when the completion is "<think>reasoning</think><answer>answer</answer>" and nothing else (whitespace
    around the blocks allowed), both blocks non-empty and free of further tags, else 0.0."""
    match = _THINK_THEN_ANSWER.fullmatch(completion)
    if match is None:
        return 0.0
    reasoning, answer = match.groups()
    ok = reasoning.strip() and answer.strip() and not _ANY_TAG.search(reasoning + answer)
    return 1.0 if ok else 0.0


def language_consistency_reward(completion: str, language: str) -> float:
    """The share of numerals in the reasoning (the first <think>...</think>) written in `language` ("digits" or
    "words"): DeepSeek-R1's share of target-language words, with numerals as the words that differ here.
    No reasoning block, or no numeral in it, gives 0.0: dropping the reasoning must not earn the reward."""
    if language not in NUMBER_LANGUAGES:
        raise ValueError(f"unknown language {language!r}; choose one of {NUMBER_LANGUAGES}")
    reasoning = reasoning_of(completion)
    numerals = NUMERAL.findall(reasoning) if reasoning is not None else []
    if not numerals:
        return 0.0
    return sum(numeral_language(n) == language for n in numerals) / len(numerals)


def rule_rewards(completion: str, answer: int, language: str) -> dict[str, float]:
    """Every rule reward of one completion: {"accuracy", "format", "language"}."""
    return {"accuracy": accuracy_reward(completion, answer), "format": format_reward(completion),
            "language": language_consistency_reward(completion, language)}
