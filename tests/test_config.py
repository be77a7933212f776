import json

import pytest

from mini_deepseek import ModelConfig
from mini_deepseek.rope import rope_attention_factor


@pytest.mark.parametrize("name", ["toy", "small", "v2-lite", "v3"])
def test_presets_build_valid_configs(name):
    cfg = ModelConfig.preset(name)
    assert cfg.n_activated_experts <= cfg.n_routed_experts


def test_v3_preset_is_the_published_geometry():
    c = ModelConfig.preset("v3")
    assert (c.n_layers, c.dim, c.n_heads, c.q_lora_rank, c.kv_lora_rank) == (61, 7168, 128, 1536, 512)
    assert (c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (128, 64, 128)
    assert (c.n_shared_experts, c.n_routed_experts, c.moe_inter_dim, c.n_activated_experts) == (1, 256, 2048, 8)
    assert (c.n_expert_groups, c.n_limited_groups, c.route_scale, c.score_func) == (8, 4, 2.5, "sigmoid")
    assert (c.n_dense_layers, c.inter_dim, c.vocab_size, c.n_mtp_modules) == (3, 18432, 129280, 1)
    assert (c.rope_factor, c.original_seq_len) == (40.0, 4096)


def test_v3_softmax_scale_has_the_yarn_correction():
    c = ModelConfig.preset("v3")
    mscale = 0.1 * 1.0 * __import__("math").log(40) + 1
    assert mscale == pytest.approx(1.3689, abs=1e-4)
    assert c.softmax_scale == pytest.approx(192**-0.5 * mscale**2)
    assert c.softmax_scale / 192**-0.5 == pytest.approx(1.8739, abs=1e-4)


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(n_heads=8, attn_type="gqa", n_kv_heads=3), "n_kv_heads"),
        (dict(n_activated_experts=9), "n_activated_experts"),
        (dict(n_expert_groups=4, n_limited_groups=5), "n_limited_groups"),
        (dict(n_routed_experts=8, n_expert_groups=3), "n_expert_groups"),
        (dict(dim=-4), "dim"),
        (dict(qk_rope_head_dim=15), "qk_rope_head_dim"),
        (dict(attn_type="gqa", head_dim=31), "head_dim"),
        (dict(n_dense_layers=9), "n_dense_layers"),
        (dict(attn_type="linear"), "attn_type"),
        (dict(score_func="relu"), "score_func"),
        (dict(mla_mode="fast"), "mla_mode"),
        (dict(rope_factor=0.5), "rope_factor"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(n_heads=2.5), "n_heads"),
        (dict(aux_loss_alpha=-0.01), "aux_loss_alpha"),
    ],
)
def test_invalid_configs_name_the_field(changes, field):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}\b"):
        ModelConfig.preset("toy", **changes)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match="toy"):
        ModelConfig.preset("v4")


def test_from_hf_reads_published_v3_config(tmp_path):
    hf = {
        "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
        "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_nextn_predict_layers": 1,
        "num_attention_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256, "routed_scaling_factor": 2.5,
        "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
        "num_experts_per_tok": 8, "first_k_dense_replace": 3, "norm_topk_prob": True, "scoring_func": "sigmoid",
        "max_position_embeddings": 163840, "rms_norm_eps": 1e-06, "rope_theta": 10000,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "tie_word_embeddings": False, "initializer_range": 0.02,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(hf))
    cfg = ModelConfig.from_hf(tmp_path)
    v3 = ModelConfig.preset("v3")
    for name in ["dim", "n_layers", "n_heads", "q_lora_rank", "kv_lora_rank", "n_routed_experts", "n_expert_groups",
                 "n_limited_groups", "route_scale", "rope_factor", "original_seq_len", "mscale_all_dim", "inter_dim",
                 "n_dense_layers", "n_mtp_modules", "vocab_size", "max_seq_len"]:
        assert getattr(cfg, name) == getattr(v3, name), name
    assert cfg.softmax_scale == pytest.approx(v3.softmax_scale)
    # newer transformers write rope_parameters (carrying rope_theta) instead of rope_scaling
    hf2 = dict(hf, rope_scaling=None, rope_parameters={**hf["rope_scaling"], "rope_type": "yarn", "rope_theta": 5e4})
    cfg2 = ModelConfig.from_hf(hf2)
    assert (cfg2.rope_factor, cfg2.rope_theta) == (40.0, 5e4)
    assert ModelConfig.from_hf(cfg.to_hf()).to_dict() == {**cfg.to_dict(), "extra": ModelConfig.from_hf(cfg.to_hf()).extra}


def test_from_hf_rejects_other_models():
    with pytest.raises(ValueError, match="model_type"):
        ModelConfig.from_hf({"model_type": "llama"})


def test_hf_config_round_trip_keeps_the_course_fields():
    cfg = ModelConfig.preset("toy", mla_mode="absorb", bias_update_speed=0.01, seq_aux_alpha=0.0, mtp_loss_weight=0.1,
                             aux_loss_alpha=0.003)
    back = ModelConfig.from_hf(json.loads(json.dumps(cfg.to_hf())))
    assert back.to_dict() == {**cfg.to_dict(), "extra": back.extra}
    with pytest.raises(ValueError, match="unknown fields"):
        ModelConfig.from_hf({**cfg.to_hf(), "mini_deepseek": {"mla_mod": "absorb"}})


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32.0,
        "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.707}


def hf_toy(**changes) -> dict:
    return {**ModelConfig.preset("toy").to_hf(), "mini_deepseek": {}, **changes}


def test_from_hf_honours_or_rejects_every_rope_key():
    implied = ModelConfig.from_hf(hf_toy(rope_scaling=YARN))
    factor = rope_attention_factor(implied)
    assert factor != 1.0  # mscale != mscale_all_dim: cos/sin are scaled
    # the values our fields imply are accepted ...
    same = ModelConfig.from_hf(hf_toy(rope_scaling={**YARN, "attention_factor": factor, "truncate": True}))
    assert same.to_dict() == {**implied.to_dict(), "extra": same.extra}
    # ... others are named
    with pytest.raises(ValueError, match="attention_factor = 1.5"):
        ModelConfig.from_hf(hf_toy(rope_scaling={**YARN, "attention_factor": 1.5}))
    with pytest.raises(ValueError, match="truncate = False"):
        ModelConfig.from_hf(hf_toy(rope_scaling={**YARN, "truncate": False}))
    with pytest.raises(ValueError, match=r"\['low_freq_factor'\]"):
        ModelConfig.from_hf(hf_toy(rope_scaling={**YARN, "low_freq_factor": 1.0}))
    with pytest.raises(ValueError, match=r"\['factor'\]"):  # a factor on plain RoPE would be dropped silently
        ModelConfig.from_hf(hf_toy(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "factor": 2.0}))


def test_from_hf_maps_aux_loss_alpha():
    # DeepSeek's MoEGate: aux_loss_alpha weighs the sequence-wise loss when seq_aux (the published V2/V3 configs)
    assert ModelConfig.from_hf(hf_toy(aux_loss_alpha=0.001, seq_aux=True)).seq_aux_alpha == 0.001
    assert ModelConfig.from_hf({k: v for k, v in hf_toy(aux_loss_alpha=0.002).items()
                                if k != "mini_deepseek"}).seq_aux_alpha == 0.002
    assert "aux_loss_alpha" not in ModelConfig.from_hf(hf_toy(aux_loss_alpha=0.001)).extra
    # with seq_aux false it is DeepSeek-V2's expert-level loss over the whole batch: our aux_loss_alpha
    batch_wise = ModelConfig.from_hf(hf_toy(aux_loss_alpha=0.001, seq_aux=False))
    assert batch_wise.aux_loss_alpha == 0.001 and batch_wise.seq_aux_alpha == 0.0001  # the latter: the default
    assert ModelConfig.from_hf(hf_toy(aux_loss_alpha=0.0, seq_aux=False)).aux_loss_alpha == 0.0
    # our own fields under "mini_deepseek" win over the Hugging Face key
    ours = ModelConfig.from_hf(hf_toy(aux_loss_alpha=0.001, seq_aux=False, mini_deepseek={"aux_loss_alpha": 0.02}))
    assert ours.aux_loss_alpha == 0.02
