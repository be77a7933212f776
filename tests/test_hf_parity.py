"""Parity with Hugging Face transformers' DeepseekV3ForCausalLM: checkpoints it writes load here and give the same
logits (plain RoPE and YaRN, past the original context), and ours load there. Skips without transformers."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

from mini_deepseek import DeepSeekV3, ModelConfig  # noqa: E402
from mini_deepseek.checkpoint import CheckpointNotice, from_pretrained, save_pretrained  # noqa: E402

VOCAB, SEQ = 128, 80  # SEQ runs past YaRN's original context (32)
TOL = dict(rtol=1e-5, atol=1e-5)  # float32 rounding


def hf_config(**overrides) -> DeepseekV3Config:
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
                n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
                routed_scaling_factor=2.5, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                v_head_dim=16, max_position_embeddings=128, bos_token_id=None, eos_token_id=None)
    return DeepseekV3Config(**{**base, **overrides})


def yarn(**mscales) -> dict:
    return {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
            "beta_fast": 32.0, "beta_slow": 1.0, **mscales}


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights large enough for non-trivial logits; a nonzero routing bias, so that it must steer selection only."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.08 * noise)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.rand(b.shape, generator=g) * 0.2 - 0.1)


def hf_model_of(cls, config):
    torch.manual_seed(0)
    model = cls(config).eval()
    randomize_(model)
    return model


def hf_model(config: DeepseekV3Config) -> DeepseekV3ForCausalLM:
    return hf_model_of(DeepseekV3ForCausalLM, config)


def input_ids(batch: int = 2, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))


def load_quietly(path) -> DeepSeekV3:
    with pytest.warns(CheckpointNotice, match="no MTP weights"):  # transformers never saves MTP weights
        return from_pretrained(path)


CASES = {
    "plain": {},
    "plain-no-q-compression": dict(q_lora_rank=None),
    "yarn-mscale-1": dict(rope_parameters=yarn(mscale=1.0, mscale_all_dim=1.0)),
    "yarn-mscale-0.707": dict(rope_parameters=yarn(mscale=0.707, mscale_all_dim=0.707)),
    "yarn-mscale-1-all-dim-0.707": dict(rope_parameters=yarn(mscale=1.0, mscale_all_dim=0.707)),  # cos/sin scaled
    "yarn-no-mscale": dict(rope_parameters=yarn()),
    "rope-not-interleaved": dict(rope_interleave=False, rope_parameters=yarn(mscale=1.0, mscale_all_dim=1.0)),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case, tmp_path):
    theirs = hf_model(hf_config(**CASES[case]))
    theirs.save_pretrained(tmp_path)
    ours = load_quietly(tmp_path)
    x = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x).logits, **TOL)


def test_published_style_config_and_fused_experts(tmp_path):
    """config.json with `rope_scaling` and a top-level rope_theta (the published files), weights in transformers'
    fused in-memory expert layout (save_original_format=False)."""
    theirs = hf_model(hf_config(rope_parameters=yarn(mscale=0.707, mscale_all_dim=0.707)))
    theirs.save_pretrained(tmp_path, save_original_format=False)
    config = json.loads((tmp_path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert ModelConfig.from_hf(tmp_path).replace(extra={}) == ModelConfig.from_hf(theirs.config.to_dict()).replace(extra={})
    ours = load_quietly(tmp_path)
    x = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x).logits, **TOL)


def test_config_fields_from_transformers():
    cfg = ModelConfig.from_hf(hf_config(rope_parameters=yarn(mscale=1.0, mscale_all_dim=0.707)).to_dict())
    assert (cfg.dim, cfg.n_layers, cfg.n_dense_layers, cfg.n_heads, cfg.q_lora_rank, cfg.kv_lora_rank) == (64, 3, 1, 4, 32, 32)
    assert (cfg.n_routed_experts, cfg.n_activated_experts, cfg.n_expert_groups, cfg.n_limited_groups) == (8, 2, 2, 1)
    assert (cfg.rope_factor, cfg.original_seq_len, cfg.mscale, cfg.mscale_all_dim) == (4.0, 32, 1.0, 0.707)
    assert cfg.route_scale == 2.5 and cfg.n_mtp_modules == 1 and cfg.max_seq_len == 128
    assert "num_key_value_heads" not in cfg.extra and "qk_head_dim" not in cfg.extra
    assert ModelConfig.from_hf(hf_config().to_dict()).rope_factor == 1.0


def our_model_with_mtp() -> DeepSeekV3:
    cfg = ModelConfig(vocab_size=VOCAB, dim=64, n_layers=3, n_dense_layers=1, inter_dim=96, moe_inter_dim=32, n_heads=4,
                      max_seq_len=128, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                      v_head_dim=16, n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, n_expert_groups=2,
                      n_limited_groups=1, route_scale=2.5, n_mtp_modules=1, rope_factor=4.0, original_seq_len=32,
                      mscale=0.707, mscale_all_dim=0.707)
    torch.manual_seed(0)
    ours = DeepSeekV3(cfg).eval()
    randomize_(ours)
    return ours


def test_our_checkpoint_loads_in_transformers(tmp_path):
    ours = our_model_with_mtp()
    save_pretrained(ours, tmp_path, max_shard_size="200KB")
    theirs = DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()  # it ignores our MTP layer (model.layers.3)
    assert theirs.config.num_key_value_heads == 4
    x = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x).logits, **TOL)


def test_mtp_layer_of_a_checkpoint_matches_transformers_modules(tmp_path):
    """transformers runs no MTP, but its modules rebuild ours from a checkpoint holding an MTP layer: h^0 is its
    model's last hidden state (after model.norm, what vLLM feeds the published MTP weights), the MTP block is its
    decoder layer built at index num_hidden_layers from model.layers.3.*, and enorm, hnorm, eh_proj, shared_head
    and the embedding copy are read from the file as the published layout stores them."""
    from safetensors.torch import load_file
    from transformers.masking_utils import create_causal_mask

    save_pretrained(our_model_with_mtp(), tmp_path)
    ours = from_pretrained(tmp_path)  # loads the MTP layer from model.layers.3
    x = input_ids()
    n = x.shape[1] - 1
    main = DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()
    four = DeepseekV3ForCausalLM.from_pretrained(tmp_path, num_hidden_layers=4).eval()  # + the MTP block as layer 3
    block = four.model.layers[3]
    tensors = load_file(tmp_path / "model.safetensors")

    def mtp(name: str) -> torch.Tensor:
        return tensors[f"model.layers.3.{name}"]

    def rms(t: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + main.config.rms_norm_eps) * weight

    with torch.no_grad():
        h0 = main.model(x).last_hidden_state  # [B, T, dim], after the final norm
        emb = torch.nn.functional.embedding(x[:, 1:], mtp("embed_tokens.weight"))
        mixed = torch.cat([rms(emb, mtp("enorm.weight")), rms(h0[:, :n], mtp("hnorm.weight"))], dim=-1) \
            @ mtp("eh_proj.weight").T
        positions = torch.arange(n)[None]
        mask = create_causal_mask(config=four.config, inputs_embeds=mixed, attention_mask=None, past_key_values=None,
                                  position_ids=positions)
        h1 = block(mixed, attention_mask=mask, position_ids=positions,
                   position_embeddings=main.model.rotary_emb(mixed, positions))
        expected = rms(h1, mtp("shared_head.norm.weight")) @ mtp("shared_head.head.weight").T
        _, (got,) = ours(x, return_mtp=True)
    torch.testing.assert_close(got, expected, **TOL)


def test_greedy_generation_matches_transformers(tmp_path):
    theirs = hf_model(hf_config(rope_parameters=yarn(mscale=1.0, mscale_all_dim=1.0)))
    theirs.save_pretrained(tmp_path)
    ours = load_quietly(tmp_path)
    prompt = input_ids(batch=2, seq=28)  # generation crosses the original context of 32
    # an explicit mask: given only pad_token_id, transformers would mask every prompt token equal to it
    expected = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False,
                               pad_token_id=0)
    assert torch.equal(ours.generate(prompt, max_new_tokens=10), expected)


V2_CASES = {
    "v2-greedy": {},
    "v2-group-limited-yarn": dict(topk_method="group_limited_greedy", n_group=2, topk_group=1, q_lora_rank=32,
                                  rope_parameters=yarn(mscale=0.707, mscale_all_dim=0.707)),
}


@pytest.mark.parametrize("case", V2_CASES)
def test_deepseek_v2_checkpoint(case, tmp_path):
    """model_type deepseek_v2 (softmax gate, no correction bias, no top-k normalization) loads where it fits."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                num_attention_heads=4, n_shared_experts=2, n_routed_experts=8, num_experts_per_tok=2,
                first_k_dense_replace=1, routed_scaling_factor=1.5, q_lora_rank=None, kv_lora_rank=32,
                qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=128,
                bos_token_id=None, eos_token_id=None)
    config = DeepseekV2Config(**{**base, **V2_CASES[case]})
    theirs = hf_model_of(DeepseekV2ForCausalLM, config)
    theirs.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    assert ours.config.score_func == "softmax" and not ours.mtp
    x = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x).logits, **TOL)
