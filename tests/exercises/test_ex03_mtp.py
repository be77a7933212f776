"""Graded tests of exercise set 03 (exercises/ex03_mtp.py): the MTP module's input, the MTP loss, and the accept
step of speculative decoding, greedy and sampled.

Each exercise is checked against hand-made cases (where a plausible mistake gives a visibly different answer) and
against the library: what mini_deepseek's MTP module feeds its block, what DeepSeekV3.loss reports, and the
verification rule of mini_deepseek/speculative.py.
"""

import math

import pytest
import torch
from torch.testing import assert_close

from mini_deepseek import DeepSeekV3, ModelConfig
from mini_deepseek.mtp import MTPModule
from mini_deepseek.speculative import verify_greedy

TINY = dict(dim=32, n_layers=2, inter_dim=64, moe_inter_dim=16, n_heads=2, max_seq_len=32, q_lora_rank=16,
            kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4,
            n_expert_groups=1, n_limited_groups=1)


def random_module() -> MTPModule:
    """An MTP module with random weights, norms included (a gain of 1 everywhere would hide a missing norm)."""
    module = MTPModule(2, ModelConfig.preset("toy", **TINY)).eval()
    with torch.no_grad():
        for name, param in module.named_parameters():
            param.copy_(1 + 0.5 * torch.randn_like(param) if "norm" in name else 0.3 * torch.randn_like(param))
    return module


# --- mtp_combine ---------------------------------------------------------------------------------------------------
@pytest.mark.exercise("mtp_combine")
def test_mtp_combine_is_what_the_module_block_reads(exercise):
    module = random_module()
    h_prev, emb = 3 * torch.randn(2, 5, 32), 0.2 * torch.randn(2, 5, 32)  # scales far from 1: the norms matter
    seen = {}
    hook = module.input_layernorm.register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0]))
    freqs = DeepSeekV3(ModelConfig.preset("toy", **TINY)).freqs_cis[:5]
    with torch.no_grad():
        module(h_prev, emb, freqs)  # the library's MTP module: its block's first norm reads h'^k
        out = exercise(module, h_prev, emb)
    hook.remove()
    assert out.shape == (2, 5, 32)
    assert_close(out, seen["x"])


@pytest.mark.exercise("mtp_combine")
def test_mtp_combine_puts_the_embedding_first(exercise):
    module = random_module()
    h_prev, emb = torch.randn(1, 3, 32), torch.randn(1, 3, 32)
    with torch.no_grad():
        module.eh_proj.weight.copy_(torch.cat([torch.eye(32), torch.zeros(32, 32)], dim=1))  # keeps the first half
        first_half = exercise(module, h_prev, emb)
        module.eh_proj.weight.copy_(torch.cat([torch.zeros(32, 32), torch.eye(32)], dim=1))  # the second half
        second_half = exercise(module, h_prev, emb)
        assert_close(first_half, module.enorm(emb))  # the normalized embedding, as the published eh_proj expects
        assert_close(second_half, module.hnorm(h_prev))  # then the normalized state, with its own norm


@pytest.mark.exercise("mtp_combine")
def test_mtp_combine_normalizes_both_inputs(exercise):
    module = random_module()
    h_prev, emb = torch.randn(2, 4, 32), torch.randn(2, 4, 32)
    with torch.no_grad():
        out = exercise(module, h_prev, emb)
        rescaled = exercise(module, 10 * h_prev, 0.5 * emb)  # RMSNorm forgets the scale of each input
    assert_close(rescaled, out, atol=1e-5, rtol=1e-4)


# --- mtp_loss ------------------------------------------------------------------------------------------------------
@pytest.mark.exercise("mtp_loss")
def test_mtp_loss_matches_the_model_loss(exercise):
    model = DeepSeekV3(ModelConfig.preset("toy", **TINY, n_mtp_modules=2, mtp_loss_weight=0.3)).eval()
    x = torch.randint(0, 264, (2, 12))
    targets = torch.randint(0, 264, (2, 12))
    targets[0, :4] = -100  # a masked prompt
    targets[1, 9:] = -100
    with torch.no_grad():
        _, mtp_logits = model(x, return_mtp=True)
        _, parts = model.loss(x, targets)
        out = exercise(mtp_logits, targets, 0.3)
    assert out.dim() == 0
    assert out.item() == pytest.approx(0.3 * parts["mtp"], rel=1e-5)


@pytest.mark.exercise("mtp_loss")
def test_mtp_loss_shifts_targets_by_the_depth(exercise):
    """Depth k's logits at position i put all their mass on targets[i + k]: the loss is ~0, and any other shift
    would pay about 20 nats per position."""
    targets = torch.randint(0, 7, (2, 9))
    logits = []
    for k in (1, 2):
        shifted = targets[:, k:]  # [2, 9-k]
        logits.append(torch.full((2, 9 - k, 7), -10.0).scatter(-1, shifted[..., None], 10.0))
    out = exercise(logits, targets, 1.0)
    assert out.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.exercise("mtp_loss")
def test_mtp_loss_ignores_masked_targets_and_empty_depths(exercise):
    torch.manual_seed(1)
    logits = [torch.randn(1, 5, 4, requires_grad=True), torch.randn(1, 4, 4, requires_grad=True)]
    targets = torch.tensor([[2, 0, 3, 1, 1, -100]])  # depth 2 grades positions i with targets[i + 2]
    log_p1 = logits[0][0].log_softmax(-1)  # depth 1 at i grades targets[i + 1] = 0, 3, 1, 1, (-100)
    log_p2 = logits[1][0].log_softmax(-1)  # depth 2 at i grades targets[i + 2] = 3, 1, 1, (-100)
    expected1 = -(log_p1[0, 0] + log_p1[1, 3] + log_p1[2, 1] + log_p1[3, 1]) / 4
    expected2 = -(log_p2[0, 3] + log_p2[1, 1] + log_p2[2, 1]) / 3
    out = exercise(logits, targets, 0.1)
    # the mean of the two depths' means (pooling the 7 positions would weigh depth 1 more)
    assert out.item() == pytest.approx(0.1 * (expected1 + expected2).item() / 2, rel=1e-5)
    out.backward()
    assert logits[0].grad[0, 4].abs().sum() == 0  # the ignored position gets no gradient
    # depth 1 grades only position 0 (token 0); depth 2 has no target left and stays out of the mean
    none_left = exercise(logits, torch.tensor([[2, 0, -100, -100, -100, -100]]), 1.0)  # depth 1 has 0; depth 2 none
    expected = -logits[0][0, 0].log_softmax(-1)[0]
    assert none_left.item() == pytest.approx(expected.item(), rel=1e-5)
    assert exercise(logits, torch.tensor([[2, -100, -100, -100, -100, -100]]), 1.0) is None


@pytest.mark.exercise("mtp_loss")
def test_mtp_loss_of_sequences_shorter_than_a_depth(exercise):
    targets = torch.tensor([[1, 2]])
    logits = [torch.zeros(1, 1, 3), torch.zeros(1, 0, 3)]  # T = 2: depth 2 has no position at all
    assert exercise(logits, targets, 1.0).item() == pytest.approx(math.log(3), rel=1e-6)


# --- greedy_accept -------------------------------------------------------------------------------------------------
def one_hot_logits(argmax: list[int], V: int = 6) -> torch.Tensor:
    return torch.full((len(argmax), V), -1.0).scatter(-1, torch.tensor(argmax)[:, None], 1.0)


@pytest.mark.exercise("greedy_accept")
def test_greedy_accept_hand_examples(exercise):
    logits = one_hot_logits([4, 2, 5])  # the main model's argmax after 0, 1 and 2 drafts
    assert exercise(logits, torch.tensor([4, 2])) == (2, 5)  # both pass: the bonus token follows
    assert exercise(logits, torch.tensor([4, 0])) == (1, 2)  # the second fails: its correction follows
    assert exercise(logits, torch.tensor([1, 2])) == (0, 4)  # a match after a mismatch does not count
    assert exercise(logits[:1], torch.tensor([], dtype=torch.long)) == (0, 4)  # no draft: a plain decoding step
    n, token = exercise(logits, torch.tensor([4, 2]))
    assert type(n) is int and type(token) is int


@pytest.mark.exercise("greedy_accept")
def test_greedy_accept_matches_the_library(exercise):
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        g = int(torch.randint(1, 4, (), generator=generator))
        logits = torch.randn(g + 1, 5, generator=generator)
        drafts = torch.where(torch.rand(g, generator=generator) < 0.6, logits[:-1].argmax(-1),
                             torch.randint(0, 5, (g,), generator=generator))
        accepted, following = verify_greedy(logits[None], drafts[None])
        assert exercise(logits, drafts) == (int(accepted), int(following))


# --- sampled_accept ------------------------------------------------------------------------------------------------
P = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
Q = torch.tensor([0.1, 0.2, 0.3, 0.2, 0.2])  # proposes token 4, which p never emits; sum of min(p, q) = 0.5


def emitted_tokens(exercise, p, q, N: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run N rounds with drafts drawn from q; (n accepted [N], next_token [N], drafts [N, g])."""
    generator = torch.Generator().manual_seed(seed)
    drafts = torch.stack([torch.multinomial(q, N, replacement=True, generator=generator) for q in q]).T  # [N, g]
    results = [exercise(p, q, d, generator) for d in drafts]
    return torch.tensor([n for n, _ in results]), torch.tensor([t for _, t in results]), drafts


def assert_distributed_as(tokens: torch.Tensor, p: torch.Tensor) -> None:
    """Each token's frequency within 5 standard deviations of its probability (and 0 where p is 0)."""
    N = len(tokens)
    freq = torch.bincount(tokens, minlength=len(p)).float() / N
    allowed = 5 * (p * (1 - p) / N).sqrt() + 1e-9
    assert ((freq - p).abs() <= allowed).all(), f"frequencies {freq.tolist()} against p = {p.tolist()}"


@pytest.mark.exercise("sampled_accept")
def test_sampled_accept_emits_p_whatever_q(exercise):
    n, following, drafts = emitted_tokens(exercise, torch.stack([P, P.roll(1)]), Q[None], 4000)
    first = torch.where(n > 0, drafts[:, 0], following)  # the round's first token: an accepted draft or a residual
    assert_distributed_as(first, P)
    assert n.float().mean().item() == pytest.approx(torch.minimum(P, Q).sum().item(), abs=0.03)
    assert_distributed_as(following[n == 1], P.roll(1))  # after the only draft passed: the bonus row


@pytest.mark.exercise("sampled_accept")
def test_sampled_accept_two_drafts(exercise):
    p = torch.stack([P, P.flip(0), torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0])])
    q = torch.stack([Q, Q.flip(0)])
    n, following, drafts = emitted_tokens(exercise, p, q, 4000, seed=1)
    assert set(n.tolist()) == {0, 1, 2}
    second = torch.where(n[n > 0] > 1, drafts[n > 0, 1], following[n > 0])  # the second token, where there is one
    assert_distributed_as(second, P.flip(0))
    assert (following[n == 2] == 2).all()  # the bonus row is one-hot


@pytest.mark.exercise("sampled_accept")
def test_sampled_accept_edge_cases(exercise):
    generator = torch.Generator().manual_seed(0)
    uniform = torch.full((3, 4), 0.25)
    for d in range(4):  # p == q: every draft passes
        assert exercise(uniform, uniform[:2], torch.tensor([d, 3 - d]), generator)[0] == 2
    p = torch.tensor([[0.0, 0.6, 0.4, 0.0], [0.25] * 4])
    q = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    for _ in range(50):
        n, token = exercise(p, q, torch.tensor([0]), generator)  # p(0) = 0: always rejected
        assert n == 0 and token in (1, 2)  # the residual max(0, p - q) = [0, 0.1, 0.4, 0]: never 0 or 3
        n, token = exercise(p, q, torch.tensor([1]), generator)
        assert n == 1 or token == 2  # a rejected 1 is followed by 2, the only token with p > q
