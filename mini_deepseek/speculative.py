"""Speculative decoding with the model's own MTP modules as the draft (DeepSeek-V3 section 5.4.3).

The MTP modules were trained to predict the tokens after the next one, so at inference they can propose them:

    draft   module k reads h^{k-1} and the token before the one it proposes, and drafts d_k (k = 1..D, chained:
            module 2 reads module 1's state and d_1, as in training, mtp.py), each module over its own KV cache;
    verify  one forward of the main model over [last token, d_1 .. d_D] (D + 1 positions, with the KV cache) gives
            the target distributions p_1 .. p_{D+1} at once;
    accept  the leading drafts the rule below accepts, then one more token from the main model: at the first
            rejected position from the residual distribution, or from p_{D+1} when every draft passed.

Each round costs one main-model forward and yields between 1 and D + 1 tokens. Nothing is lost (Leviathan et al.,
arXiv 2211.17192; Chen et al., arXiv 2302.01318): accepting a draft x ~ q with probability min(1, p(x)/q(x)) and
otherwise sampling from normalize(max(0, p - q)) emits x with probability

    q(x) min(1, p(x)/q(x)) + (1 - sum_y min(p(y), q(y))) (p(x) - min(p(x), q(x))) / (1 - sum_y min(p(y), q(y))) = p(x),

whatever q is. Greedy decoding is the case where p and q put all their mass on their argmax: a draft is accepted
exactly when it is the main model's argmax, so the tokens are those of model.generate (see below on rounding).

temperature and top_p: p is exactly the distribution model.generate samples from, sampling_probs(logits,
temperature, top_p) (softmax of logits / temperature, cut to its top_p nucleus, renormalized). The draft tokens
are sampled from q = sampling_probs of the module's logits with the same temperature and top_p, and the rule uses
that same q: the proof above needs p to be the target's sampling distribution and q the one the draft was actually
drawn from; nothing else. Each keeps its own nucleus (a draft outside p's nucleus has p(x) = 0 and is always
rejected; a token in p's nucleus but not in q's comes from the residual). Cutting q like p only makes q closer to
p, hence more acceptances. Using the raw softmax for p (or the cut one for only one of the two steps) would change
the output distribution.

The caches. The main model's cache is rolled back by not advancing the position: the entries written for rejected
drafts lie beyond the accepted positions, attention only ever reads positions up to the ones it writes
(attention_ops.write_cache returns the filled part), and the next forward overwrites them. Module k at position i
reads h^{k-1}_i and token i + k; its cache entry at i stays valid when all of those tokens are confirmed, so after
a round only the positions whose inputs changed are recomputed, in the same forward that drafts the next token.
(A stale entry never changes the output, only the drafts: tests/test_speculative.py checks that every draft is what
the training forward of the modules predicts from the same tokens.)

Batches: rows decode in lock step. Each row runs the accept rule on its own; the round keeps the smallest number
of accepted drafts j over the rows, and each row's token after them is its own accepted draft d_{j+1} where it
accepted more, else its correction token. Every token so emitted is still distributed as p given its prefix (a
truncation decided by other rows, or by the row's earlier acceptances, does not bias the token at the cut), so
each row is lossless; the batch gains only as many tokens per round as its least lucky row.

Rounding: verifying D + 1 positions in one forward multiplies matrices of another shape than one-token decoding,
and float32 results can differ in the last bits. Greedy speculative decoding therefore equals model.generate
token for token except where two logits tie to within rounding (tests/test_speculative.py checks equality on
seeded models, naive and absorbed MLA, D = 1 and 2).
"""

from __future__ import annotations

import time

import torch

from .model import DeepSeekV3, check_finite, sample_next_token, sampling_probs


def verify_greedy(target_logits: torch.Tensor, drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The accept rule at temperature 0. target_logits [B, g+1, vocab]: the main model at the last token and at the
    g drafts; drafts [B, g]. Returns (accepted [B]: how many leading drafts equal the main model's argmax, next [B]:
    the main model's argmax right after them, the correction or, when all g passed, the bonus token)."""
    target = target_logits.argmax(dim=-1)  # [B, g+1]
    accepted = (drafts == target[:, :-1]).long().cumprod(dim=1).sum(dim=1)  # [B]: leading matches
    return accepted, target.gather(1, accepted[:, None]).squeeze(1)


def verify_sampled(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The accept rule of speculative sampling. p [B, g+1, vocab]: the target distributions at the g drafted
    positions and the one after them; q [B, g, vocab]: the distributions the drafts [B, g] were sampled from.

    Draft k passes with probability min(1, p_k(d_k) / q_k(d_k)); the first failure stops the row. Returns (accepted
    [B]: leading drafts that passed, next [B]: a token from normalize(max(0, p - q)) at the first failed position, or
    from p_{g+1} when all g passed)."""
    B, g = drafts.shape
    accepted = torch.zeros(B, dtype=torch.long, device=drafts.device)
    if g:
        p_draft = p[:, :g].gather(-1, drafts[..., None]).squeeze(-1)  # [B, g]: p_k(d_k)
        q_draft = q.gather(-1, drafts[..., None]).squeeze(-1)  # [B, g]: q_k(d_k) > 0, since d_k was drawn from q_k
        u = torch.rand(B, g, generator=generator, device=p.device)
        passed = u * q_draft < p_draft  # u < p/q without dividing: probability min(1, p/q)
        accepted = passed.long().cumprod(dim=1).sum(dim=1)  # [B]
    rows = torch.arange(B, device=p.device)
    q_after = torch.cat([q, q.new_zeros(B, 1, q.shape[-1])], dim=1)  # no draft after the last one: q = 0 there
    residual = (p[rows, accepted] - q_after[rows, accepted]).clamp_min(0)  # [B, vocab]; = p after the last draft
    # p == q leaves no residual mass; a rejection then has probability 0 and only rounding gets here: sample p.
    empty = residual.sum(dim=-1, keepdim=True) <= 0
    residual = torch.where(empty, p[rows, accepted], residual)
    return accepted, torch.multinomial(residual, 1, generator=generator).squeeze(1)


@torch.no_grad()
def speculative_generate(model: DeepSeekV3, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                         top_p: float = 1.0, generator: torch.Generator | None = None,
                         n_draft: int | None = None) -> tuple[torch.Tensor, dict]:
    """Append max_new_tokens to input_ids [B, T] as model.generate does (greedy at temperature 0, else nucleus
    sampling), drafting with the model's MTP modules and verifying with one main-model forward per round.

    The rows of a batch are prompts of one length (no padding mask: left-padded batches go to model.generate), and
    every row gets exactly max_new_tokens (no stop token). n_draft: drafts per round, D (default: every MTP module;
    fewer uses the first modules only). Returns (tokens
    [B, T + max_new_tokens], stats) with stats:
        "acceptance"         per draft depth k, the share of drafts d_k accepted among those verified (d_k is
                             verified when d_1 .. d_{k-1} were accepted); NaN for a depth never verified
        "tokens_per_forward" new tokens per main-model forward, prefill included (model.generate: 1.0)
        "tokens_per_s"       new tokens of all rows per second of wall clock, prefill included
    and the counts behind them: "proposed" and "accepted" per depth, "forwards", "new_tokens", "seconds", and
    "draft_depth" [B, max_new_tokens]: for each new token, the depth k of the accepted draft it is, or 0 for a token
    the main model chose itself (after the prefill, a correction or a bonus token).
    """
    started = time.perf_counter()
    if not isinstance(model, DeepSeekV3):
        raise TypeError(f"speculative_generate needs a mini_deepseek DeepSeekV3, got {type(model).__name__}")
    if not model.mtp:
        raise ValueError("speculative_generate drafts with the model's MTP modules and this model has none "
                         "(ModelConfig.n_mtp_modules = 0)")
    n_draft = len(model.mtp) if n_draft is None else n_draft
    if isinstance(n_draft, bool) or not isinstance(n_draft, int) or not 1 <= n_draft <= len(model.mtp):
        raise ValueError(f"n_draft = {n_draft!r}: must be an integer from 1 to the model's {len(model.mtp)} MTP "
                         "module(s)")
    B, T = model.check_generation(input_ids, max_new_tokens, temperature, top_p, "speculative_generate")
    was_training = model.training
    if was_training:  # (Module.train walks every submodule: a cost per call worth skipping when already in eval)
        model.eval()
    try:
        tokens, counts = _decode(model, input_ids, max_new_tokens, temperature, top_p, generator, n_draft)
    finally:
        if was_training:
            model.train()
    seconds = time.perf_counter() - started
    proposed, accepted = counts["proposed"], counts["accepted"]
    return tokens, {
        "acceptance": [a / p if p else float("nan") for a, p in zip(accepted, proposed, strict=True)],
        "tokens_per_forward": max_new_tokens / counts["forwards"] if counts["forwards"] else float("nan"),
        "tokens_per_s": B * max_new_tokens / seconds,
        "proposed": proposed, "accepted": accepted, "forwards": counts["forwards"],
        "new_tokens": max_new_tokens, "seconds": seconds, "draft_depth": counts["draft_depth"][:, T:],
    }


def _decode(model: DeepSeekV3, input_ids: torch.Tensor, max_new_tokens: int, temperature: float, top_p: float,
            generator: torch.Generator | None, n_draft: int) -> tuple[torch.Tensor, dict]:
    """speculative_generate's loop, on checked arguments."""
    B, T = input_ids.shape
    total = T + max_new_tokens
    depth = torch.zeros(B, total, dtype=torch.long, device=input_ids.device)  # which draft depth emitted each token
    counts = {"proposed": [0] * n_draft, "accepted": [0] * n_draft, "forwards": 0, "draft_depth": depth}
    if max_new_tokens == 0:
        return input_ids, counts
    device, w = input_ids.device, model.embed_tokens.weight
    modules = list(model.mtp)[:n_draft]
    # tokens[:, :n] are committed; in a round, the drafts d_1..d_g are written after them (at n .. n+g-1) until
    # verified. The main model has processed positions 0 .. n-2: token n-1 enters with the next verification.
    tokens = input_ids.new_zeros(B, total)
    tokens[:, :T] = input_ids
    main_cache = model.new_cache(B, total)
    mtp_caches = [m.self_attn.new_cache(B, total, w.dtype, device) for m in modules]
    hidden = w.new_zeros(n_draft, B, total, model.config.dim)  # hidden[k]: h^k per position, read by module k+1
    valid = [0] * n_draft  # module k+1's cache entries (and hidden[k+1]) are valid at positions < valid[k]

    h = model.hidden_states(input_ids, 0, main_cache)  # prefill: [B, T, dim]
    hidden[0, :, :T] = h
    tokens[:, T] = sample_next_token(model.lm_head(h).float()[:, -1], temperature, top_p, generator)
    n, counts["forwards"] = T + 1, 1
    while n < total:
        g = min(n_draft, total - n - 1)  # drafts this round: the round may emit g + 1 tokens
        q = []  # the draft distributions (sampling only)
        for k in range(1, g + 1):
            # module k at positions valid..n-2 (the stale ones and the newest): h^{k-1}_i and token i + k; the
            # newest position n-2 reads token n-2+k, which is d_{k-1} for k > 1, and drafts d_k = token n-1+k
            start, end = valid[k - 1], n - 1
            h_k = modules[k - 1](hidden[k - 1, :, start:end], model.embed_tokens(tokens[:, start + k:end + k]),
                                 model.rope(start, end, device), start_pos=start, cache=mtp_caches[k - 1])
            if k < n_draft:
                hidden[k, :, start:end] = h_k
            logits = model.lm_head(h_k[:, -1]).float()  # [B, vocab]
            check_finite(logits)
            if temperature == 0:
                draft = logits.argmax(dim=-1)
            else:
                q.append(sampling_probs(logits, temperature, top_p))
                draft = torch.multinomial(q[-1], 1, generator=generator).squeeze(1)
            tokens[:, n - 1 + k] = draft
        # verify: the main model over [t_{n-1}, d_1 .. d_g] at positions n-1 .. n-1+g, one forward
        h = model.hidden_states(tokens[:, n - 1:n + g], n - 1, main_cache)  # [B, g+1, dim]
        hidden[0, :, n - 1:n + g] = h
        target_logits = model.lm_head(h).float()  # [B, g+1, vocab]
        check_finite(target_logits)
        drafts = tokens[:, n:n + g]
        if temperature == 0:
            accepted, correction = verify_greedy(target_logits, drafts)
        else:
            p = sampling_probs(target_logits, temperature, top_p)
            accepted, correction = verify_sampled(p, torch.stack(q, dim=1) if q else p[:, :0], drafts, generator)
        per_count = torch.bincount(accepted, minlength=g + 1).tolist()  # rows that accepted 0 .. g drafts
        for k in range(1, g + 1):
            counts["proposed"][k - 1] += sum(per_count[k - 1:])  # d_k verified: d_1 .. d_{k-1} accepted
            counts["accepted"][k - 1] += sum(per_count[k:])
        j = next(i for i, c in enumerate(per_count) if c)  # the fewest drafts any row accepted
        depth[:, n:n + j] = torch.arange(1, j + 1, device=depth.device)
        if j < g:  # rows that accepted more keep their accepted d_{j+1}
            correction = torch.where(accepted > j, drafts[:, j], correction)
            depth[:, n + j] = torch.where(accepted > j, j + 1, 0)
        tokens[:, n + j] = correction  # tokens n .. n+j-1 hold the drafts all rows accepted
        # Module k's entry at i read tokens up to i + k. Tokens up to n + j - 1 are what the modules read; token
        # n + j was d_{j+1} when they read it and is now the correction (unless every draft passed): the entries
        # that read it, i + k = n + j, are stale and recomputed next round with the ones after them.
        for k in range(1, g + 1):
            valid[k - 1] = min(n - 1, n + j - k)
        n += j + 1
        counts["forwards"] += 1
    return tokens, counts


def measure_speedup(model: DeepSeekV3, prompts: list[torch.Tensor], max_new_tokens: int, n_draft: int | None = None,
                    repeats: int = 3, temperature: float = 0.0, seed: int = 0) -> dict:
    """Decoding of each prompt [1, T] by model.generate and by speculative_generate, timed in turns (plain,
    speculative, plain, ...) so that both meet the same load of a shared machine; `repeats` passes over the prompts.
    Greedy at temperature 0; else both sample with generators seeded from `seed` (they draw different tokens).

    Returns {"plain_tokens_per_s", "speculative_tokens_per_s", "speedup"} (each pass's total tokens over its total
    time; the median pass), "tokens_per_forward" and "acceptance" (per depth, over all prompts), "same_tokens"
    (greedy: whether every speculative output equalled model.generate's; None when sampling) and "passes" (the
    speed-up of every pass).
    """
    if repeats < 1 or not prompts:
        raise ValueError(f"need at least one prompt and one repeat, got {len(prompts)} and {repeats}")
    speedups, plain_rates, fast_rates, same = [], [], [], True
    depths = len(model.mtp) if n_draft is None else n_draft
    proposed, accepted, forwards = [0] * depths, [0] * depths, 0
    for _ in range(repeats):
        plain_s = fast_s = 0.0
        for i, prompt in enumerate(prompts):
            generators = [torch.Generator(prompt.device).manual_seed(seed + i) for _ in range(2)]
            start = time.perf_counter()
            expected = model.generate(prompt, max_new_tokens, temperature, generator=generators[0])
            plain_s += time.perf_counter() - start
            tokens, stats = speculative_generate(model, prompt, max_new_tokens, temperature, n_draft=n_draft,
                                                 generator=generators[1])
            fast_s += stats["seconds"]
            same &= torch.equal(tokens, expected)
            proposed = [a + b for a, b in zip(proposed, stats["proposed"], strict=True)]
            accepted = [a + b for a, b in zip(accepted, stats["accepted"], strict=True)]
            forwards += stats["forwards"]
        n_tokens = sum(p.shape[0] for p in prompts) * max_new_tokens
        plain_rates.append(n_tokens / plain_s)
        fast_rates.append(n_tokens / fast_s)
        speedups.append(plain_s / fast_s)
    middle = sorted(range(repeats), key=speedups.__getitem__)[repeats // 2]  # the median pass
    return {
        "plain_tokens_per_s": plain_rates[middle], "speculative_tokens_per_s": fast_rates[middle],
        "speedup": speedups[middle], "passes": speedups,
        "tokens_per_forward": repeats * sum(p.shape[0] for p in prompts) * max_new_tokens / forwards,
        "acceptance": [a / p if p else float("nan") for a, p in zip(accepted, proposed, strict=True)],
        "same_tokens": same if temperature == 0 else None,
    }
