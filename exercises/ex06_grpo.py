"""Exercise set 06: GRPO's group-normalized advantages, the k3 KL estimator, the clipped loss with masking, and the
three rule rewards of DeepSeek-R1 (notebooks/06_grpo_r1.ipynb).

Replace each `raise NotImplementedError` with your implementation, then grade it in a notebook with
`check("group_advantages")` or from the shell with `make grade`. Reference answers: solutions/ex06_grpo.py.
Shapes use N completions (n_prompts groups of G), L token positions per completion.
"""

import re

import torch

from mini_deepseek.data import NUMERAL, numeral_language, parse_number


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantages (DeepSeekMath, section 4.1.2, outcome supervision): each reward normalized within its group.

    rewards: float [n_prompts, G], the rewards of the G completions sampled for each prompt.
    Returns float [n_prompts, G]: (r - mean of its group) / (std of its group + eps), where std is the *sample*
    standard deviation (divide by G - 1, as torch.std does by default and TRL computes it).
    A group whose rewards are all equal gets zeros. Raise ValueError when G < 2: one sample has no std.
    Example: rewards [[1, 0, 0, 1]] -> mean 0.5, sample std 0.5774 -> about [[0.866, -0.866, -0.866, 0.866]].
    """
    raise NotImplementedError("Exercise group_advantages: (r - group mean) / (group sample std + eps)")


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """The per-token KL penalty of GRPO (DeepSeekMath eq. 4): Schulman's unbiased estimator k3 of
    KL(pi_theta || pi_ref) from tokens sampled by pi_theta.

    logp, ref_logp: log-probabilities of the same sampled tokens under the policy and the reference, any equal
    shapes. With x = ref_logp - logp = log(pi_ref / pi_theta), returns exp(x) - x - 1 elementwise (never
    negative; 0 where the two agree).
    """
    raise NotImplementedError("Exercise kl_k3: exp(ref - logp) - (ref - logp) - 1")


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, clip_eps: float = 0.2, beta: float = 0.04) -> torch.Tensor:
    """The GRPO loss (DeepSeekMath eq. 3, negated so that an optimizer minimizes it).

    logp [N, L]: log pi_theta of each sampled token (with gradients); old_logp [N, L]: the same under the policy
    that sampled them; ref_logp [N, L]: under the frozen reference; advantages [N]: one per completion, shared by
    its tokens; mask [N, L]: 1 on a completion's tokens, 0 on padding (padding may hold any number: ignore it).
    Per token: ratio = exp(logp - old_logp),
               term  = min(ratio * A, clip(ratio, 1 - clip_eps, 1 + clip_eps) * A) - beta * kl_k3(logp, ref_logp).
    Then the mean of term over each completion's own unmasked tokens, then the mean over the N completions
    (a completion with no unmasked token counts as 0). Return minus that, a scalar tensor.
    """
    raise NotImplementedError("Exercise grpo_loss: clipped surrogate minus beta * k3, masked mean per completion")


def accuracy_reward(completion: str, answer: int) -> float:
    """DeepSeek-R1's accuracy reward: 1.0 when the first "<answer>...</answer>" block of the completion holds
    exactly the right number, else 0.0.

    The number may be written with digits or in words ("12", "twelve"; surrounding spaces are fine):
    mini_deepseek.data.parse_number turns such a text into an int, or None. No answer block: 0.0.
    Example: accuracy_reward("<think>7+5=12</think><answer>12</answer>", 12) == 1.0.
    """
    raise NotImplementedError("Exercise accuracy_reward: parse the first <answer> block and compare")


def format_reward(completion: str) -> float:
    """DeepSeek-R1's format reward: 1.0 when the completion is exactly
    "<think>reasoning</think><answer>answer</answer>" (whitespace allowed before, between and after the two
    blocks), with reasoning and answer both non-empty (not just spaces) and containing no further
    <think>, </think>, <answer> or </answer> tag. Anything else, e.g. text outside the blocks, a missing or
    repeated tag, or the answer first: 0.0.
    """
    raise NotImplementedError("Exercise format_reward: one think block, then one answer block, nothing else")


def language_consistency_reward(completion: str, language: str) -> float:
    """DeepSeek-R1's language-consistency reward (section 2.3.2): the share of the reasoning written in the
    target language. Here the two languages are two ways to write numbers, "digits" ("12") and "words"
    ("twelve"), so the reward is the share of numerals in the reasoning (the text of the first
    <think>...</think> block) that are written in `language`.

    mini_deepseek.data.NUMERAL.findall(text) lists the numerals of a text; numeral_language(numeral) says
    "digits" or "words". No think block, or no numeral in it: 0.0. A language other than "digits" or "words":
    ValueError. Example: "<think>seven+five=12</think>..." in "words" -> 2/3.
    """
    raise NotImplementedError("Exercise language_consistency_reward: share of numerals in the target language")
