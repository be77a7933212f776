import contextlib
import io
import os
import pickle

import pytest
import torch
from safetensors import safe_open

from mini_deepseek.config import ModelConfig
from mini_deepseek.data import TokenDataset, arithmetic_text
from mini_deepseek.model import DeepSeekV3
from mini_deepseek.train import (
    TrainConfig,
    latest_checkpoint,
    load_checkpoint,
    lr_at,
    make_optimizer,
    max_violation,
    save_checkpoint,
    train,
)

# Every mechanism on (MoE with bias updates, the sequence-wise loss, MTP), at a size that trains in a second.
TINY = dict(n_layers=2, dim=64, max_seq_len=64, bias_update_speed=0.01, seq_aux_alpha=0.01)


def tiny_model(seed: int = 0, **overrides) -> DeepSeekV3:
    torch.manual_seed(seed)
    return DeepSeekV3(ModelConfig.preset("toy", **{**TINY, **overrides}))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny ops gain nothing from threads, and on a busy machine waiting for a second thread costs 10-20x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dataset():
    return TokenDataset.from_text(arithmetic_text(300, seed=0), val_fraction=0.1, seed=0)


def tiny_config(**changes) -> TrainConfig:
    return TrainConfig(**{**dict(steps=6, batch_size=4, seq_len=32, warmup_steps=2, eval_every=3,
                                 eval_batches=2, log_every=2), **changes})


@pytest.fixture(scope="module")
def straight_run(dataset):
    """An uninterrupted run: its history, the callback's calls, and what the progress bar printed."""
    calls, bar = [], io.StringIO()
    with contextlib.redirect_stderr(bar):
        history = train(tiny_model(), dataset, tiny_config(), callback=lambda h: calls.append(len(h.train)))
    return history, calls, bar.getvalue()


def test_lr_schedule():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(1, cfg) == pytest.approx(0.1) and lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(100, cfg) == pytest.approx(0.1)
    decay = [lr_at(s, cfg) for s in range(10, 101)]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))
    assert lr_at(5, TrainConfig(steps=10, lr=1.0, warmup_steps=0, min_lr_ratio=0.0)) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)


def test_max_violation():
    assert max_violation(torch.tensor([[2.0, 2, 2, 2]])) == 0.0
    # layer 1: max 3 / mean 1 - 1 = 2; layer 2: balanced -> mean over layers is 1
    assert max_violation(torch.tensor([[3.0, 1, 0, 0], [1.0, 1, 1, 1]])) == pytest.approx(1.0)


def test_weight_decay_skips_vectors():
    model = tiny_model()
    optimizer = make_optimizer(model, TrainConfig(weight_decay=0.1))
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert len(decayed["params"]) + len(plain["params"]) == n_trainable


def test_history_progress_bar_and_callback(straight_run):
    history, calls, bar = straight_run
    assert calls == [2, 4, 6]
    assert [r["step"] for r in history.train] == list(range(1, 7))
    first = history.train[0]
    assert {"loss", "lm_loss", "mtp_loss", "seq_balance_loss", "lr", "grad_norm", "maxvio", "tokens_per_s"} <= set(first)
    assert first["loss"] > first["lm_loss"]  # MTP and balance terms are added on top
    assert [e["step"] for e in history.evals] == [3, 6]
    assert {"val_loss", "val_lm_loss", "val_mtp_loss"} <= set(history.evals[0])
    steps, losses = history.series("loss")
    assert steps == list(range(1, 7)) and losses[-1] < losses[0]
    assert history.series("val_loss")[0] == [3, 6]
    assert "6/6" in bar and "loss=" in bar and "tok/s=" in bar and "maxvio=" in bar and "val=" in bar


def test_history_keeps_load_statistics_per_step_and_per_evaluation(straight_run):
    history = straight_run[0]
    cfg, model_cfg = tiny_config(), ModelConfig.preset("toy", **TINY)
    n_moe_layers = model_cfg.n_layers - model_cfg.n_dense_layers
    slots = cfg.batch_size * cfg.seq_len * model_cfg.n_activated_experts  # (token, expert) pairs per layer
    for record in history.train:
        load = torch.tensor(record["expert_load"])
        assert load.shape == (n_moe_layers, model_cfg.n_routed_experts)
        assert load.sum(dim=1).tolist() == [slots] * n_moe_layers
        assert record["maxvio"] == pytest.approx(max_violation(load))
    for record in history.evals:
        load = torch.tensor(record["val_expert_load"])
        assert load.sum(dim=1).tolist() == [slots * cfg.eval_batches] * n_moe_layers
        assert record["val_maxvio_global"] == pytest.approx(max_violation(load))
        # imbalance averages out over batches: the global MaxVio never exceeds the mean batch MaxVio
        assert record["val_maxvio_global"] <= record["val_maxvio_batch"] + 1e-6


def test_exact_resume(dataset, straight_run, tmp_path):
    """Straight to 6 steps == 3 steps, save, rebuild from a different init, load, train on to 6."""
    straight = straight_run[0]
    cfg = tiny_config(out_dir=str(tmp_path))
    train(tiny_model(), dataset, cfg, stop_at_step=3)
    checkpoint = latest_checkpoint(tmp_path)
    assert checkpoint == os.path.join(tmp_path, "step-000003")
    torch.manual_seed(123)  # the global RNG must come from the checkpoint, not from whatever ran before
    resumed = train(tiny_model(seed=1), dataset, cfg, resume_from=checkpoint)
    assert [r["loss"] for r in resumed.train] == [r["loss"] for r in straight.train]  # bit-identical
    assert [r["maxvio"] for r in resumed.train] == [r["maxvio"] for r in straight.train]
    assert [r["expert_load"] for r in resumed.train] == [r["expert_load"] for r in straight.train]
    assert resumed.evals == straight.evals
    assert latest_checkpoint(tmp_path) == os.path.join(tmp_path, "step-000006")


def test_resume_warns_when_the_config_changed(dataset, tmp_path):
    train(tiny_model(), dataset, tiny_config(out_dir=str(tmp_path)), stop_at_step=1)
    with pytest.warns(UserWarning, match="lr: 0.003 -> 0.001"):
        train(tiny_model(), dataset, tiny_config(lr=1e-3, steps=2, eval_every=0),
              resume_from=latest_checkpoint(tmp_path))


@pytest.mark.parametrize("tied", [False, True])
def test_checkpoint_round_trip_without_pickle(tmp_path, monkeypatch, tied):
    def forbidden(*args, **kwargs):
        raise AssertionError("checkpoints must not pickle")
    for module, name in [(torch, "save"), (torch, "load"), (pickle, "dump"), (pickle, "dumps"), (pickle, "load"),
                         (pickle, "loads")]:
        monkeypatch.setattr(module, name, forbidden)

    model = tiny_model(tie_embeddings=tied)
    optimizer = make_optimizer(model, TrainConfig())
    x = torch.randint(0, 264, (2, 16))
    model.loss(x, x)[0].backward()
    optimizer.step()
    model.update_routing_bias()
    rng = torch.get_rng_state()
    path = save_checkpoint(tmp_path / "ckpt", model, optimizer, step=1, train_config=TrainConfig(lr=1e-3))

    assert sorted(os.listdir(path)) == ["model.safetensors", "optimizer.safetensors", "trainer.json"]
    assert not any(name.endswith(".partial") for name in os.listdir(tmp_path))
    with safe_open(os.path.join(path, "optimizer.safetensors"), "pt") as f:
        assert "embed_tokens.weight.exp_avg" in f.keys() and f.get_tensor("rng.cpu").dtype == torch.uint8

    torch.rand(10)  # move the RNG on; loading must put it back
    fresh = tiny_model(seed=1, tie_embeddings=tied)
    fresh_optimizer = make_optimizer(fresh, TrainConfig())
    state = load_checkpoint(path, fresh, fresh_optimizer)
    assert state["step"] == 1 and state["train_config"] == TrainConfig(lr=1e-3)
    assert state["model_config"]["tie_embeddings"] is tied
    assert torch.equal(torch.get_rng_state(), rng)
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert any(b.abs().sum() > 0 for n, b in fresh.named_buffers() if "bias" in n)  # the routing bias came along
    if tied:
        assert fresh.lm_head.weight is fresh.embed_tokens.weight
    saved, loaded = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    for index, slots in saved["state"].items():
        for slot, value in slots.items():
            assert torch.equal(value, loaded["state"][index][slot]), (index, slot)


def test_checkpoint_errors(tmp_path):
    model = tiny_model()
    path = save_checkpoint(tmp_path / "ckpt", model, make_optimizer(model, TrainConfig()), step=0)
    with pytest.raises(ValueError, match="does not fit this model"):
        load_checkpoint(path, tiny_model(n_layers=3))
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        load_checkpoint(tmp_path, model)
    assert latest_checkpoint(tmp_path / "nowhere") is None


def test_progress_false_hides_the_bar(dataset):
    bar = io.StringIO()
    with contextlib.redirect_stderr(bar):
        history = train(tiny_model(), dataset, tiny_config(steps=2, eval_every=0), progress=False)
    assert len(history.train) == 2 and bar.getvalue() == ""


def test_training_updates_the_routing_bias(dataset):
    # One step: every gate (the MTP module's too) moves each bias by exactly gamma * sign(mean load - load) of the
    # step's own batch, which is still the gate's last_load since nothing ran after it.
    model = tiny_model()
    train(model, dataset, tiny_config(steps=1, eval_every=0))
    for gate in model.gates():
        expected = TINY["bias_update_speed"] * torch.sign(gate.last_load.mean() - gate.last_load)
        assert expected.abs().sum() > 0 and torch.equal(gate.e_score_correction_bias, expected)
