import copy
import math

import pytest
import torch

import kernels
from mini_deepseek import DeepSeekV3, ModelConfig
from mini_deepseek import moe as moe_module
from mini_deepseek.block import Block
from mini_deepseek.moe import Gate, RoutedExperts
from mini_deepseek.rope import apply_rotary_emb, precompute_freqs_cis, rope_inv_freq, yarn_ramp_range

TINY = dict(dim=64, n_layers=3, n_dense_layers=1, inter_dim=128, moe_inter_dim=32, n_heads=4, max_seq_len=64,
            q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
            n_routed_experts=8, n_activated_experts=2, n_expert_groups=4, n_limited_groups=2, route_scale=2.5)
VARIANTS = {
    "mla": {}, "mla-noq": dict(q_lora_rank=0), "mla-yarn": dict(rope_factor=4.0, original_seq_len=16),
    "mha": dict(attn_type="mha", head_dim=16), "gqa": dict(attn_type="gqa", n_kv_heads=2, head_dim=16),
    "mqa": dict(attn_type="mqa", head_dim=16),
}


def tiny_model(**changes) -> DeepSeekV3:
    return DeepSeekV3(ModelConfig.preset("toy", **{**TINY, **changes})).eval()


def ids(B=2, T=24, vocab=264):
    return torch.randint(0, vocab, (B, T))


@pytest.mark.parametrize("variant", ["mla", "mla-noq", "mla-yarn"])
def test_absorbed_mla_equals_naive(variant):
    model = tiny_model(**VARIANTS[variant])
    x = ids(T=40)
    naive = model(x)
    model.set_mla_mode("absorb")
    absorbed = model(x)
    assert torch.allclose(naive, absorbed, atol=1e-5, rtol=0), (naive - absorbed).abs().max()


def test_auto_mode_caches_the_latent_prefills_naive_and_decodes_absorbed():
    """The default mla_mode "auto": the cache holds the latent; a prefill (start 0) and a forward without a cache
    run the naive path, later cached steps (decoding) the absorbed one; set_mla_mode reaches the MTP modules."""
    model = tiny_model(n_mtp_modules=1)
    assert model.config.mla_mode == "auto"
    x = ids(T=10)
    auto_cache = model.new_cache(2, 10)
    assert [list(layer) for layer in auto_cache] == [["latent"]] * 3
    prefill = model(x[:, :9], cache=auto_cache)
    after_prefill = [{name: t.clone() for name, t in layer.items()} for layer in auto_cache]
    step, full = model(x[:, 9:], start_pos=9, cache=auto_cache), model(x)
    model.set_mla_mode("absorb")
    absorb_cache = model.new_cache(2, 10)
    absorbed_prefill = model(x[:, :9], cache=absorb_cache)
    assert torch.equal(step, model(x[:, 9:], start_pos=9, cache=after_prefill))  # decoding: the absorbed path
    assert torch.equal(after_prefill[0]["latent"][:, :, :9], absorb_cache[0]["latent"][:, :, :9])  # latent cached
    model.set_mla_mode("naive")
    assert torch.equal(prefill, model(x[:, :9])) and torch.equal(full, model(x))  # prefill, no cache: naive
    assert not torch.equal(prefill, absorbed_prefill)  # two different paths (equal up to rounding)
    assert [b.self_attn.mode for b in [*model.layers, *model.mtp]] == ["naive"] * 4
    with pytest.raises(ValueError, match="build the cache after set_mla_mode"):
        model(x, cache=auto_cache)  # a latent cache no longer fits the naive path
    with pytest.raises(ValueError, match="mla_mode"):
        model.set_mla_mode("fast")


CACHE_CASES = [(v, "naive") for v in VARIANTS] + [(v, "absorb") for v in VARIANTS if v.startswith("mla")]


@pytest.mark.parametrize("variant, mode", CACHE_CASES)
def test_cached_chunks_equal_full_forward(variant, mode):
    model = tiny_model(mla_mode=mode, **VARIANTS[variant])
    x = ids(T=30)
    full = model(x)
    cache = model.new_cache(batch_size=2, max_len=30)
    pieces = [model(x[:, :17], cache=cache), model(x[:, 17:18], start_pos=17, cache=cache),
              model(x[:, 18:], start_pos=18, cache=cache)]
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["mla", "mla-noq", "mla-yarn"])
def test_later_start_without_cache_stays_causal_and_absorbed_equals_naive(variant):
    """No cache and start_pos > 0 (recomputing a window that starts later): queries and keys are the same T
    positions, so the mask is the plain causal one in both MLA modes (one rule: the offset is S - T = 0)."""
    model = tiny_model(**VARIANTS[variant])
    x = ids(T=12)
    y = x.clone()
    y[:, 5] = (y[:, 5] + 1) % 264
    out = {}
    for mode in ("naive", "absorb"):
        model.set_mla_mode(mode)
        out[mode], out[mode + "-changed"] = model(x, start_pos=20), model(y, start_pos=20)
    assert torch.allclose(out["naive"], out["absorb"], atol=1e-5, rtol=0), (out["naive"] - out["absorb"]).abs().max()
    for mode in ("naive", "absorb"):  # changing token 5 changes nothing before it
        assert torch.allclose(out[mode][:, :5], out[mode + "-changed"][:, :5], atol=1e-5, rtol=0), mode
        assert not torch.allclose(out[mode][:, 5], out[mode + "-changed"][:, 5], atol=1e-5, rtol=0), mode


@pytest.mark.parametrize("variant, mode", [("mla", "naive"), ("mla", "absorb"), ("mla", "auto"), ("mla-yarn", "absorb"),
                                           ("gqa", "naive")])
def test_generate_with_cache_gives_the_same_tokens(variant, mode):
    model = tiny_model(mla_mode=mode, **VARIANTS[variant])
    prompt = ids(T=9)
    with_cache = model.generate(prompt, 20)
    recomputed = model.generate(prompt, 20, use_cache=False)
    assert torch.equal(with_cache, recomputed)
    assert with_cache.shape == (2, 29) and torch.equal(with_cache[:, :9], prompt)
    sampled = [model.generate(prompt, 12, temperature=1.0, top_p=0.9, use_cache=c,
                              generator=torch.Generator().manual_seed(3)) for c in (True, False)]
    assert torch.equal(sampled[0], sampled[1])


def test_model_is_causal_and_mtp_sees_exactly_one_more_token():
    model = tiny_model(n_mtp_modules=2)
    x = ids(B=1, T=20)
    logits, mtp = model(x, return_mtp=True)
    assert logits.shape == (1, 20, 264) and [m.shape for m in mtp] == [(1, 19, 264), (1, 18, 264)]
    y = x.clone()
    y[0, 12] = (y[0, 12] + 1) % 264
    logits2, mtp2 = model(y, return_mtp=True)

    def same(a, b):  # equal up to float rounding (expert batches group different tokens)
        return torch.allclose(a, b, atol=1e-5, rtol=0)

    assert same(logits[:, :12], logits2[:, :12]) and not same(logits[:, 12], logits2[:, 12])
    # depth k at position i reads tokens up to i + k: changing token 12 moves depth 1 from i = 11, depth 2 from 10
    assert same(mtp[0][:, :11], mtp2[0][:, :11]) and not same(mtp[0][:, 11], mtp2[0][:, 11])
    assert same(mtp[1][:, :10], mtp2[1][:, :10]) and not same(mtp[1][:, 10], mtp2[1][:, 10])


def test_loss_combines_lm_mtp_and_balance_terms():
    model = tiny_model().train()
    x = ids(T=16)
    loss, parts = model.loss(x, x.roll(-1, dims=1))
    cfg = model.config
    assert loss.item() == pytest.approx(parts["lm"] + cfg.mtp_loss_weight * parts["mtp"] + parts["seq_balance"], rel=1e-5)
    assert parts["lm"] == pytest.approx(math.log(264), abs=0.2)  # untrained: about uniform
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(g.balance_loss is None for g in model.gates())  # no graph kept alive: the model deep-copies
    copy.deepcopy(model)


def test_targets_of_minus_100_are_ignored_everywhere():
    """A batch whose last 4 targets are -100 gives the loss, every part of it and the routing load of the same batch
    cut before them (positions are causal): the balance losses and the load count no masked position."""
    model = tiny_model(n_mtp_modules=2, seq_aux_alpha=0.1, aux_loss_alpha=0.1).train()
    x = ids(T=16)
    y = x.roll(-1, dims=1)
    masked = y.clone()
    masked[:, -4:] = -100
    loss, parts = model.loss(x, masked)
    loads = model.expert_load()
    cut_loss, cut_parts = model.loss(x[:, :-4], y[:, :-4])
    assert parts.keys() == cut_parts.keys() == {"lm", "mtp", "seq_balance", "expert_balance"}
    for key in parts:
        assert parts[key] == pytest.approx(cut_parts[key], rel=1e-5), key
    assert loss.item() == pytest.approx(cut_loss.item(), rel=1e-5)
    assert torch.equal(loads, model.expert_load())


def test_mtp_depth_without_targets_adds_nothing():
    model = tiny_model(n_mtp_modules=2).train()
    x = ids(T=8)
    targets = torch.full_like(x, -100)
    targets[:, :2] = x[:, 1:3]  # depth 1 reads targets[:, 1:] (one left), depth 2 targets[:, 2:] (none)
    loss, parts = model.loss(x, targets)
    assert math.isfinite(loss.item()) and math.isfinite(parts["mtp"])
    logits, mtp = model(x, return_mtp=True)
    depth1 = torch.nn.functional.cross_entropy(mtp[0][:, 0], targets[:, 1])  # the only MTP target
    assert parts["mtp"] == pytest.approx(depth1.item(), rel=1e-5)
    loss.backward()
    with pytest.raises(ValueError, match="-100"):
        model.loss(x, torch.full_like(x, -100))


def test_one_token_sequences_with_mtp():
    model = tiny_model(n_mtp_modules=2).train()
    x = ids(T=1)
    loss, parts = model.loss(x, x)
    assert "mtp" not in parts and math.isfinite(loss.item())  # no MTP position at all: no MTP term
    loss.backward()
    logits, mtp = model(x, return_mtp=True)
    assert logits.shape == (2, 1, 264) and [m.shape for m in mtp] == [(2, 0, 264), (2, 0, 264)]
    _, mtp = model(ids(T=2), return_mtp=True)
    assert [m.shape for m in mtp] == [(2, 1, 264), (2, 0, 264)]


def test_mtp_reads_the_normalized_main_output_and_chains_through_the_head_norm():
    """h^0 is the main model's output after its final norm (what vLLM feeds the published MTP weights); depth k
    passes on shared_head.norm(TRM_k(.)), the state the shared head reads (mtp.py)."""
    model = tiny_model(n_mtp_modules=2)
    with torch.no_grad():  # distinct norm weights, so that "which norm" matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.5 * torch.randn_like(p))
    x = ids(T=10)
    _, mtp = model(x, return_mtp=True)
    freqs = model.freqs_cis[:10]
    h = model.embed_tokens(x)
    for layer in model.layers:
        h = layer(h, freqs)
    h = model.norm(h)  # h^0
    for k, module in enumerate(model.mtp, start=1):
        n = 10 - k
        mixed = module.eh_proj(torch.cat([module.enorm(model.embed_tokens(x[:, k:])), module.hnorm(h[:, :n])], -1))
        h = module.shared_head.norm(Block.forward(module, mixed, freqs[:n]))  # h^k
        torch.testing.assert_close(mtp[k - 1], model.lm_head(h).float())


def test_training_a_few_steps_learns_a_repeated_sequence():
    model = tiny_model(n_layers=2).train()
    x = torch.arange(32).repeat(2, 1) % 11
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        loss, parts = model.loss(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_routing_bias()
        first = first or parts["lm"]
    assert parts["lm"] < 0.3 * first


def test_bad_inputs_raise_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="token ids"):
        model(torch.tensor([[0, 264]]))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(ids(T=65))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="batch size"):
        model(ids(B=3, T=4), cache=model.new_cache(2, 8))
    with pytest.raises(ValueError, match="KV cache length"):
        model(ids(T=9), cache=model.new_cache(2, 8))
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(ids(T=60), 10)


def test_bfloat16_model_runs_and_keeps_rope_complex():
    model = tiny_model().to(torch.bfloat16)
    out = model(ids(T=12))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert model.freqs_cis.is_complex()


# --- the gate -------------------------------------------------------------------------------------------------
def make_gate(**changes) -> Gate:
    cfg = ModelConfig.preset("toy", **{**TINY, **changes})
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight, std=0.5)
    return gate


def test_bias_changes_selection_but_not_the_gating_weights():
    gate = make_gate(n_expert_groups=1, n_limited_groups=1, route_scale=1.0)
    x = torch.randn(16, 64)
    scores = torch.sigmoid(x @ gate.weight.T)
    gate.e_score_correction_bias[5] = 10.0  # expert 5 always wins selection
    weights, indices = gate(x, seq_len=16)
    assert (indices == 5).any(dim=1).all()
    chosen = scores.gather(1, indices)
    assert torch.allclose(weights, chosen / chosen.sum(1, keepdim=True), atol=1e-6)


def test_group_limited_routing_and_routed_scaling():
    gate = make_gate()  # 8 experts in 4 groups of 2, top-2 groups, top-2 experts, scale 2.5
    gate.e_score_correction_bias.uniform_(-0.5, 0.5)
    x = torch.randn(64, 64)
    weights, indices = gate(x, seq_len=64)
    biased = torch.sigmoid(x @ gate.weight.T) + gate.e_score_correction_bias
    group_score = biased.view(64, 4, 2).topk(2, dim=-1).values.sum(-1)  # both experts of a group
    kept = group_score.topk(2, dim=-1).indices
    assert all(set((indices[t] // 2).tolist()) <= set(kept[t].tolist()) for t in range(64))
    assert torch.allclose(weights.sum(-1), torch.full((64,), 2.5), atol=1e-5)


def test_negative_biased_scores_never_pick_a_masked_group():
    gate = make_gate(n_limited_groups=1)  # both chosen experts must come from the single kept group
    gate.e_score_correction_bias.fill_(-5.0)  # every biased score is negative: a 0-filled mask would win
    _, indices = gate(torch.randn(32, 64), seq_len=32)
    assert torch.equal(indices[:, 0] // 2, indices[:, 1] // 2)


def test_bias_update_moves_towards_balance():
    gate = make_gate(n_expert_groups=1, n_limited_groups=1, bias_update_speed=0.01)
    gate.last_load = torch.tensor([10.0, 0, 0, 0, 0, 0, 0, 6])  # mean 2
    gate.update_bias()
    assert gate.e_score_correction_bias[0] == pytest.approx(-0.01)
    assert gate.e_score_correction_bias[1] == pytest.approx(0.01)
    assert gate.e_score_correction_bias[7] == pytest.approx(-0.01)


@pytest.mark.parametrize("cast", ["to-bfloat16", "to-dtype", "half", "bfloat16"])
def test_routing_bias_stays_float32_when_the_model_is_cast(cast):
    model = tiny_model(bias_update_speed=0.001)
    {"to-bfloat16": lambda: model.to(torch.bfloat16), "to-dtype": lambda: model.to(dtype=torch.bfloat16),
     "half": model.half, "bfloat16": model.bfloat16}[cast]()
    gate = model.gates()[0]
    assert model.embed_tokens.weight.dtype != torch.float32 and gate.weight.dtype != torch.float32
    assert all(g.e_score_correction_bias.dtype == torch.float32 for g in model.gates())
    # both directions of an update of gamma = 0.001 survive around 0.5 (bfloat16 would drop +gamma, double -gamma)
    gate.e_score_correction_bias.fill_(0.5)
    gate.last_load = torch.tensor([0.0, 0, 0, 0, 10, 10, 10, 10])  # mean 5: experts 0-3 under, 4-7 over
    model.update_routing_bias()
    assert torch.allclose(gate.e_score_correction_bias, torch.tensor([0.501] * 4 + [0.499] * 4), atol=1e-6, rtol=0)
    # routing adds the bias in float32: biases 2e-4 apart (all 0.5 in bfloat16) still decide the top-2
    torch.nn.init.zeros_(gate.weight)  # every affinity sigmoid(0) = 0.5
    gate.e_score_correction_bias.copy_(0.5 + 2e-4 * torch.arange(8))
    _, indices = gate(torch.randn(4, 64, dtype=gate.weight.dtype), seq_len=4)
    assert indices.sort(dim=1).values.tolist() == [[6, 7]] * 4


def test_sequence_balance_loss_matches_the_formula():
    gate = make_gate(n_expert_groups=1, n_limited_groups=1, seq_aux_alpha=0.1).train()
    x = torch.randn(2 * 5, 64)
    _, indices = gate(x, seq_len=5)
    s = torch.sigmoid(x @ gate.weight.T).view(2, 5, 8)
    expected = 0.0
    for b in range(2):
        p = (s[b] / s[b].sum(-1, keepdim=True)).mean(0)
        counts = torch.bincount(indices.view(2, 5, 2)[b].flatten(), minlength=8).float()
        f = counts * 8 / (2 * 5)
        expected += 0.1 * (f * p).sum() / 2
    assert gate.balance_loss.item() == pytest.approx(expected.item(), rel=1e-5)
    gate.eval()
    gate(x, seq_len=5)
    assert gate.balance_loss is None


def expected_expert_balance_loss(scores: torch.Tensor, indices: torch.Tensor, alpha: float) -> torch.Tensor:
    """DeepSeek-V2 eqs. 21-23 written out with loops: alpha * sum_i f_i P_i over every token of the batch."""
    N, E = scores.shape
    k = indices.shape[1]
    loss = torch.zeros(())
    for i in range(E):
        f_i = E / (k * N) * sum(int(i in indices[t].tolist()) for t in range(N))
        P_i = sum(scores[t, i] / scores[t].sum() for t in range(N)) / N
        loss = loss + f_i * P_i
    return alpha * loss


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_expert_balance_loss_matches_the_formula(score_func):
    gate = make_gate(score_func=score_func, n_expert_groups=1, n_limited_groups=1, seq_aux_alpha=0.0,
                     aux_loss_alpha=0.1).train()
    x = torch.randn(2 * 5, 64)
    _, indices = gate(x, seq_len=5)
    logits = x @ gate.weight.T
    scores = logits.sigmoid() if score_func == "sigmoid" else logits.softmax(-1)
    expected = expected_expert_balance_loss(scores, indices, 0.1)
    assert gate.expert_balance_loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert gate.balance_loss is None  # the sequence-wise loss is off
    gate.eval()
    gate(x, seq_len=5)
    assert gate.expert_balance_loss is None


def test_expert_balance_loss_is_alpha_at_uniform_affinities_and_pushes_overloaded_experts_down():
    gate = make_gate(n_expert_groups=1, n_limited_groups=1, aux_loss_alpha=1.0).train()
    with torch.no_grad():
        gate.weight.zero_()  # every affinity 0.5: P_i = 1/E for all i
    gate.e_score_correction_bias.copy_(torch.arange(8.0) * 1e-3)  # every token picks experts 7 and 6
    x = torch.randn(16, 64)
    _, indices = gate(x, seq_len=16)
    assert set(indices.flatten().tolist()) == {6, 7}
    # sum_i f_i = E always, so with P_i = 1/E the loss is alpha whatever the load: only P carries the gradient
    assert gate.expert_balance_loss.item() == pytest.approx(1.0, rel=1e-5)

    torch.nn.init.normal_(gate.weight, std=0.5)
    gate.e_score_correction_bias.zero_()
    gate(x, seq_len=16)
    gate.expert_balance_loss.backward()
    load = gate.last_load
    step = -gate.weight.grad  # gradient descent direction on the gate weights
    new_scores = torch.sigmoid(x @ (gate.weight + 1e-2 * step).T)
    old_scores = torch.sigmoid(x @ gate.weight.T)
    moved = (new_scores - old_scores).mean(0)
    busiest, idlest = load.argmax(), load.argmin()
    assert moved[busiest] < moved[idlest]  # the busiest expert's affinity falls relative to the idlest's


def test_model_loss_reports_each_balance_term_by_name():
    model = tiny_model(seq_aux_alpha=0.01, aux_loss_alpha=0.02, bias_update_speed=0.001).train()
    x = ids(T=16)
    loss, parts = model.loss(x, x.roll(-1, dims=1))
    assert set(parts) == {"lm", "mtp", "seq_balance", "expert_balance"}
    total = parts["lm"] + model.config.mtp_loss_weight * parts["mtp"] + parts["seq_balance"] + parts["expert_balance"]
    assert loss.item() == pytest.approx(total, rel=1e-6)
    assert parts["expert_balance"] > 0 and parts["seq_balance"] > 0
    assert all(g.expert_balance_loss is None and g.balance_loss is None for g in model.gates())
    _, parts = tiny_model(seq_aux_alpha=0.0).train().loss(x, x.roll(-1, dims=1))
    assert set(parts) == {"lm", "mtp"}  # a term that is off is absent


def test_the_bias_gets_no_gradient_from_any_loss():
    model = tiny_model(seq_aux_alpha=0.01, aux_loss_alpha=0.02).train()
    biases = [g.e_score_correction_bias for g in model.gates()]
    for bias in biases:
        bias.requires_grad_(True)  # even when asked to track it, nothing differentiable flows through top-k
    x = ids(T=16)
    loss, _ = model.loss(x, x.roll(-1, dims=1))
    loss.backward()
    assert all(bias.grad is None for bias in biases)
    assert "e_score_correction_bias" not in dict(model.named_parameters()).keys()


def test_expert_balance_loss_counts_only_the_counted_tokens():
    gate = make_gate(n_expert_groups=1, n_limited_groups=1, seq_aux_alpha=0.0, aux_loss_alpha=0.1).train()
    x = torch.randn(3 * 6, 64)
    counted = torch.ones(18, dtype=torch.bool)
    counted[4:9] = False  # padding or targets of -100: out of the statistics
    _, indices = gate(x, seq_len=6, counted=counted)
    scores = torch.sigmoid(x @ gate.weight.T)
    expected = expected_expert_balance_loss(scores[counted], indices[counted], 0.1)
    assert gate.expert_balance_loss.item() == pytest.approx(expected.item(), rel=1e-5)
    gate(x, seq_len=6, counted=torch.zeros(18, dtype=torch.bool))
    assert gate.expert_balance_loss.item() == 0  # nothing counted: 0, not 0/0
    gate.expert_balance_loss.backward()
    assert gate.weight.grad.isfinite().all()


def test_sequence_balance_indicator_is_topk_of_the_unbiased_affinities():
    """Eq. 18 of the V3 report: 1(s_{i,t} in TopK(s_t)) of the unbiased affinities, not the biased routing choice."""
    gate = make_gate(seq_aux_alpha=0.1).train()  # 4 groups of 2, top-2 groups
    gate.e_score_correction_bias.copy_(torch.tensor([0.0, 0, 0, 0, 0, 0, 1, 1]))  # routing always picks 6 and 7
    x = torch.randn(2 * 5, 64)
    _, indices = gate(x, seq_len=5)
    assert (indices.sort(dim=1).values == torch.tensor([6, 7])).all()
    s = torch.sigmoid(x @ gate.weight.T).view(2, 5, 8)
    expected = 0.0
    for b in range(2):
        p = (s[b] / s[b].sum(-1, keepdim=True)).mean(0)
        counts = torch.bincount(s[b].topk(2, dim=-1).indices.flatten(), minlength=8).float()
        expected += 0.1 * (counts * 8 / (2 * 5) * p).sum() / 2
    assert gate.balance_loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_sequence_balance_loss_counts_only_the_counted_tokens():
    gate = make_gate(n_expert_groups=1, n_limited_groups=1, seq_aux_alpha=0.1).train()
    x = torch.randn(3 * 6, 64)
    counted = torch.ones(3, 6, dtype=torch.bool)
    counted[0, 4:] = False  # sequence 0: its first 4 tokens count
    counted[2] = False  # sequence 2: none, so it adds nothing to the mean over sequences
    gate(x, seq_len=6, counted=counted.flatten())
    masked_loss, masked_load = gate.balance_loss, gate.last_load
    parts = []
    for rows in (x[:4], x[6:12]):  # the counted tokens of sequences 0 and 1, one sequence each
        _, indices = gate(rows, seq_len=len(rows))
        parts.append((gate.balance_loss, torch.bincount(indices.flatten(), minlength=8).float()))
    assert masked_loss.item() == pytest.approx((parts[0][0] + parts[1][0]).item() / 2, rel=1e-5)
    assert torch.equal(masked_load, parts[0][1] + parts[1][1])
    gate(x, seq_len=6, counted=torch.zeros(18, dtype=torch.bool))
    assert gate.balance_loss.item() == 0 and gate.last_load.sum() == 0  # nothing counted: 0, not 0/0
    gate.balance_loss.backward()
    assert gate.weight.grad.isfinite().all()


def test_softmax_gate_has_no_bias():
    gate = make_gate(score_func="softmax", n_expert_groups=1, n_limited_groups=1)
    assert gate.e_score_correction_bias is None and "e_score_correction_bias" not in gate.state_dict()


@pytest.mark.parametrize("grouped_mm", [True, False])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_grouped_experts_equal_the_kernels_reference_gradients_included(dtype, tol, grouped_mm, monkeypatch):
    """moe.py's grouped experts (the training and decoding path), with torch._grouped_mm and with its padded-bmm
    fallback, against kernels.reference.fused_moe (the kernels' spec: a loop over experts)."""
    if grouped_mm and not moe_module._grouped_mm_fits(torch.zeros(1, 32, dtype=dtype), torch.zeros(8, 16, 32, dtype=dtype)):
        pytest.skip("this torch has no torch._grouped_mm for CPU tensors")
    monkeypatch.setattr(moe_module, "_grouped_mm_fits", lambda rows, w: grouped_mm)
    torch.manual_seed(0)
    experts = RoutedExperts(8, 32, 16)
    torch.nn.init.normal_(experts.w_gate_up, std=0.3)
    torch.nn.init.normal_(experts.w_down, std=0.3)
    experts = experts.to(dtype)
    x = torch.randn(40, 32, dtype=dtype, requires_grad=True)
    weights = torch.rand(40, 2, dtype=dtype, requires_grad=True)
    indices = torch.randn(40, 7).topk(2).indices  # expert 7 gets no token
    grad_out = torch.randn(40, 32, dtype=dtype)
    results = []
    for run in (lambda: experts(x, weights, indices),
                lambda: kernels.reference.fused_moe(x, experts.w_gate_up, experts.w_down, weights, indices,
                                                    compute_dtype=dtype)):
        inputs = [x, weights, experts.w_gate_up, experts.w_down]
        y = run()
        results.append([y, *torch.autograd.grad(y, inputs, grad_out)])
    for name, ours, reference in zip(["y", "x", "weights", "w_gate_up", "w_down"], *results, strict=True):
        assert ours.dtype == reference.dtype == dtype, name
        torch.testing.assert_close(ours.float(), reference.float(), atol=tol, rtol=tol, msg=name)
    assert results[0][3][7].abs().max() == 0  # the unused expert gets a zero gradient


# --- RoPE and YaRN ----------------------------------------------------------------------------------------------
def test_rope_scores_depend_only_on_relative_position():
    cfg = ModelConfig.preset("toy")
    freqs = precompute_freqs_cis(cfg, 64)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m, n):
        return (apply_rotary_emb(q, freqs[m:m + 1]) * apply_rotary_emb(k, freqs[n:n + 1])).sum()

    assert score(10, 3).item() == pytest.approx(score(40, 33).item(), rel=1e-4)


def test_yarn_keeps_high_frequencies_and_interpolates_low_ones():
    plain = ModelConfig.preset("v3", rope_factor=1.0)
    yarn = ModelConfig.preset("v3")
    base, scaled = rope_inv_freq(plain), rope_inv_freq(yarn)
    low, high = yarn_ramp_range(yarn, 64)
    assert (low, high) == (10, 23)  # V3: beta_fast 32, beta_slow 1 over 4096 positions
    assert torch.allclose(scaled[:low], base[:low])
    assert torch.allclose(scaled[high:], base[high:] / 40)
    mid = scaled[low + 1:high] / base[low + 1:high]
    assert ((mid < 1) & (mid > 1 / 40)).all() and (mid.diff() < 0).all()
