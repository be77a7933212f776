"""Speculative decoding with the MTP modules (mini_deepseek/speculative.py): greedy equals model.generate token for
token, sampling keeps the target distribution (chi-square against the exact distribution of a tiny model), the
caches roll back, and bad input gets a clear error."""

import itertools

import pytest
import torch
from test_model import TINY, tiny_model

import mini_deepseek.speculative as speculative
from mini_deepseek import DeepSeekV3, ModelConfig, speculative_generate
from mini_deepseek.model import sampling_probs


def runs_of_four(B: int, T: int, generator: torch.Generator) -> torch.Tensor:
    """[B, T] token runs a, a+1, a+2, a+3 with random starts a: the three tokens after a start are predictable,
    the start is not, so a trained draft is accepted often but not always."""
    starts = torch.randint(0, 60, (B, T // 4 + 1, 1), generator=generator)
    return (starts + torch.arange(4)).flatten(1)[:, :T]


@pytest.fixture(scope="module")
def trained():
    """A tiny model with two MTP modules, trained for a few seconds on runs of four tokens."""
    torch.manual_seed(0)
    model = tiny_model(n_layers=2, n_mtp_modules=2).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(30):
        x = runs_of_four(8, 33, generator)
        loss, _ = model.loss(x[:, :-1], x[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.update_routing_bias()
    return model.eval()


# --- greedy: the tokens of model.generate -------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["naive", "absorb"])
@pytest.mark.parametrize("n_draft", [1, 2])
def test_greedy_equals_generate_on_a_trained_model(trained, mode, n_draft):
    trained.set_mla_mode(mode)
    accepted = [0] * n_draft
    for seed in range(3):
        prompt = runs_of_four(1, 9, torch.Generator().manual_seed(100 + seed))
        expected = trained.generate(prompt, 40)
        tokens, stats = speculative_generate(trained, prompt, 40, n_draft=n_draft)
        assert torch.equal(tokens, expected), seed
        accepted = [a + b for a, b in zip(accepted, stats["accepted"], strict=True)]
        assert stats["forwards"] * stats["tokens_per_forward"] == pytest.approx(40)
        assert 1 <= stats["tokens_per_forward"] <= n_draft + 1
        # every round emits its accepted drafts, then one token of the main model's own
        depth = stats["draft_depth"][0]
        assert int((depth == 0).sum()) == stats["forwards"] and int((depth > 0).sum()) == sum(stats["accepted"])
        assert [int((depth == k).sum()) for k in range(1, n_draft + 1)] == stats["accepted"]
    assert all(a > 20 for a in accepted), accepted  # the trained drafts are good: most rounds gain n_draft + 1


@pytest.mark.parametrize("mode", ["naive", "absorb"])
def test_greedy_equals_generate_whichever_drafts_fail(trained, mode):
    """A forward hook scrambles 30% of the MTP modules' output states, so drafts fail at random depths: every
    pattern of acceptance (none, some, all) and every rollback of the caches occurs; the tokens must not change."""
    trained.set_mla_mode(mode)
    noise = torch.Generator().manual_seed(0)

    def scramble(module, inputs, out):
        lost = torch.rand(out.shape[:-1] + (1,), generator=noise) < 0.3  # [B, n, 1]
        return torch.where(lost, 3 * torch.randn(out.shape, generator=noise), out)

    hooks = [module.register_forward_hook(scramble) for module in trained.mtp]
    try:
        for seed in range(3):
            prompt = runs_of_four(1, 9, torch.Generator().manual_seed(200 + seed))
            tokens, stats = speculative_generate(trained, prompt, 48)
            assert torch.equal(tokens, trained.generate(prompt, 48)), seed
            assert all(0 < a < p for a, p in zip(stats["accepted"], stats["proposed"], strict=True)), stats
    finally:
        for hook in hooks:
            hook.remove()



@pytest.mark.parametrize("mode", ["naive", "absorb"])
def test_drafts_are_what_the_training_forward_predicts(trained, mode):
    """The modules' caches roll back: every draft whose inputs were confirmed is what model(x, return_mtp=True)
    predicts at that position from the final tokens. A stale cache entry (a module that read a rejected draft)
    leaves the output right, greedy, but changes later drafts; this is where it shows."""
    trained.set_mla_mode(mode)
    records = []  # (depth k, last position p, the module's state there) for every drafting call

    def record(k):
        def hook(module, args, kwargs, out):
            records.append((k, kwargs["start_pos"] + args[0].shape[1] - 1, out[0, -1].clone()))
        return hook

    compared = rejected = 0
    for seed in range(3):
        records.clear()
        prompt = torch.randint(0, 264, (1, 9), generator=torch.Generator().manual_seed(seed))
        hooks = [m.register_forward_hook(record(k), with_kwargs=True) for k, m in enumerate(trained.mtp, start=1)]
        try:
            tokens, stats = speculative_generate(trained, prompt, 48)
        finally:
            for hook in hooks:
                hook.remove()
        rejected += stats["proposed"][0] - stats["accepted"][0]
        _, mtp_logits = trained(tokens, return_mtp=True)  # depth k at p predicts token p + k + 1
        rounds = {}
        for k, p, state in records:  # one round: module k = 1 .. g at the same last position p = n - 2
            rounds.setdefault(p, {})[k] = trained.lm_head(state).float()
        for p, by_depth in rounds.items():
            for k, logits in by_depth.items():
                drafts = [int(by_depth[i].argmax()) for i in range(1, k)]  # d_1 .. d_{k-1}, read by module k
                if drafts == tokens[0, p + 2:p + k + 1].tolist() and p < mtp_logits[k - 1].shape[1]:
                    torch.testing.assert_close(logits, mtp_logits[k - 1][0, p], atol=1e-4, rtol=0)
                    compared += k > 1
    assert rejected > 0 and compared > 20, (rejected, compared)  # rollbacks happened, chained drafts were checked

@pytest.mark.parametrize("mode", ["naive", "absorb"])
@pytest.mark.parametrize("n_mtp", [1, 2])
def test_greedy_equals_generate_on_random_models(mode, n_mtp):
    for seed in range(2):
        torch.manual_seed(seed)
        model = tiny_model(mla_mode=mode, n_mtp_modules=n_mtp)
        prompt = torch.randint(0, 264, (1, 7))
        tokens, stats = speculative_generate(model, prompt, 30)
        assert torch.equal(tokens, model.generate(prompt, 30))
        assert len(stats["acceptance"]) == n_mtp and stats["forwards"] >= 30 / (n_mtp + 1)


def test_greedy_batch_equals_generate_row_by_row(trained):
    trained.set_mla_mode("absorb")
    prompts = runs_of_four(3, 10, torch.Generator().manual_seed(7))
    prompts[1, 5:] = torch.tensor([3, 40, 41, 9, 9])  # rows that accept different numbers of drafts
    tokens, stats = speculative_generate(trained, prompts, 25)
    assert torch.equal(tokens, trained.generate(prompts, 25))
    for row in range(3):
        assert torch.equal(tokens[row:row + 1], trained.generate(prompts[row:row + 1], 25))
    assert stats["tokens_per_s"] > 0 and stats["seconds"] > 0


def test_edges_of_the_horizon(trained):
    prompt = runs_of_four(1, 5, torch.Generator().manual_seed(3))
    tokens, stats = speculative_generate(trained, prompt, 0)
    assert torch.equal(tokens, prompt) and stats["forwards"] == 0
    for n in (1, 2, 3):  # too few new tokens for a full round of drafts: fewer drafts, never past the end
        tokens, stats = speculative_generate(trained, prompt, n)
        assert torch.equal(tokens, trained.generate(prompt, n))
    cfg = trained.config
    long_prompt = runs_of_four(1, cfg.max_seq_len - 6, torch.Generator().manual_seed(4))
    tokens, _ = speculative_generate(trained, long_prompt, 6)  # up to the last position of the RoPE table
    assert torch.equal(tokens, trained.generate(long_prompt, 6))


def test_training_mode_is_restored(trained):
    trained.train()
    speculative_generate(trained, torch.tensor([[1, 2, 3]]), 4)
    assert trained.training
    trained.eval()


# --- the pieces it is built from ----------------------------------------------------------------------------------
def test_hidden_states_are_what_the_head_reads():
    model = tiny_model(n_mtp_modules=1)
    x = torch.randint(0, 264, (2, 11))
    torch.testing.assert_close(model.lm_head(model.hidden_states(x)).float(), model(x))
    cache = model.new_cache(2, 11)
    first, rest = model.hidden_states(x[:, :6], 0, cache), model.hidden_states(x[:, 6:], 6, cache)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), model.hidden_states(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["naive", "absorb"])
def test_mtp_module_with_a_cache_equals_the_training_forward(mode):
    """The drafting path (module k over its own KV cache, a few positions at a time) computes what training does
    (every position at once): the MTP logits of model(x, return_mtp=True)."""
    model = tiny_model(n_mtp_modules=2, mla_mode=mode)
    x = torch.randint(0, 264, (2, 12))
    _, mtp_logits = model(x, return_mtp=True)
    h = model.hidden_states(x)  # h^0
    for k, module in enumerate(model.mtp, start=1):
        n = 12 - k
        cache = module.self_attn.new_cache(2, n, torch.float32)
        pieces = []
        for start, end in ((0, 5), (5, 6), (6, n)):  # a prefill, one position, the rest
            pieces.append(module(h[:, start:end], model.embed_tokens(x[:, start + k:end + k]),
                                 model.rope(start, end, x.device), start_pos=start, cache=cache))
        h = torch.cat(pieces, dim=1)  # h^k
        torch.testing.assert_close(model.lm_head(h).float(), mtp_logits[k - 1], atol=1e-5, rtol=0)


def test_verify_greedy_accepts_the_leading_matches():
    logits = torch.full((3, 3, 5), -1.0)
    argmax = torch.tensor([[2, 4, 1], [2, 4, 1], [0, 3, 3]])
    logits.scatter_(-1, argmax[..., None], 1.0)
    drafts = torch.tensor([[2, 4], [2, 0], [1, 3]])  # all pass / the second fails / the first fails
    accepted, following = speculative.verify_greedy(logits, drafts)
    assert accepted.tolist() == [2, 1, 0]
    assert following.tolist() == [1, 4, 0]  # the bonus token, then the corrections


def chi_square_p_value(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's test of counts against expected counts; cells expecting fewer than 5 are pooled into one."""
    small = expected < 5
    observed = torch.cat([observed[~small], observed[small].sum()[None]])
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = expected > 0
    stat = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    dof = torch.tensor(float(keep.sum() - 1))
    return torch.special.gammaincc(dof / 2, stat / 2).item()


def test_verify_sampled_emits_the_target_distribution():
    """One position, p and q far apart: the first emitted token (an accepted draft or a residual sample) ~ p."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    q = torch.tensor([0.1, 0.2, 0.3, 0.2, 0.2])  # proposes token 4, which p never emits
    N = 40_000
    generator = torch.Generator().manual_seed(0)
    drafts = torch.multinomial(q, N, replacement=True, generator=generator)[:, None]  # [N, 1]
    p_rows = torch.stack([p, torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0])])[None].expand(N, 2, 5)  # bonus: token 4
    accepted, following = speculative.verify_sampled(p_rows, q[None, None].expand(N, 1, 5), drafts, generator)
    emitted = torch.where(accepted > 0, drafts[:, 0], following)
    assert chi_square_p_value(torch.bincount(emitted, minlength=5).float(), N * p) > 1e-3
    accept_rate = torch.minimum(p, q).sum().item()  # P(accept) = sum_x min(p(x), q(x))
    assert accepted.float().mean().item() == pytest.approx(accept_rate, abs=0.01)
    assert (following[accepted == 1] == 4).all()  # after the only draft passed: sampled from the bonus row


# --- sampling keeps the target distribution -----------------------------------------------------------------------
VOCAB, PROMPT, HORIZON = 4, [1, 3, 0], 4


def sharp_tiny_model(seed: int) -> DeepSeekV3:
    """A 4-token model with large random weights: peaked distributions, and drafts that often disagree with them."""
    cfg = ModelConfig.preset("toy", **{**TINY, "vocab_size": VOCAB, "dim": 32, "n_layers": 2, "max_seq_len": 16,
                                       "n_mtp_modules": 2, "n_routed_experts": 4, "n_expert_groups": 1,
                                       "n_limited_groups": 1})
    torch.manual_seed(seed)
    model = DeepSeekV3(cfg).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(1 + 0.3 * torch.randn_like(param) if "norm" in name else 0.4 * torch.randn_like(param))
    return model


def exact_distribution(model: DeepSeekV3, temperature: float, top_p: float) -> torch.Tensor:
    """P(t_1 .. t_HORIZON | prompt) for every one of the VOCAB^HORIZON continuations, from the model's own logits."""
    continuations = torch.tensor(list(itertools.product(range(VOCAB), repeat=HORIZON)))  # [V^H, H]
    seqs = torch.cat([torch.tensor(PROMPT).expand(len(continuations), -1), continuations], dim=1)
    with torch.no_grad():
        probs = sampling_probs(model(seqs[:, :-1])[:, len(PROMPT) - 1:], temperature, top_p)  # [V^H, H, V]
    return probs.gather(-1, continuations[..., None]).squeeze(-1).prod(dim=1)


def sampled_counts(model: DeepSeekV3, N: int, temperature: float, top_p: float, seed: int = 0):
    prompt = torch.tensor([PROMPT]).expand(N, -1)
    tokens, stats = speculative_generate(model, prompt, HORIZON, temperature, top_p,
                                         generator=torch.Generator().manual_seed(seed))
    index = (tokens[:, len(PROMPT):] * VOCAB ** torch.arange(HORIZON - 1, -1, -1)).sum(dim=1)
    return torch.bincount(index, minlength=VOCAB**HORIZON).float(), stats


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_sampling_matches_the_target_distribution(temperature, top_p):
    model = sharp_tiny_model(0)
    N = 5000  # the wrong rules below fail at this size with p-values under 1e-6
    counts, stats = sampled_counts(model, N, temperature, top_p)
    assert chi_square_p_value(counts, N * exact_distribution(model, temperature, top_p)) > 1e-3
    # the drafts differ from the target often enough that the test exercises rejections and residuals
    assert all(0.1 < a < 0.9 for a in stats["acceptance"]), stats["acceptance"]


def one_row_counts(model: DeepSeekV3, N: int) -> torch.Tensor:
    """Counts of the first two of three new tokens over N calls with batch 1 (the second token is a draft's)."""
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(VOCAB**2)
    for _ in range(N):
        tokens, _ = speculative_generate(model, torch.tensor([PROMPT]), 3, 1.0, 1.0, generator)
        counts[tokens[0, len(PROMPT)] * VOCAB + tokens[0, len(PROMPT) + 1]] += 1
    return counts


def test_sampling_one_row_at_a_time_matches_the_target_distribution():
    model = sharp_tiny_model(0)
    N = 400
    exact = exact_distribution(model, 1.0, 1.0).view(VOCAB**2, -1).sum(dim=1)  # P(first two tokens)
    assert chi_square_p_value(one_row_counts(model, N), N * exact) > 1e-3


RIGHT_RULE = speculative.verify_sampled


def wrong_accept_every_draft(p, q, drafts, generator=None):
    B, g = drafts.shape
    return torch.full((B,), g), torch.multinomial(p[:, -1], 1, generator=generator).squeeze(1)


def wrong_accept_when_p_exceeds_q(p, q, drafts, generator=None):
    """Accepts a draft exactly when p(d) >= q(d) instead of with probability min(1, p(d) / q(d))."""
    B, g = drafts.shape
    p_draft = p[:, :g].gather(-1, drafts[..., None]).squeeze(-1)
    q_draft = q.gather(-1, drafts[..., None]).squeeze(-1)
    accepted = (p_draft >= q_draft).long().cumprod(dim=1).sum(dim=1)
    rows = torch.arange(B)
    q_after = torch.cat([q, q.new_zeros(B, 1, q.shape[-1])], dim=1)
    residual = (p[rows, accepted] - q_after[rows, accepted]).clamp_min(0) + 1e-12
    return accepted, torch.multinomial(residual, 1, generator=generator).squeeze(1)


def wrong_residual_is_p(p, q, drafts, generator=None):
    """Accepts right, but resamples a rejected position from p instead of normalize(max(0, p - q))."""
    accepted, _ = RIGHT_RULE(p, q, drafts, generator)
    following = torch.multinomial(p[torch.arange(len(p)), accepted], 1, generator=generator).squeeze(1)
    return accepted, following


@pytest.mark.parametrize("wrong_rule", [wrong_accept_every_draft, wrong_accept_when_p_exceeds_q, wrong_residual_is_p])
def test_the_distribution_test_catches_a_wrong_rule(monkeypatch, wrong_rule):
    model = sharp_tiny_model(0)
    monkeypatch.setattr(speculative, "verify_sampled", wrong_rule)
    N = 5000
    counts, _ = sampled_counts(model, N, 1.0, 1.0)
    assert chi_square_p_value(counts, N * exact_distribution(model, 1.0, 1.0)) < 1e-6


# --- bad input ----------------------------------------------------------------------------------------------------
def test_bad_input_gets_a_clear_error(trained):
    prompt = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="n_mtp_modules = 0"):
        speculative_generate(tiny_model(n_mtp_modules=0), prompt, 5)
    for n_draft in (0, 3, 1.5, True):
        with pytest.raises(ValueError, match="n_draft"):
            speculative_generate(trained, prompt, 5, n_draft=n_draft)
    for kwargs in (dict(max_new_tokens=-1), dict(temperature=-0.5), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError, match="max_new_tokens >= 0, temperature >= 0 and 0 < top_p <= 1"):
            speculative_generate(trained, prompt, **{"max_new_tokens": 5, **kwargs})
    with pytest.raises(ValueError, match="at least one token"):
        speculative_generate(trained, prompt[:, :0], 5)
    with pytest.raises(ValueError, match="exceed max_seq_len"):
        speculative_generate(trained, prompt, trained.config.max_seq_len)
    with pytest.raises(ValueError, match="integer tensor"):
        speculative_generate(trained, prompt.float(), 5)
    with pytest.raises(ValueError, match="token ids must lie"):
        speculative_generate(trained, prompt + 1000, 5)
    with pytest.raises(TypeError, match="DeepSeekV3"):
        speculative_generate(torch.nn.Linear(2, 2), prompt, 5)


def test_non_finite_logits_raise(trained):
    broken = tiny_model(n_mtp_modules=1)
    with torch.no_grad():
        broken.mtp[0].eh_proj.weight.fill_(float("nan"))  # the draft's logits are NaN, the main model's are fine
    with pytest.raises(RuntimeError, match="not finite"):
        speculative_generate(broken, torch.tensor([[1, 2, 3]]), 5)


def test_measure_speedup_reports_both_decoders(trained):
    prompts = [runs_of_four(1, 6, torch.Generator().manual_seed(s)) for s in (1, 2)]
    greedy = speculative.measure_speedup(trained, prompts, 12, n_draft=2, repeats=1)
    assert greedy["same_tokens"] is True and len(greedy["passes"]) == 1 and len(greedy["acceptance"]) == 2
    assert greedy["speedup"] == pytest.approx(greedy["speculative_tokens_per_s"] / greedy["plain_tokens_per_s"])
    sampled = speculative.measure_speedup(trained, prompts, 12, n_draft=1, repeats=1, temperature=1.0)
    assert sampled["same_tokens"] is None and len(sampled["acceptance"]) == 1
    with pytest.raises(ValueError, match="at least one prompt"):
        speculative.measure_speedup(trained, [], 12)
