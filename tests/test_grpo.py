"""mini_deepseek/grpo.py: GRPO's advantages, k3, the loss in both normalizations with its statistics, and the rule
rewards, against hand-computed values; and the bad inputs the issue names (groups of one, empty completions,
missing tags), which give clear errors or defined values, never NaN."""

import math

import pytest
import torch
from torch.testing import assert_close

from mini_deepseek.data import make_word_problem, word_problems
from mini_deepseek.grpo import (
    accuracy_reward,
    format_reward,
    group_advantages,
    grpo_loss,
    kl_k3,
    language_consistency_reward,
    per_token_objective,
    rule_rewards,
)


def hand_case():
    """Two completions: A = +2 with 2 tokens (ratios 1.5, 0.9, then padding), A = -1 with 3 (0.5, 1.0, 1.3)."""
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-1.5, -0.5, -2.5]])
    old_logp = logp - torch.tensor([[math.log(1.5), math.log(0.9), 0.0], [math.log(0.5), 0.0, math.log(1.3)]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    return logp, old_logp, logp.clone(), torch.tensor([2.0, -1.0]), mask


# --- advantages and k3 ---------------------------------------------------------------------------------------------
def test_group_advantages_hand_computed():
    out = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]]))
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)  # sample std of (1, 0, 0, 1) is sqrt(1/3)
    assert_close(out, torch.tensor([[a, -a, -a, a], [0.0, 0.0, 0.0, 0.0]]))


def test_group_advantages_bad_input():
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.tensor([[1.0], [0.0]]))  # a group of one sample
    with pytest.raises(ValueError, match=r"\[n_prompts, G\]"):
        group_advantages(torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="finite"):
        group_advantages(torch.tensor([[1.0, float("nan")]]))


def test_kl_k3_hand_computed_and_shapes():
    assert_close(kl_k3(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])),
                 torch.tensor([0.5 + math.log(2) - 1]))
    with pytest.raises(ValueError, match="same shape"):
        kl_k3(torch.zeros(2, 3), torch.zeros(2, 4))


# --- the loss ------------------------------------------------------------------------------------------------------
def test_grpo_loss_hand_computed_grpo_and_dapo():
    logp, old_logp, ref_logp, adv, mask = hand_case()
    # per token: completion 1 (A=2): 2.4 (clipped), 1.8; completion 2 (A=-1): -0.8 (clipped), -1.0, -1.3
    loss, stats = grpo_loss(logp, old_logp, ref_logp, adv, mask, clip_eps=0.2, beta=0.04, loss_type="grpo")
    assert_close(loss, torch.tensor(-(2.1 - 31 / 30) / 2))
    loss_dapo, _ = grpo_loss(logp, old_logp, ref_logp, adv, mask, clip_eps=0.2, beta=0.04, loss_type="dapo")
    assert_close(loss_dapo, torch.tensor(-(2.4 + 1.8 - 0.8 - 1.0 - 1.3) / 5))
    # 2 of 5 tokens clipped (1.5 with A > 0, 0.5 with A < 0); mean ratio (1.5 + 0.9 + 0.5 + 1 + 1.3) / 5; no KL
    assert stats["clip_fraction"] == pytest.approx(2 / 5)
    assert stats["ratio"] == pytest.approx(5.2 / 5)
    assert stats["kl"] == pytest.approx(0.0, abs=1e-7)


def test_per_token_objective_hand_computed_and_what_the_loss_averages():
    logp, old_logp, ref_logp, adv, mask = hand_case()
    # min(r A, clip(r) A) per token (the padding of completion 1 too: r = 1 there, so A = 2), no KL
    expected = torch.tensor([[2.4, 1.8, 2.0], [-0.8, -1.0, -1.3]])
    assert_close(per_token_objective(logp, old_logp, ref_logp, adv, clip_eps=0.2, beta=0.04), expected)
    k3 = 2 - math.log(2) - 1  # the reference twice as likely as the policy on every token
    assert_close(per_token_objective(logp, old_logp, logp + math.log(2), adv, clip_eps=0.2, beta=0.5),
                 expected - 0.5 * k3)
    # grpo_loss is its masked token mean per completion, then the mean over completions, negated
    loss, _ = grpo_loss(logp, old_logp, ref_logp, adv, mask)
    assert_close(loss, -((expected * mask).sum(1) / mask.sum(1)).mean())


def test_grpo_loss_kl_and_its_statistic():
    logp, old_logp, _, adv, mask = hand_case()
    k3 = 2 - math.log(2) - 1  # the reference twice as likely as the policy on every token
    loss, stats = grpo_loss(logp, old_logp, logp + math.log(2), adv, mask, beta=0.5)
    assert_close(loss, torch.tensor(-(2.1 - 31 / 30) / 2 + 0.5 * k3))
    assert stats["kl"] == pytest.approx(k3)


def test_grpo_loss_first_update_is_the_policy_gradient():
    # ratio 1 everywhere (the first update on a fresh batch): the gradient is -A / (n_i * N) per token
    logp = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    loss, stats = grpo_loss(logp, logp.detach(), logp.detach(), torch.tensor([1.0, -1.0]), mask)
    loss.backward()
    assert_close(logp.grad, torch.tensor([[-1 / 4, -1 / 4, 0.0], [1 / 6, 1 / 6, 1 / 6]]))
    assert stats["clip_fraction"] == 0.0 and stats["ratio"] == pytest.approx(1.0)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_grpo_loss_padding_and_empty_completions_never_give_nan(loss_type):
    logp, old_logp, ref_logp, adv, mask = hand_case()
    logp.requires_grad_(True)
    with torch.no_grad():
        for t in (old_logp, ref_logp):
            t[0, 2] = float("-inf")
    loss, stats = grpo_loss(logp, old_logp, ref_logp, adv, mask, loss_type=loss_type)
    loss.backward()
    assert torch.isfinite(loss) and all(math.isfinite(v) for v in stats.values())
    assert torch.isfinite(logp.grad).all() and logp.grad[0, 2] == 0
    # every completion empty: a defined zero, not 0 / 0
    empty, stats = grpo_loss(logp, old_logp, ref_logp, adv, torch.zeros_like(mask), loss_type=loss_type)
    assert empty.item() == 0.0 and stats == {"kl": 0.0, "clip_fraction": 0.0, "ratio": 0.0}


def test_grpo_loss_bad_input():
    logp, old_logp, ref_logp, adv, mask = hand_case()
    with pytest.raises(ValueError, match="old_logp"):
        grpo_loss(logp, old_logp[:, :2], ref_logp, adv, mask)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(logp, old_logp, ref_logp, adv[:1], mask)
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(logp, old_logp, ref_logp, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="clip_eps"):
        grpo_loss(logp, old_logp, ref_logp, adv, mask, clip_eps=-0.1)
    with pytest.raises(ValueError, match=r"\[N completions, L tokens\]"):
        grpo_loss(logp[0], old_logp[0], ref_logp[0], adv, mask[0])


# --- rewards -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("completion, answer, accuracy, fmt", [
    ("<think>7+5=12; 12-3=9</think><answer>9</answer>", 9, 1.0, 1.0),
    ("<think>seven+five=twelve</think> <answer>twelve</answer>\n", 12, 1.0, 1.0),
    ("<think>7+5=12</think><answer>13</answer>", 12, 0.0, 1.0),  # well formed, wrong
    ("7+5=12; so 12", 12, 0.0, 0.0),  # missing tags: the pretraining format earns nothing
    ("<think>7+5=12</think><answer>12", 12, 0.0, 0.0),  # unclosed answer
    ("<answer>12</answer>", 12, 1.0, 0.0),  # right, but no reasoning
    ("<think></think><answer>12</answer>", 12, 1.0, 0.0),  # empty reasoning
    ("", 12, 0.0, 0.0),  # an empty completion
])
def test_accuracy_and_format_rewards(completion, answer, accuracy, fmt):
    assert accuracy_reward(completion, answer) == accuracy
    assert format_reward(completion) == fmt


def test_language_consistency_reward_hand_computed():
    assert language_consistency_reward("<think>nine-2=seven; seven+one=eight</think>", "words") == 5 / 6
    assert language_consistency_reward("<think>nine-2=seven; seven+one=eight</think>", "digits") == 1 / 6
    assert language_consistency_reward("<think>no numbers</think>", "words") == 0.0
    assert language_consistency_reward("<answer>8</answer>", "digits") == 0.0  # missing tags
    with pytest.raises(ValueError, match="unknown language"):
        language_consistency_reward("<think>1</think>", "Digits")


def test_generated_solutions_earn_every_reward_and_switching_loses_consistency():
    for problem in word_problems(300, seed=5, words_share=0.5, all_at_once_share=0.5):
        assert rule_rewards(problem.r1_completion, problem.answer, problem.language) == \
            {"accuracy": 1.0, "format": 1.0, "language": 1.0}
    # 9 numerals in three steps and the "so"; from the fourth on in digits: 3 of 10 in words, the answer stays right
    mixed = make_word_problem(9, [("-", 2), ("+", 1), ("+", 4)], "words", switch_at=3)
    assert mixed.r1_completion == "<think>nine-two=seven; 7+1=8; 8+4=12; so 12</think><answer>12</answer>"
    assert rule_rewards(mixed.r1_completion, 12, "words") == {"accuracy": 1.0, "format": 1.0, "language": 3 / 10}
