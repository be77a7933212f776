"""Graded tests of exercise set 02 (exercises/ex02_balancing.py): the expert-level auxiliary loss, the
sequence-wise loss, the bias update, group-limited top-k and MaxVio.

Each exercise is checked on numbers worked out by hand (the comments show the arithmetic), on properties any
correct answer has, and against the library's gate (mini_deepseek/moe.py) and MaxVio (mini_deepseek/train.py).
"""

import pytest
import torch
from torch.testing import assert_close

from mini_deepseek import ModelConfig
from mini_deepseek.moe import Gate
from mini_deepseek.train import max_violation as library_max_violation


def make_gate(**changes) -> Gate:
    """A library gate over 8 experts with random weights (std 0.5, so affinities spread over (0, 1))."""
    cfg = ModelConfig.preset("toy", dim=16, **{"n_routed_experts": 8, "n_activated_experts": 2, **changes})
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight, std=0.5)
    return gate


def affinities(gate: Gate, x: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(x @ gate.weight.T)


# --- expert_balance_loss -------------------------------------------------------------------------------------------
@pytest.mark.exercise("expert_balance_loss")
def test_expert_balance_loss_hand_example(exercise):
    # 2 tokens, 4 experts, both routed to experts 0 and 1: counts [2, 2, 0, 0], f = counts * 4 / (2 * 2) = [2, 2, 0, 0]
    # both tokens' affinities [0.8, 0.4, 0.4, 0.4] sum to 2, normalized [0.4, 0.2, 0.2, 0.2] = P
    # sum_i f_i P_i = 2 * 0.4 + 2 * 0.2 = 1.2, times alpha 0.5 = 0.6
    scores = torch.tensor([[0.8, 0.4, 0.4, 0.4], [0.8, 0.4, 0.4, 0.4]])
    indices = torch.tensor([[0, 1], [1, 0]])
    loss = exercise(scores, indices, 0.5)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(0.6)


@pytest.mark.exercise("expert_balance_loss")
def test_expert_balance_loss_is_alpha_when_balanced(exercise):
    # 4 tokens over 4 experts with top-2, every expert chosen twice: f = [1, 1, 1, 1]; sum_i P_i = 1 -> loss = alpha
    scores = torch.rand(4, 4) + 0.1
    indices = torch.tensor([[0, 1], [2, 3], [1, 2], [3, 0]])
    assert exercise(scores, indices, 0.01).item() == pytest.approx(0.01, rel=1e-5)


@pytest.mark.exercise("expert_balance_loss")
@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_expert_balance_loss_matches_the_library_gate(exercise, score_func):
    gate = make_gate(score_func=score_func, n_expert_groups=1, n_limited_groups=1, aux_loss_alpha=0.03,
                     seq_aux_alpha=0.0).train()
    x = torch.randn(40, 16)
    _, indices = gate(x, seq_len=40)
    logits = x @ gate.weight.T
    scores = logits.sigmoid() if score_func == "sigmoid" else logits.softmax(dim=-1)
    assert_close(exercise(scores, indices, 0.03), gate.expert_balance_loss)


@pytest.mark.exercise("expert_balance_loss")
def test_expert_balance_loss_gradient_goes_through_P_only(exercise):
    scores = torch.rand(12, 6).add(0.05).requires_grad_(True)
    indices = torch.stack([torch.randperm(6)[:3] for _ in range(12)])
    exercise(scores, indices, 0.2).backward()
    # d/ds_{j,t} of alpha * sum_i f_i * mean_t s_{i,t} / S_t with S_t = sum_i s_{i,t}, f a constant:
    f = torch.bincount(indices.flatten(), minlength=6).float() * 6 / (3 * 12)
    s = scores.detach()
    row_sum = s.sum(dim=1, keepdim=True)
    expected = 0.2 / 12 * (f / row_sum - (s * f).sum(dim=1, keepdim=True) / row_sum**2)
    assert_close(scores.grad, expected)


# --- sequence_balance_loss -----------------------------------------------------------------------------------------
@pytest.mark.exercise("sequence_balance_loss")
def test_sequence_balance_loss_hand_example(exercise):
    # One sequence of 2 tokens over 2 experts, k = 1. Token 0: s = [0.6, 0.2] (top-1 expert 0), token 1:
    # s = [0.3, 0.1] (expert 0). f = 2 / (1 * 2) * [2, 0] = [2, 0]. Normalized: [0.75, 0.25] both times, P = [0.75, 0.25].
    # sum_i f_i P_i = 1.5, alpha 0.1 -> 0.15
    scores = torch.tensor([[[0.6, 0.2], [0.3, 0.1]]])
    loss = exercise(scores, 1, 0.1)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(0.15)


@pytest.mark.exercise("sequence_balance_loss")
def test_sequence_balance_loss_sees_imbalanced_sequences_in_a_balanced_batch(exercise):
    # Sequence 0 sends every token to expert 0, sequence 1 to expert 1: the batch is balanced (f = [1, 1] over all
    # tokens), each sequence is not. Per sequence f = [2, 0] or [0, 2] and P = [0.9, 0.1] or [0.1, 0.9]:
    # each sequence gives alpha * 2 * 0.9 = 1.8 alpha; a loss computed over the whole batch would give alpha.
    seq0 = torch.tensor([0.9, 0.1]).expand(5, 2)
    seq1 = torch.tensor([0.1, 0.9]).expand(5, 2)
    scores = torch.stack([seq0, seq1])  # [2, 5, 2]
    assert exercise(scores, 1, 1.0).item() == pytest.approx(1.8)


@pytest.mark.exercise("sequence_balance_loss")
def test_sequence_balance_loss_averages_sequences(exercise):
    scores = torch.rand(3, 7, 8) + 0.05
    per_sequence = torch.stack([exercise(scores[b:b + 1], 2, 0.01) for b in range(3)])
    assert_close(exercise(scores, 2, 0.01), per_sequence.mean())
    shuffled = scores[:, torch.randperm(7)]  # the order of tokens within a sequence does not matter
    assert_close(exercise(shuffled, 2, 0.01), exercise(scores, 2, 0.01))


@pytest.mark.exercise("sequence_balance_loss")
def test_sequence_balance_loss_counts_the_top_k_of_the_unbiased_affinities(exercise):
    gate = make_gate(n_expert_groups=1, n_limited_groups=1)
    x = torch.randn(2 * 9, 16)
    scores = affinities(gate, x).view(2, 9, 8).detach().requires_grad_(True)
    # written out: f from torch.topk of the affinities themselves, P from the normalized affinities
    expected = 0.0
    for b in range(2):
        top = scores[b].topk(3, dim=-1).indices
        f = torch.bincount(top.flatten(), minlength=8).float() * 8 / (3 * 9)
        P = (scores[b] / scores[b].sum(-1, keepdim=True)).mean(0)
        expected += 0.02 * (f * P).sum() / 2
    got = exercise(scores, 3, 0.02)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    got.backward()
    assert scores.grad is not None and torch.isfinite(scores.grad).all() and scores.grad.abs().sum() > 0


@pytest.mark.exercise("sequence_balance_loss")
def test_sequence_balance_loss_matches_the_library_gate(exercise):
    # a gate whose bias and group limit change the routing: the loss still counts the top-k of the unbiased s
    gate = make_gate(n_expert_groups=4, n_limited_groups=2, seq_aux_alpha=0.05).train()
    gate.e_score_correction_bias.uniform_(-0.4, 0.4)
    x = torch.randn(3 * 11, 16)
    gate(x, seq_len=11)
    assert_close(exercise(affinities(gate, x).view(3, 11, 8), 2, 0.05), gate.balance_loss)


# --- update_bias ---------------------------------------------------------------------------------------------------
@pytest.mark.exercise("update_bias")
def test_update_bias_hand_example(exercise):
    bias = torch.zeros(8)
    load = torch.tensor([10.0, 0, 0, 0, 0, 0, 0, 6])  # mean 2: experts 0 and 7 overloaded, the rest underloaded
    new = exercise(bias, load, 0.01)
    assert_close(new, torch.tensor([-0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, -0.01]))
    assert torch.equal(bias, torch.zeros(8)), "update_bias must return a new tensor and leave its input alone"


@pytest.mark.exercise("update_bias")
def test_update_bias_leaves_an_expert_at_the_mean_alone(exercise):
    bias = torch.tensor([0.5, -0.5, 0.25, 0.0])
    new = exercise(bias, torch.tensor([3, 1, 2, 2]), 0.1)  # integer loads, mean 2
    assert_close(new, torch.tensor([0.4, -0.4, 0.25, 0.0]))


@pytest.mark.exercise("update_bias")
def test_update_bias_matches_the_library_gate(exercise):
    gate = make_gate(n_expert_groups=1, n_limited_groups=1, bias_update_speed=0.003)
    gate.e_score_correction_bias.uniform_(-0.2, 0.2)
    before = gate.e_score_correction_bias.clone()
    gate(torch.randn(64, 16), seq_len=64)
    expected_load = gate.last_load.clone()
    gate.update_bias()
    assert_close(exercise(before, expected_load, 0.003), gate.e_score_correction_bias)


@pytest.mark.exercise("update_bias")
def test_update_bias_balances_a_skewed_router(exercise):
    # Routing-only loop: expert 0 is everyone's favourite. With the right sign the bias spreads the load;
    # with the sign flipped (load - mean) the favourites would only get more popular.
    E, k = 8, 2
    generator = torch.Generator().manual_seed(0)
    preference = torch.linspace(1.5, -1.5, E)
    bias = torch.zeros(E)
    maxvio = []
    for _ in range(300):
        scores = torch.sigmoid(torch.randn(256, E, generator=generator) * 0.5 + preference)
        load = torch.bincount((scores + bias).topk(k, dim=-1).indices.flatten(), minlength=E).float()
        maxvio.append((load.max() / load.mean() - 1).item())
        bias = exercise(bias, load, 0.005)
    assert maxvio[0] > 1.0
    assert sum(maxvio[-50:]) / 50 < 0.35, f"MaxVio did not fall: first {maxvio[0]:.2f}, last {maxvio[-1]:.2f}"


# --- group_limited_topk --------------------------------------------------------------------------------------------
@pytest.mark.exercise("group_limited_topk")
def test_group_limited_topk_plain_when_one_group(exercise):
    scores, bias = torch.rand(20, 8), torch.randn(8) * 0.1
    got = exercise(scores, bias, 3, 1, 1)
    assert got.shape == (20, 3) and got.dtype == torch.int64
    assert torch.equal(got, (scores + bias).topk(3, dim=-1).indices)


@pytest.mark.exercise("group_limited_topk")
def test_group_limited_topk_scores_a_group_by_its_top_two(exercise):
    # Two groups of two. Group 0 holds the single best expert (0.9) but its partner is weak (0.0): top-2 sum 0.9.
    # Group 1 holds two good experts (0.6, 0.55): top-2 sum 1.15, so group 1 is kept and expert 2 wins.
    # (Scoring a group by its best expert alone, as V2 did, would keep group 0 and pick expert 0.)
    scores = torch.tensor([[0.9, 0.0, 0.6, 0.55]])
    assert exercise(scores, torch.zeros(4), 1, 2, 1).tolist() == [[2]]
    assert exercise(scores, torch.zeros(4), 2, 2, 1).tolist() == [[2, 3]]
    # the bias takes part in the group score: lift expert 1 and group 0 wins
    assert exercise(scores, torch.tensor([0.0, 0.5, 0.0, 0.0]), 2, 2, 1).tolist() == [[0, 1]]


@pytest.mark.exercise("group_limited_topk")
def test_group_limited_topk_never_picks_a_dropped_group_when_scores_are_negative(exercise):
    # Every biased score is negative. An expert of a dropped group filled with 0 instead of -inf would beat them all.
    scores = torch.rand(32, 8)
    bias = torch.full((8,), -5.0)
    got = exercise(scores, bias, 2, 4, 1)
    assert torch.equal(got[:, 0] // 2, got[:, 1] // 2), "both experts must come from the single kept group"
    group_scores = (scores + bias).view(32, 4, 2).sum(-1)  # with two experts per group, the top-2 sum is the sum
    assert torch.equal(got[:, 0] // 2, group_scores.argmax(dim=-1))


@pytest.mark.exercise("group_limited_topk")
@pytest.mark.parametrize("n_groups, topk_groups, k", [(4, 2, 2), (2, 1, 3), (4, 3, 4)])
def test_group_limited_topk_matches_the_library_gate(exercise, n_groups, topk_groups, k):
    gate = make_gate(n_expert_groups=n_groups, n_limited_groups=topk_groups, n_activated_experts=k)
    gate.e_score_correction_bias.uniform_(-0.3, 0.3)
    x = torch.randn(64, 16)
    _, expected = gate(x, seq_len=64)
    got = exercise(affinities(gate, x), gate.e_score_correction_bias, k, n_groups, topk_groups)
    assert torch.equal(got, expected)


# --- max_violation -------------------------------------------------------------------------------------------------
@pytest.mark.exercise("max_violation")
def test_max_violation_hand_examples(exercise):
    assert exercise(torch.tensor([2.0, 2, 2, 2])).item() == pytest.approx(0.0)
    got = exercise(torch.tensor([3, 1, 0, 0]))  # integer counts: max 3, mean 1 -> 2
    assert got.dim() == 0 and got.item() == pytest.approx(2.0)


@pytest.mark.exercise("max_violation")
def test_max_violation_per_layer(exercise):
    load = torch.tensor([[3.0, 1, 0, 0], [1.0, 1, 1, 1], [8.0, 0, 0, 0]])  # one row per layer
    assert_close(exercise(load), torch.tensor([2.0, 0.0, 3.0]))
    assert_close(exercise(load).mean().item(), library_max_violation(load))  # the library averages the layers


@pytest.mark.exercise("max_violation")
def test_max_violation_global_is_never_above_the_mean_batch_value(exercise):
    loads = torch.randint(0, 50, (20, 16)).float()  # 20 batches of the same size... roughly
    loads = loads / loads.sum(dim=1, keepdim=True) * 1000  # ... exactly: 1000 tokens each
    batch = exercise(loads)  # [20] MaxVio_batch
    global_ = exercise(loads.sum(dim=0))  # MaxVio_global: one load over all batches
    assert batch.shape == (20,) and global_.dim() == 0
    assert global_ <= batch.mean() + 1e-6
