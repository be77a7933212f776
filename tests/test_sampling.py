"""The sampling rule of generate: greedy at temperature 0, else temperature-scaled softmax within the top-p nucleus."""

import torch

from mini_deepseek.model import sample_next_token

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])


def frequencies(logits: torch.Tensor, temperature: float, top_p: float, n: int = 4000) -> torch.Tensor:
    draws = sample_next_token(logits.expand(n, -1), temperature, top_p, torch.Generator().manual_seed(0))
    return torch.bincount(draws, minlength=logits.shape[-1]) / n


def test_greedy_at_temperature_zero():
    assert sample_next_token(torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]]), 0.0, 0.5).tolist() == [1, 0]


def test_nucleus_is_the_smallest_prefix_reaching_top_p():
    # 0.5 alone falls short of 0.7, 0.5 + 0.3 reaches it: tokens 0 and 1 stay, renormalized to 5/8 and 3/8.
    # (4000 draws: a frequency's standard error is below 0.008.)
    freq = frequencies(PROBS.log()[None], 1.0, 0.7)
    torch.testing.assert_close(freq, torch.tensor([5 / 8, 3 / 8, 0.0, 0.0]), atol=0.03, rtol=0)


def test_temperature_divides_the_logits():
    # Temperature 0.5 squares the probabilities before renormalizing: [0.25, 0.09, 0.0225, 0.0025] / 0.365.
    freq = frequencies(PROBS.log()[None], 0.5, 1.0)
    torch.testing.assert_close(freq, PROBS**2 / (PROBS**2).sum(), atol=0.03, rtol=0)
