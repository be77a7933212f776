"""Graded tests of exercise set 01 (exercises/ex01_attention.py): KV cache sizes, GQA head sharing, MLA's
compression with decoupled RoPE, and weight absorption.

Each exercise is checked against numbers worked out by hand (or properties any correct answer has) and against
the library in mini_deepseek/: its configs' cache formula, the cache tensors its models allocate and fill, its
attention kernel, and its naive and absorbed MLA layers.
"""

import pytest
import torch
from torch.testing import assert_close

from mini_deepseek import DeepSeekV3, ModelConfig
from mini_deepseek.attention import attend
from mini_deepseek.mla import MultiHeadLatentAttention
from mini_deepseek.rope import precompute_freqs_cis

TOY_VARIANTS = {  # attention variants of the toy preset, as the notebook trains them
    "mha": dict(attn_type="mha"),
    "gqa": dict(attn_type="gqa", n_kv_heads=2),
    "mqa": dict(attn_type="mqa"),
    "mla": dict(attn_type="mla", mla_mode="absorb"),
}


def cache_args(cfg: ModelConfig) -> dict:
    """The keyword arguments of kv_cache_elements_per_token for a ModelConfig."""
    return dict(attn_type=cfg.attn_type, n_layers=cfg.n_layers, n_heads=cfg.n_heads, head_dim=cfg.head_dim,
                n_kv_heads=cfg.kv_heads if cfg.attn_type == "gqa" else 0, kv_lora_rank=cfg.kv_lora_rank,
                qk_rope_head_dim=cfg.qk_rope_head_dim)


def mla_layer(**overrides) -> MultiHeadLatentAttention:
    """A toy MLA layer with random weights, norms included (a norm gain of 1 would hide a missing norm)."""
    layer = MultiHeadLatentAttention(ModelConfig.preset("toy", **overrides)).eval()
    with torch.no_grad():
        for name, param in layer.named_parameters():
            param.copy_(1 + 0.3 * torch.randn_like(param) if "layernorm" in name else torch.randn_like(param) * 0.2)
    return layer


def mla_queries(layer: MultiHeadLatentAttention, x: torch.Tensor, freqs_cis: torch.Tensor):
    """The layer's query parts for x [B, T, dim]: q_nope [B, T, H, d_h] and rotated q_pe [B, T, H, d_r]."""
    from mini_deepseek.rope import apply_rotary_emb

    B, T, _ = x.shape
    q = layer.q_b_proj(layer.q_a_layernorm(layer.q_a_proj(x))) if hasattr(layer, "q_a_proj") else layer.q_proj(x)
    q_nope, q_pe = q.view(B, T, layer.n_heads, -1).split([layer.nope_dim, layer.rope_dim], dim=-1)
    return q_nope, apply_rotary_emb(q_pe, freqs_cis)


# --- kv_cache_elements_per_token -----------------------------------------------------------------------------------
@pytest.mark.exercise("kv_cache_elements_per_token")
def test_kv_cache_elements_v3_numbers(exercise):
    mla = exercise("mla", n_layers=61, n_heads=128, head_dim=128, kv_lora_rank=512, qk_rope_head_dim=64)
    mha = exercise("mha", n_layers=61, n_heads=128, head_dim=128)
    assert isinstance(mla, int) and isinstance(mha, int)
    assert mla == (512 + 64) * 61 == 35_136
    assert mha == 2 * 128 * 128 * 61 == 1_998_848
    assert exercise("gqa", n_layers=61, n_heads=128, head_dim=128, n_kv_heads=8) == 2 * 8 * 128 * 61
    assert exercise("mqa", n_layers=61, n_heads=128, head_dim=128) == 2 * 128 * 61


@pytest.mark.exercise("kv_cache_elements_per_token")
def test_kv_cache_elements_mla_ignores_heads(exercise):
    small = exercise("mla", n_layers=2, n_heads=4, head_dim=32, kv_lora_rank=64, qk_rope_head_dim=16)
    large = exercise("mla", n_layers=2, n_heads=128, head_dim=128, kv_lora_rank=64, qk_rope_head_dim=16)
    assert small == large == 2 * 80
    with pytest.raises(ValueError):
        exercise("sliding", n_layers=2, n_heads=4, head_dim=32)


@pytest.mark.exercise("kv_cache_elements_per_token")
@pytest.mark.parametrize("preset", ["toy", "v2-lite", "v3"])
@pytest.mark.parametrize("variant", ["mha", "gqa", "mqa", "mla"])
def test_kv_cache_elements_matches_library_formula(exercise, preset, variant):
    base = ModelConfig.preset(preset)
    head_dim = base.qk_nope_head_dim  # the baselines get MLA's per-head size, as DeepSeek-V2 compares them
    overrides = {"mha": dict(attn_type="mha"), "gqa": dict(attn_type="gqa", n_kv_heads=base.n_heads // 4),
                 "mqa": dict(attn_type="mqa"), "mla": dict(attn_type="mla", mla_mode="absorb")}[variant]
    cfg = base.replace(head_dim=head_dim, **overrides)
    assert exercise(**cache_args(cfg)) == cfg.kv_cache_elements_per_token()


@pytest.mark.exercise("kv_cache_elements_per_token")
@pytest.mark.parametrize("variant", list(TOY_VARIANTS))
def test_kv_cache_elements_matches_the_model_cache_tensors(exercise, variant):
    cfg = ModelConfig.preset("toy", n_mtp_modules=0, **TOY_VARIANTS[variant])
    expected = exercise(**cache_args(cfg))
    model = DeepSeekV3(cfg).eval()
    batch, max_len = 2, 10
    cache = model.new_cache(batch, max_len)
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (batch, max_len)), cache=cache)  # fill every position
    measured = sum(t.numel() for layer in cache for t in layer.values()) // (batch * max_len)
    assert measured == expected


# --- repeat_kv -----------------------------------------------------------------------------------------------------
@pytest.mark.exercise("repeat_kv")
def test_repeat_kv_hand_example(exercise):
    x = torch.tensor([10.0, 20.0]).view(1, 2, 1, 1)  # two key/value heads
    out = exercise(x, 3)
    assert out.shape == (1, 6, 1, 1)
    assert out.flatten().tolist() == [10.0, 10.0, 10.0, 20.0, 20.0, 20.0]  # consecutive, not interleaved


@pytest.mark.exercise("repeat_kv")
@pytest.mark.parametrize("hk, n_rep", [(4, 1), (2, 2), (1, 8), (3, 4)])
def test_repeat_kv_matches_repeat_interleave(exercise, hk, n_rep):
    x = torch.randn(2, hk, 5, 8)
    out = exercise(x, n_rep)
    assert out.shape == (2, hk * n_rep, 5, 8)
    assert torch.equal(out, x.repeat_interleave(n_rep, dim=1))


@pytest.mark.exercise("repeat_kv")
def test_repeat_kv_gives_the_library_grouped_attention(exercise):
    q, k, v = torch.randn(2, 8, 6, 16), torch.randn(2, 2, 6, 16), torch.randn(2, 2, 6, 16)
    grouped = attend(q, k, v, 0.25)  # the library's GQA: torch's SDPA with enable_gqa
    expanded = torch.nn.functional.scaled_dot_product_attention(q, exercise(k, 4), exercise(v, 4), is_causal=True,
                                                                scale=0.25)
    assert_close(expanded, grouped)


# --- grouped_query_attention ---------------------------------------------------------------------------------------
@pytest.mark.exercise("grouped_query_attention")
def test_gqa_first_query_sees_only_the_first_key(exercise):
    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    out = exercise(q, k, v, 8**-0.5)
    assert out.shape == (1, 4, 5, 8)
    assert_close(out[:, :2, 0], v[:, 0:1, 0].expand(1, 2, 8))  # heads 0 and 1 share key/value head 0
    assert_close(out[:, 2:, 0], v[:, 1:2, 0].expand(1, 2, 8))


@pytest.mark.exercise("grouped_query_attention")
def test_gqa_equal_scores_average_the_values(exercise):
    q = torch.zeros(1, 2, 1, 4)  # one decoding step: every score is 0, so the output is the mean value
    k, v = torch.randn(1, 1, 7, 4), torch.randn(1, 1, 7, 3)
    out = exercise(q, k, v, 1.0)
    assert out.shape == (1, 2, 1, 3)
    assert_close(out, v.mean(dim=2, keepdim=True).expand(1, 2, 1, 3))


@pytest.mark.exercise("grouped_query_attention")
@pytest.mark.parametrize("hq, hk", [(4, 4), (8, 2), (6, 1)])
@pytest.mark.parametrize("t, s", [(9, 9), (1, 9), (3, 9)])
def test_gqa_matches_library_attend(exercise, hq, hk, t, s):
    q, k, v = torch.randn(2, hq, t, 16), torch.randn(2, hk, s, 16), torch.randn(2, hk, s, 12)
    out = exercise(q, k, v, 16**-0.5)
    assert out.shape == (2, hq, t, 12)
    assert_close(out, attend(q, k, v, 16**-0.5))


@pytest.mark.exercise("grouped_query_attention")
def test_gqa_keeps_dtype(exercise):
    q, k, v = (torch.randn(1, 4, 6, 8).bfloat16() for _ in range(3))
    out = exercise(q, k[:, :2], v[:, :2], 8**-0.5)
    assert out.dtype == torch.bfloat16
    assert_close(out.float(), attend(q.float(), k[:, :2].float(), v[:, :2].float(), 8**-0.5), atol=2e-2, rtol=2e-2)


# --- mla_keys_values -----------------------------------------------------------------------------------------------
@pytest.mark.exercise("mla_keys_values")
@pytest.mark.parametrize("overrides", [{}, dict(q_lora_rank=0), dict(rope_factor=4.0, original_seq_len=16)])
def test_mla_keys_values_match_the_library_caches(exercise, overrides):
    naive, absorbed = mla_layer(**overrides), mla_layer(**overrides)
    absorbed.load_state_dict(naive.state_dict())
    naive.mode, absorbed.mode = "naive", "absorb"  # the per-head cache and the latent cache
    B, T = 2, 7
    x = torch.randn(B, T, naive.kv_a_proj_with_mqa.in_features)
    freqs = precompute_freqs_cis(ModelConfig.preset("toy", **overrides), seq_len=T)
    k, v, latent = exercise(naive, x, freqs)
    H = naive.n_heads
    assert k.shape == (B, H, T, naive.nope_dim + naive.rope_dim)
    assert v.shape == (B, H, T, naive.v_dim)
    assert latent.shape == (B, T, naive.kv_rank + naive.rope_dim)
    naive_cache, absorbed_cache = naive.new_cache(B, T, torch.float32), absorbed.new_cache(B, T, torch.float32)
    with torch.no_grad():
        naive(x, freqs, 0, naive_cache)
        absorbed(x, freqs, 0, absorbed_cache)
    assert_close(k, naive_cache["k"])
    assert_close(v, naive_cache["v"])
    assert_close(latent, absorbed_cache["latent"][:, 0])


@pytest.mark.exercise("mla_keys_values")
def test_mla_keys_values_rope_key_is_shared_and_carries_the_position(exercise):
    layer = mla_layer()
    freqs = precompute_freqs_cis(ModelConfig.preset("toy"), seq_len=5)
    x = torch.randn(1, 1, layer.kv_a_proj_with_mqa.in_features).expand(1, 5, -1)  # one token at 5 positions
    with torch.no_grad():
        k, v, latent = exercise(layer, x, freqs)
    d_h = layer.nope_dim
    rope_keys = k[..., d_h:]  # [1, H, 5, d_r]
    assert_close(rope_keys, rope_keys[:, :1].expand_as(rope_keys))  # the same rope key for every head
    assert_close(k[:, :, 1:, :d_h], k[:, :, :1, :d_h].expand(-1, -1, 4, -1))  # no position in the compressed part
    assert_close(v[:, :, 1:], v[:, :, :1].expand(-1, -1, 4, -1))
    assert not torch.allclose(rope_keys[:, :, 1], rope_keys[:, :, 0])  # the position lives in the rope key
    assert_close(latent[0, :, layer.kv_rank:], rope_keys[0, 0])


# --- mla_absorbed_attention ----------------------------------------------------------------------------------------
@pytest.mark.exercise("mla_absorbed_attention")
def test_mla_absorbed_equal_scores_average_the_values(exercise):
    H, d_h, d_r, d_c, d_v, S = 2, 3, 2, 4, 5, 6
    latent = torch.randn(1, S, d_c + d_r)
    w = torch.randn(H * (d_h + d_v), d_c)
    out = exercise(torch.zeros(1, 1, H, d_h), torch.zeros(1, 1, H, d_r), latent, w, 0.5)  # all scores 0
    assert out.shape == (1, 1, H, d_v)
    w_uv = w.view(H, d_h + d_v, d_c)[:, d_h:]  # [H, d_v, d_c]
    mean_c = latent[0, :, :d_c].mean(dim=0)  # [d_c]
    assert_close(out[0, 0], w_uv @ mean_c)


@pytest.mark.exercise("mla_absorbed_attention")
@pytest.mark.parametrize("overrides", [{}, dict(q_lora_rank=0), dict(rope_factor=4.0, original_seq_len=16)])
def test_mla_absorbed_equals_naive_attention(exercise, overrides):
    layer = mla_layer(**overrides)
    B, T = 2, 9
    x = torch.randn(B, T, layer.kv_a_proj_with_mqa.in_features)
    freqs = precompute_freqs_cis(ModelConfig.preset("toy", **overrides), seq_len=T)
    with torch.no_grad():
        q_nope, q_pe = mla_queries(layer, x, freqs)
        layer.mode = "absorb"
        latent = layer.new_cache(B, T, torch.float32)
        layer(x, freqs, 0, latent)  # fills the latent cache
        out = exercise(q_nope, q_pe, latent["latent"][:, 0], layer.kv_b_proj.weight, layer.softmax_scale)
        layer.mode = "naive"
        expected = layer(x, freqs)  # naive: per-head keys and values
    assert out.shape == (B, T, layer.n_heads, layer.v_dim)
    assert_close(layer.o_proj(out.reshape(B, T, -1)), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.exercise("mla_absorbed_attention")
def test_mla_absorbed_after_a_cached_prefix_matches_the_library(exercise):
    # T new queries after S - T cached positions: query t sits at position S - T + t, so the causal mask is aligned
    # to the bottom-right corner of the [T, S] scores. T == 1 (decoding) and T == S alone cannot tell that from a
    # mask aligned top-left; T = 3 after 6 cached tokens can.
    layer = mla_layer()
    layer.mode = "absorb"
    for T, S in [(1, 12), (3, 9), (5, 12), (8, 9)]:
        x = torch.randn(1, S, layer.kv_a_proj_with_mqa.in_features)
        freqs = precompute_freqs_cis(ModelConfig.preset("toy"), seq_len=S)
        cache = layer.new_cache(1, S, torch.float32)
        with torch.no_grad():
            layer(x[:, :S - T], freqs[:S - T], 0, cache)  # prefill S - T tokens
            expected = layer(x[:, S - T:], freqs[S - T:], S - T, cache)  # then the last T at once
            q_nope, q_pe = mla_queries(layer, x[:, S - T:], freqs[S - T:])
            out = exercise(q_nope, q_pe, cache["latent"][:, 0], layer.kv_b_proj.weight, layer.softmax_scale)
        assert out.shape == (1, T, layer.n_heads, layer.v_dim)
        assert_close(layer.o_proj(out.reshape(1, T, -1)), expected, atol=1e-5, rtol=1e-4, msg=f"T = {T}, S = {S}")
