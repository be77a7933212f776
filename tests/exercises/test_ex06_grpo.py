"""Graded tests of exercise set 06 (exercises/ex06_grpo.py): GRPO's advantages, the k3 estimator, the clipped loss
with masking, and the three rule rewards of DeepSeek-R1.

Each exercise is checked against numbers worked out by hand (the comments show the arithmetic) and against the
library in mini_deepseek/grpo.py. Plausible mistakes each make at least one test fail: the population std instead
of the sample std, eps inside the square root, normalizing over the whole batch instead of each group; the KL ratio
upside down; max instead of min, a missing clip, padding left in, a mask multiplied into NaN, the mean over all
tokens instead of per completion; the last answer block instead of the first, a number found inside other text;
an empty reasoning block, text outside the blocks; the whole completion instead of the reasoning.
"""

import math

import pytest
import torch
from torch.testing import assert_close

from mini_deepseek import grpo as library

GOOD = "<think>7+5=12; 12-3=9</think><answer>9</answer>"


# --- group_advantages ----------------------------------------------------------------------------------------------
@pytest.mark.exercise("group_advantages")
def test_group_advantages_hand_computed(exercise):
    # mean 0.5; sample std sqrt((4 * 0.25) / 3) = 0.57735 (the population std would be 0.5, giving +-1)
    out = exercise(torch.tensor([[1.0, 0.0, 0.0, 1.0]]))
    expected = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert_close(out, torch.tensor([[expected, -expected, -expected, expected]]))


@pytest.mark.exercise("group_advantages")
def test_group_advantages_normalize_each_group_on_its_own(exercise):
    # second group: mean 2.25, deviations (0.75, 0.75, 0.75, -2.25), sample variance 6.75 / 3 = 2.25, std 1.5
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 3.0, 3.0, 0.0]])
    out = exercise(rewards)
    assert_close(out[1], torch.tensor([0.75, 0.75, 0.75, -2.25]) / (1.5 + 1e-4))
    assert_close(out, library.group_advantages(rewards))


@pytest.mark.exercise("group_advantages")
def test_group_advantages_eps_is_added_to_the_std(exercise):
    # std of (0, 1e-4) is 7.07e-5: eps outside the square root gives +-5e-5 / 1.707e-4 = +-0.2929
    out = exercise(torch.tensor([[0.0, 1e-4]], dtype=torch.float64), eps=1e-4)
    assert_close(out, torch.tensor([[-1.0, 1.0]], dtype=torch.float64) * 5e-5 / (math.sqrt(2) * 5e-5 + 1e-4))


@pytest.mark.exercise("group_advantages")
def test_group_advantages_equal_rewards_give_zeros_and_one_sample_is_an_error(exercise):
    out = exercise(torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
    assert_close(out, torch.zeros(2, 3))
    with pytest.raises(ValueError):
        exercise(torch.tensor([[1.0], [0.0]]))


# --- kl_k3 ---------------------------------------------------------------------------------------------------------
@pytest.mark.exercise("kl_k3")
def test_kl_k3_hand_computed(exercise):
    # pi_theta 0.5, pi_ref 0.25: x = log(0.25 / 0.5) = -ln 2, k3 = 0.5 + ln 2 - 1 = 0.19315
    # (upside down, x = +ln 2 would give 2 - ln 2 - 1 = 0.30685)
    out = exercise(torch.tensor([math.log(0.5), math.log(0.3)]), torch.tensor([math.log(0.25), math.log(0.3)]))
    assert_close(out, torch.tensor([0.5 + math.log(2) - 1, 0.0]))


@pytest.mark.exercise("kl_k3")
def test_kl_k3_is_an_unbiased_estimate_of_kl_policy_to_reference(exercise):
    # tokens sampled from the policy: the mean of k3 estimates KL(pi_theta || pi_ref) = sum p log(p / q)
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.2, 0.2, 0.05, 0.05])
    q = torch.tensor([0.1, 0.3, 0.3, 0.2, 0.1])
    tokens = torch.multinomial(p, 400_000, replacement=True, generator=gen)
    estimate = exercise(p.log()[tokens], q.log()[tokens]).mean()
    assert abs(estimate.item() - (p * (p / q).log()).sum().item()) < 0.01


@pytest.mark.exercise("kl_k3")
def test_kl_k3_is_never_negative_and_matches_library(exercise):
    logp, ref = torch.randn(4, 7) - 2, torch.randn(4, 7) - 2
    out = exercise(logp, ref)
    assert out.shape == (4, 7) and bool((out >= 0).all())
    assert_close(out, library.kl_k3(logp, ref))


# --- grpo_loss -----------------------------------------------------------------------------------------------------
def hand_case():
    """Two completions: A = +2 with 2 tokens (ratios 1.5 and 0.9, then padding), A = -1 with 3 (0.5, 1.0, 1.3)."""
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-1.5, -0.5, -2.5]])
    old_logp = logp - torch.tensor([[math.log(1.5), math.log(0.9), 0.0], [math.log(0.5), 0.0, math.log(1.3)]])
    old_logp[0, 2] = -40.0  # padding: a ratio of e^40 if it were used
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    return logp, old_logp, logp.clone(), torch.tensor([2.0, -1.0]), mask


@pytest.mark.exercise("grpo_loss")
def test_grpo_loss_hand_computed(exercise):
    logp, old_logp, ref_logp, adv, mask = hand_case()
    # completion 1 (A = 2): min(1.5*2, 1.2*2) = 2.4 (clipped at 1 + eps), min(0.9*2, 0.9*2) = 1.8 -> mean 2.1
    # completion 2 (A = -1): min(-0.5, -0.8) = -0.8 (clipped at 1 - eps), -1.0, min(-1.3, -1.2) = -1.3 -> mean -31/30
    # objective (2.1 - 31/30) / 2 = 0.53333; the loss is its negative. KL is 0 (reference = policy).
    loss = exercise(logp, old_logp, ref_logp, adv, mask, clip_eps=0.2, beta=0.04)
    assert loss.dim() == 0
    assert_close(loss, torch.tensor(-(2.1 - 31 / 30) / 2))


@pytest.mark.exercise("grpo_loss")
def test_grpo_loss_kl_term(exercise):
    logp, old_logp, _, adv, mask = hand_case()
    # reference twice as likely on every token: k3 = 2 - ln 2 - 1 = 0.30685, times beta 0.5 off every token
    loss = exercise(logp, old_logp, logp + math.log(2), adv, mask, clip_eps=0.2, beta=0.5)
    assert_close(loss, torch.tensor(-(2.1 - 31 / 30) / 2 + 0.5 * (1 - math.log(2))))


@pytest.mark.exercise("grpo_loss")
def test_grpo_loss_gradient_is_zero_where_clipped(exercise):
    logp, old_logp, ref_logp, adv, mask = hand_case()
    logp.requires_grad_(True)
    exercise(logp, old_logp, ref_logp, adv, mask, clip_eps=0.2, beta=0.0).backward()
    # d loss / d logp = -A * ratio / (tokens of the completion * N) where the unclipped term is the minimum, else 0
    expected = torch.tensor([[0.0, -2 * 0.9 / (2 * 2), 0.0], [0.0, 1.0 / (3 * 2), 1.3 / (3 * 2)]])
    assert_close(logp.grad, expected)


@pytest.mark.exercise("grpo_loss")
def test_grpo_loss_ignores_padding_whatever_it_holds(exercise):
    for junk in (1e4, float("inf"), float("-inf")):
        logp, old_logp, ref_logp, adv, mask = hand_case()
        for t in (logp, old_logp, ref_logp):
            t[0, 2] = junk
        logp.requires_grad_(True)
        loss = exercise(logp, old_logp, ref_logp, adv, mask)
        assert torch.isfinite(loss), f"padding holding {junk} made the loss {loss}"
        assert_close(loss, torch.tensor(-(2.1 - 31 / 30) / 2))
        loss.backward()  # and no gradient leaks into (or NaN out of) the padding
        assert torch.isfinite(logp.grad).all() and logp.grad[0, 2] == 0, f"padding {junk}: gradient {logp.grad}"


@pytest.mark.exercise("grpo_loss")
def test_grpo_loss_empty_completion_counts_as_zero(exercise):
    logp, old_logp, ref_logp, adv, mask = hand_case()
    mask = mask.clone()
    mask[1] = 0  # the second completion has no tokens: its mean is 0, and the mean over 2 completions halves the first
    assert_close(exercise(logp, old_logp, ref_logp, adv, mask), torch.tensor(-2.1 / 2))


@pytest.mark.exercise("grpo_loss")
def test_grpo_loss_matches_library(exercise):
    N, L = 6, 9
    logp, old, ref = torch.randn(N, L) * 0.3 - 1, torch.randn(N, L) * 0.3 - 1, torch.randn(N, L) * 0.3 - 1
    mask = torch.arange(L)[None, :] < torch.tensor([9, 5, 1, 7, 3, 8])[:, None]
    adv = torch.randn(N)
    expected, _ = library.grpo_loss(logp, old, ref, adv, mask, clip_eps=0.1, beta=0.2, loss_type="grpo")
    assert_close(exercise(logp, old, ref, adv, mask, clip_eps=0.1, beta=0.2), expected)


# --- accuracy_reward -----------------------------------------------------------------------------------------------
@pytest.mark.exercise("accuracy_reward")
@pytest.mark.parametrize("completion, answer, reward", [
    (GOOD, 9, 1.0),
    (GOOD, 12, 0.0),  # 12 is in the reasoning, not the answer
    ("<think>seven+five=twelve</think><answer> twelve </answer>", 12, 1.0),  # words, spaces around
    ("<think>7+5=12</think>12", 12, 0.0),  # no answer block
    ("<answer>11</answer><answer>12</answer>", 12, 0.0),  # the first answer block counts
    ("<answer>12</answer> or <answer>13</answer>", 12, 1.0),
    ("<think>7+5=12</think><answer>112</answer>", 12, 0.0),  # 12 inside another number
    ("<think>7+5=12</think><answer>12 pens</answer>", 12, 0.0),  # exactly a number
    ("", 12, 0.0),
])
def test_accuracy_reward(exercise, completion, answer, reward):
    assert exercise(completion, answer) == reward
    assert library.accuracy_reward(completion, answer) == reward


# --- format_reward -------------------------------------------------------------------------------------------------
@pytest.mark.exercise("format_reward")
@pytest.mark.parametrize("completion, reward", [
    (GOOD, 1.0),
    ("  <think>\n7+5=12\n</think>\n<answer> 12 </answer>\n", 1.0),  # whitespace around and between
    ("<think>7+5=12</think>", 0.0),  # no answer
    ("<answer>12</answer><think>7+5=12</think>", 0.0),  # answer first
    ("7+5=12 <think>so</think><answer>12</answer>", 0.0),  # text before
    (GOOD + " done", 0.0),  # text after
    ("<think> </think><answer>12</answer>", 0.0),  # empty reasoning
    ("<think>7+5=12</think><answer></answer>", 0.0),  # empty answer
    ("<think>a<think>b</think><answer>12</answer>", 0.0),  # a tag inside the reasoning
    ("<think>7+5=12</think><answer>12</answer><answer>13</answer>", 0.0),  # two answers
    ("", 0.0),
])
def test_format_reward(exercise, completion, reward):
    assert exercise(completion) == reward
    assert library.format_reward(completion) == reward


# --- language_consistency_reward -----------------------------------------------------------------------------------
@pytest.mark.exercise("language_consistency_reward")
@pytest.mark.parametrize("completion, language, reward", [
    ("<think>seven+five=12</think><answer>12</answer>", "words", 2 / 3),
    ("<think>seven+five=12</think><answer>12</answer>", "digits", 1 / 3),
    ("<think>seven+five=twelve</think><answer>12</answer>", "words", 1.0),  # the answer block is not reasoning
    ("<think>twenty one-1=twenty</think><answer>20</answer>", "words", 2 / 3),  # "twenty one" is one numeral
    ("<think>seventeen-7=ten</think><answer>10</answer>", "words", 2 / 3),  # not "seven" + "teen"
    ("<think>7+5=12</think><think>seven</think><answer>12</answer>", "words", 0.0),  # the first block only
    ("<think>someone said so</think><answer>3</answer>", "words", 0.0),  # no numeral ("one" inside a word)
    ("<answer>12</answer>", "digits", 0.0),  # no reasoning
    ("", "digits", 0.0),
])
def test_language_consistency_reward(exercise, completion, language, reward):
    assert exercise(completion, language) == pytest.approx(reward)
    assert library.language_consistency_reward(completion, language) == pytest.approx(reward)


@pytest.mark.exercise("language_consistency_reward")
def test_language_consistency_reward_rejects_unknown_languages(exercise):
    with pytest.raises(ValueError):
        exercise(GOOD, "chinese")
