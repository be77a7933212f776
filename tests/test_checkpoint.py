"""Checkpoints in the published Hugging Face layout: save/load round trips, sharding and lazy shard reading,
FP8 block-scaled weights, and the errors for keys that do not fit. No transformers needed."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import mini_deepseek.checkpoint as ckpt
from mini_deepseek import DeepSeekV3, ModelConfig
from mini_deepseek.checkpoint import (
    CheckpointNotice,
    from_pretrained,
    read_safetensors_header,
    save_pretrained,
)
from mini_deepseek.fp8 import FP8Linear

TINY = dict(vocab_size=96, dim=64, n_layers=3, n_dense_layers=1, inter_dim=96, moe_inter_dim=32, n_heads=4,
            max_seq_len=64, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
            n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, n_expert_groups=2, n_limited_groups=1,
            route_scale=2.5, n_mtp_modules=1, rope_factor=4.0, original_seq_len=16, mscale=0.707, mscale_all_dim=0.707)


def tiny_model(seed: int = 0, **overrides) -> DeepSeekV3:
    torch.manual_seed(seed)
    model = DeepSeekV3(ModelConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.08 * torch.randn_like(p))
        for gate in model.gates():
            gate.e_score_correction_bias.uniform_(-0.1, 0.1)
    return model


def ids(batch: int = 2, seq: int = 24, vocab: int = 96) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))


def all_logits(model: DeepSeekV3, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        if model.mtp:
            logits, mtp = model(x, return_mtp=True)
            return [logits, *mtp]
        return [model(x)]


def assert_same_model(a: DeepSeekV3, b: DeepSeekV3) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


@pytest.fixture(scope="module")
def model() -> DeepSeekV3:
    return tiny_model()


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("single")
    save_pretrained(model, path)
    return path


# --- layout and round trip ------------------------------------------------------------------------------------------
def test_published_key_layout(model, saved):
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "model.safetensors"]
    keys = set(read_safetensors_header(saved / "model.safetensors"))
    n, E = model.config.n_layers, model.config.n_routed_experts
    assert "model.embed_tokens.weight" in keys and "model.norm.weight" in keys and "lm_head.weight" in keys
    assert {f"model.layers.1.mlp.experts.{e}.{p}.weight" for e in range(E)
            for p in ("gate_proj", "up_proj", "down_proj")} <= keys
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in keys
    assert "model.layers.0.mlp.gate_proj.weight" in keys  # dense first layer
    mtp = f"model.layers.{n}"  # the MTP module is stored as layer num_hidden_layers, with its published copies
    assert {f"{mtp}.{s}" for s in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                                   "shared_head.head.weight", "embed_tokens.weight",
                                   "mlp.experts.7.down_proj.weight", "self_attn.kv_b_proj.weight")} <= keys
    assert not any(k.startswith("mtp.") or "w_gate_up" in k or "w_down" in k for k in keys)
    tensors = load_file(saved / "model.safetensors")
    w = model.layers[1].mlp.experts.w_gate_up
    I = model.config.moe_inter_dim
    torch.testing.assert_close(tensors["model.layers.1.mlp.experts.3.gate_proj.weight"], w[3, :I])
    torch.testing.assert_close(tensors["model.layers.1.mlp.experts.3.up_proj.weight"], w[3, I:])
    torch.testing.assert_close(tensors[f"{mtp}.embed_tokens.weight"], model.embed_tokens.weight)
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].abs().min() > 0
    config = json.loads((saved / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["num_nextn_predict_layers"] == 1
    assert config["rope_scaling"]["type"] == "yarn" and config["num_key_value_heads"] == 4


def test_round_trip(model, saved):
    loaded = from_pretrained(saved)
    assert not loaded.training
    assert loaded.config.replace(extra={}) == model.config.replace(extra={})
    assert_same_model(model, loaded)
    for a, b in zip(all_logits(model, ids()), all_logits(loaded, ids()), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_dtype_and_overrides(saved):
    loaded = from_pretrained(saved, dtype=torch.bfloat16, mla_mode="absorb", max_seq_len=32)
    assert loaded.embed_tokens.weight.dtype == torch.bfloat16
    assert loaded.layers[1].mlp.experts.w_gate_up.dtype == torch.bfloat16
    assert loaded.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert loaded.config.mla_mode == "absorb" and loaded.freqs_cis.shape[0] == 32
    assert loaded(ids()).isfinite().all()


def test_tied_embeddings_round_trip(tmp_path):
    model = tiny_model(tie_embeddings=True, n_mtp_modules=0)
    save_pretrained(model, tmp_path)
    assert "lm_head.weight" not in read_safetensors_header(tmp_path / "model.safetensors")
    loaded = from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    torch.testing.assert_close(loaded(ids()), model(ids()).detach(), rtol=0, atol=0)


# --- sharding and lazy reading --------------------------------------------------------------------------------------
def test_sharded_save_and_partial_load(model, tmp_path, monkeypatch):
    save_pretrained(model, tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted({f for f in index["weight_map"].values()})
    assert len(shards) > 4 and not (tmp_path / "model.safetensors").exists()
    assert_same_model(model, from_pretrained(tmp_path))  # the whole model from shards

    needed = {index["weight_map"][k] for k in index["weight_map"]
              if k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
              or k.startswith("model.layers.0.")}
    for f in set(shards) - needed:  # a shard that must not be read is gone
        (tmp_path / f).unlink()
    opened = []
    real_safe_open = ckpt.safe_open
    monkeypatch.setattr(ckpt, "safe_open", lambda file, *a, **k: opened.append(file) or real_safe_open(file, *a, **k))
    first = from_pretrained(tmp_path, num_layers=1)
    assert {f.rsplit("/", 1)[-1] for f in opened} <= needed
    assert len(first.layers) == 1 and not first.mtp and first.config.n_dense_layers == 1

    reference = DeepSeekV3(model.config.replace(n_layers=1, n_mtp_modules=0)).eval()
    reference.load_state_dict({k: v for k, v in model.state_dict().items() if k in reference.state_dict()})
    torch.testing.assert_close(first(ids()), reference(ids()).detach(), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError):  # the deleted shards were really needed for the whole model
        from_pretrained(tmp_path)


def test_unindexed_multi_file_checkpoint(model, tmp_path):
    save_pretrained(model, tmp_path, max_shard_size="60KB")
    (tmp_path / "model.safetensors.index.json").unlink()  # safetensors files without an index: headers are read
    assert_same_model(model, from_pretrained(tmp_path))


def test_mtp_can_be_skipped(saved):
    assert not from_pretrained(saved, mtp=False).mtp


# --- FP8 --------------------------------------------------------------------------------------------------------------
def quantize_fp8(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise float8_e4m3fn quantization: scale = amax / 448 per block x block tile."""
    out_dim, in_dim = w.shape
    rows, cols = math.ceil(out_dim / block), math.ceil(in_dim / block)
    padded = torch.zeros(rows * block, cols * block)
    padded[:out_dim, :in_dim] = w.float()
    tiles = padded.view(rows, block, cols, block)
    scale = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0  # [rows, cols]
    q = (tiles / scale[:, None, :, None]).view(rows * block, cols * block)[:out_dim, :in_dim]
    return q.to(torch.float8_e4m3fn), scale


def dequantize_fp8(q: torch.Tensor, scale_inv: torch.Tensor, block: int) -> torch.Tensor:
    """The published rule, written out independently of the loader: each code times its block's weight_scale_inv."""
    out_dim, in_dim = q.shape
    per_element = scale_inv.repeat_interleave(block, dim=0)[:out_dim].repeat_interleave(block, dim=1)[:, :in_dim]
    return q.float() * per_element


def test_fp8_checkpoint(model, saved, tmp_path):
    tensors = load_file(saved / "model.safetensors")
    block = 32  # a small block so the tiny matrices span several blocks, some of them partial
    fp8 = {}
    for k, t in tensors.items():
        quantized = t.dim() == 2 and k.startswith("model.layers.") and not k.endswith(
            ("mlp.gate.weight", "embed_tokens.weight", "shared_head.head.weight", "eh_proj.weight"))
        if quantized:  # as published: Linear weights only; embeddings, norms, gate, head and eh_proj stay as they are
            fp8[k], fp8[k.removesuffix("weight") + "weight_scale_inv"] = quantize_fp8(t, block)
        else:
            fp8[k] = t.to(torch.bfloat16) if k.endswith(".weight") else t
    save_file(fp8, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((saved / "config.json").read_text())
    config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": [block, block]}
    config["torch_dtype"] = config["dtype"] = "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        kv = "model.layers.1.self_attn.kv_a_proj_with_mqa"
        assert f.get_slice(kv + ".weight").get_dtype() == "F8_E4M3"
        assert f.get_slice(kv + ".weight_scale_inv").get_shape() == [2, 2]  # 40 x 64 in 32 x 32 blocks

    loaded = from_pretrained(tmp_path, dtype=torch.float32)
    assert "quantization_config" not in loaded.config.extra
    I = model.config.moe_inter_dim
    q, s = fp8["model.layers.2.mlp.experts.5.up_proj.weight"], fp8["model.layers.2.mlp.experts.5.up_proj.weight_scale_inv"]
    # float32 codes times float32 scales: one rounding, the same in the loader as here
    torch.testing.assert_close(loaded.layers[2].mlp.experts.w_gate_up[5, I:], dequantize_fp8(q, s, block),
                               rtol=0, atol=0)
    q, s = fp8[kv + ".weight"], fp8[kv + ".weight_scale_inv"]
    torch.testing.assert_close(loaded.layers[1].self_attn.kv_a_proj_with_mqa.weight, dequantize_fp8(q, s, block),
                               rtol=0, atol=0)
    assert loaded.mtp[0].eh_proj.weight.dtype == torch.float32

    original = model.layers[1].self_attn.kv_a_proj_with_mqa.weight
    assert (loaded.layers[1].self_attn.kv_a_proj_with_mqa.weight - original).abs().max() < 0.07 * original.abs().max()

    # the same logits as the checkpoint dequantized beforehand
    plain = tmp_path / "dequantized"
    plain.mkdir()
    dequantized = {k: dequantize_fp8(t, fp8[k + "_scale_inv"], block)
                   if t.dtype == torch.float8_e4m3fn else t for k, t in fp8.items() if not k.endswith("_scale_inv")}
    save_file(dequantized, plain / "model.safetensors", metadata={"format": "pt"})
    (plain / "config.json").write_text((saved / "config.json").read_text())
    x = ids()
    for a, b in zip(all_logits(loaded, x), all_logits(from_pretrained(plain), x), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert from_pretrained(tmp_path).embed_tokens.weight.dtype == torch.bfloat16  # default: the config's dtype

    # fp8=True keeps the codes and scales as stored, the experts' stacked in our layout
    kept = from_pretrained(tmp_path, fp8=True)
    layer = kept.layers[1].self_attn.kv_a_proj_with_mqa
    assert isinstance(layer, FP8Linear) and layer.block_size == block
    assert torch.equal(layer.weight.view(torch.uint8), fp8[kv + ".weight"].view(torch.uint8))
    assert torch.equal(layer.weight_scale_inv, fp8[kv + ".weight_scale_inv"])
    experts, up = kept.layers[2].mlp.experts, "model.layers.2.mlp.experts.5.up_proj"
    assert torch.equal(experts.w_gate_up[5, I:].view(torch.uint8), fp8[up + ".weight"].view(torch.uint8))
    assert torch.equal(experts.w_gate_up_scale_inv[5, I // block:], fp8[up + ".weight_scale_inv"])
    eh_proj = kept.mtp[0].eh_proj  # kept in BF16, as stored (and as the published checkpoint stores it)
    assert type(eh_proj) is torch.nn.Linear and torch.equal(eh_proj.weight, fp8["model.layers.3.eh_proj.weight"])

    fp8[kv + ".weight_scale_inv"] = torch.ones(1, 2)
    save_file(fp8, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"kv_a_proj_with_mqa.weight_scale_inv: checkpoint \[1, 2\], expected "
                                         r"\[2, 2\] for 32 x 32 blocks"):
        from_pretrained(tmp_path)
    del fp8[kv + ".weight_scale_inv"]
    save_file(fp8, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing keys \(1\):\n    .*kv_a_proj_with_mqa.weight_scale_inv"):
        from_pretrained(tmp_path)


# --- errors -----------------------------------------------------------------------------------------------------------
def rewrite(saved, tmp_path, edit) -> None:
    tensors = load_file(saved / "model.safetensors")
    edit(tensors)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((saved / "config.json").read_text())


def test_missing_unexpected_misshaped_keys_are_listed(saved, tmp_path):
    def edit(t):
        del t["model.layers.1.mlp.experts.2.up_proj.weight"]
        del t["model.layers.0.self_attn.q_a_layernorm.weight"]
        t["model.layers.1.mlp.experts.8.up_proj.weight"] = torch.zeros(32, 64)
        t["model.embed_tokens.weight"] = torch.zeros(97, 64)

    rewrite(saved, tmp_path, edit)
    with pytest.raises(ValueError) as info:
        from_pretrained(tmp_path)
    message = str(info.value)
    assert "missing keys (2)" in message and "model.layers.1.mlp.experts.2.up_proj.weight [32, 64]" in message
    assert "model.layers.0.self_attn.q_a_layernorm.weight [32]" in message
    assert "unexpected keys (1)" in message and "model.layers.1.mlp.experts.8.up_proj.weight [32, 64] F32" in message
    assert "mis-shaped keys (1)" in message
    assert "model.embed_tokens.weight: checkpoint [97, 64], model expects [96, 64]" in message


def test_mtp_absent_or_partial(saved, tmp_path):
    rewrite(saved, tmp_path, lambda t: [t.pop(k) for k in list(t) if k.startswith("model.layers.3.")])
    with pytest.warns(CheckpointNotice, match="no MTP weights"):
        loaded = from_pretrained(tmp_path)
    assert not loaded.mtp and loaded.config.n_mtp_modules == 0

    rewrite(saved, tmp_path, lambda t: [t.pop(k) for k in list(t) if k.startswith("model.layers.3.mlp.")])
    with pytest.raises(ValueError, match=r"missing keys \(\d+\):\n    model\.layers\.3\.mlp\."):
        from_pretrained(tmp_path)


def test_never_unpickles(saved, tmp_path, monkeypatch):
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((saved / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="pickle"):
        from_pretrained(tmp_path)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    from_pretrained(saved)


def test_bad_arguments(saved):
    with pytest.raises(ValueError, match="n_layers"):
        from_pretrained(saved, n_layers=4)
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(saved / "nowhere")
    with pytest.raises(ValueError, match="max_shard_size"):
        save_pretrained(tiny_model(), saved / "x", max_shard_size="lots")
