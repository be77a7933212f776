"""count_params against an independent, closed-form count of the DeepSeek-V3 architecture.

The gate's e_score_correction_bias (256 floats a layer in V3) is a buffer moved by the balancing rule, not a
trained parameter, so neither count includes it.
"""

import pytest

from mini_deepseek import DeepSeekV3, ModelConfig, count_params


def closed_form(c: ModelConfig) -> tuple[int, int, int]:
    d, H = c.dim, c.n_heads
    attn = (d * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * H * (c.qk_nope_head_dim + c.qk_rope_head_dim)
            if c.q_lora_rank else d * H * (c.qk_nope_head_dim + c.qk_rope_head_dim))
    attn += d * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank
    attn += c.kv_lora_rank * H * (c.qk_nope_head_dim + c.v_head_dim) + H * c.v_head_dim * d
    expert = 3 * d * c.moe_inter_dim
    moe = c.n_routed_experts * d + (c.n_routed_experts + c.n_shared_experts) * expert
    moe_active = moe - (c.n_routed_experts - c.n_activated_experts) * expert
    dense = 3 * d * c.inter_dim
    norms = 2 * d
    n_moe = c.n_layers - c.n_dense_layers
    body = c.n_dense_layers * (attn + dense + norms) + n_moe * (attn + moe + norms)
    body_active = c.n_dense_layers * (attn + dense + norms) + n_moe * (attn + moe_active + norms)
    outer = 2 * c.vocab_size * d + d  # embedding, output head, final norm
    mtp = c.n_mtp_modules * (attn + moe + norms + 2 * d + 2 * d * d + d)  # block, enorm/hnorm, eh_proj, head norm
    return outer + body, outer + body_active, mtp


def test_v3_is_671b_with_37b_activated_to_the_parameter():
    c = ModelConfig.preset("v3")
    counted = count_params(c)
    total, activated, mtp = closed_form(c)
    assert (counted.total, counted.activated, counted.mtp) == (total, activated, mtp)
    assert counted.total == 671_026_404_352
    assert round(counted.total / 1e9) == 671
    assert 36.5e9 < counted.activated < 38e9
    assert 11.4e9 < counted.mtp < 11.7e9  # "about 11.5B unique" beside the 671B main model


@pytest.mark.parametrize("name", ["toy", "small", "v2-lite"])
def test_other_presets_match_the_closed_form(name):
    c = ModelConfig.preset(name)
    counted = count_params(c)
    assert (counted.total, counted.activated, counted.mtp) == closed_form(c)


def test_meta_count_equals_a_real_model():
    c = ModelConfig.preset("toy")
    model = DeepSeekV3(c)
    real = sum(p.numel() for p in model.parameters())
    assert count_params(c).total + count_params(c).mtp == real
