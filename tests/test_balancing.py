"""The measurement tools of notebook 02 (mini_deepseek/balancing.py): the routing-only simulation, the routing
evaluation by domain, domain specialisation and the gate-gradient comparison."""

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mini_deepseek import DeepSeekV3, ModelConfig  # noqa: E402
from mini_deepseek.balancing import (  # noqa: E402
    domain_specialisation,
    evaluate_routing,
    gate_gradient_interference,
    plot_gate_decision,
    simulate_routing,
)
from mini_deepseek.train import max_violation  # noqa: E402

TINY = dict(dim=32, n_layers=3, n_dense_layers=1, inter_dim=64, moe_inter_dim=16, n_heads=2, max_seq_len=32,
            q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
            n_routed_experts=8, n_activated_experts=2, n_expert_groups=1, n_limited_groups=1, n_mtp_modules=0)


def test_simulation_without_balancing_stays_skewed_and_the_bias_balances_without_moving_the_router():
    none = simulate_routing(steps=60)
    bias = simulate_routing(steps=60, gamma=0.02)
    aux = simulate_routing(steps=60, alpha=1.0)
    assert none.maxvio[-1] > 3 and none.affinity_change == 0
    assert bias.maxvio[-1] < 1 and bias.affinity_change == 0  # selection only: the router's affinities are untouched
    assert aux.maxvio[-1] < none.maxvio[-1] and aux.affinity_change > 0.05  # the loss balances by moving the router
    assert bias.bias[0] < 0 < bias.bias[-1]  # the favourite was pushed down, the least popular up
    assert none.load.sum().item() == 512 * 2


def test_simulation_with_groups_keeps_every_token_in_its_groups():
    sim = simulate_routing(steps=5, n_experts=16, n_groups=4, topk_groups=1, top_k=2)
    assert sim.load.sum().item() == 512 * 2 and len(sim.maxvio) == 5


def test_evaluate_routing_counts_every_token_once_per_layer_and_domain():
    torch.manual_seed(0)
    model = DeepSeekV3(ModelConfig.preset("toy", **TINY))
    tokens = torch.randint(0, 256, (16 * 10 + 5,))
    domains = (torch.arange(tokens.numel()) // 7) % 3
    result = evaluate_routing(model, tokens, domains, n_domains=3, seq_len=16, batch_size=4)
    assert result.n_tokens == 160 and result.load.shape == (2, 3, 8)
    assert result.load.sum(dim=(1, 2)).tolist() == [160 * 2, 160 * 2]  # k = 2 copies of every token per layer
    assert result.load.sum(dim=2)[0].tolist() == [2 * (domains[:160] == d).sum().item() for d in range(3)]
    x, y = tokens[:160].view(10, 16), tokens[1:161].view(10, 16)
    with torch.no_grad():
        expected = F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    assert result.loss == pytest.approx(expected, rel=1e-5)
    assert result.maxvio_global == pytest.approx(max_violation(result.load.sum(dim=1)))
    assert all(not gate._forward_hooks for gate in model.gates())  # hooks removed


def test_domain_specialisation_from_identical_to_disjoint():
    same = torch.tensor([[[5, 5, 0, 0], [10, 10, 0, 0]]])  # [1 layer, 2 domains, 4 experts]
    disjoint = torch.tensor([[[5, 5, 0, 0], [0, 0, 5, 5]]])
    assert domain_specialisation(same) == pytest.approx(0.0)
    assert domain_specialisation(disjoint) == pytest.approx(0.5)  # each domain is half the tokens, TV 0.5 from the mix
    with_empty = torch.tensor([[[5, 5, 0, 0], [0, 0, 0, 0], [0, 0, 5, 5]]])  # a domain absent from the split
    assert domain_specialisation(with_empty) == pytest.approx(0.5)


def test_gate_gradient_interference_needs_the_aux_loss_and_clears_the_losses():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (2, 16))
    with pytest.raises(ValueError, match="aux_loss_alpha"):
        gate_gradient_interference(DeepSeekV3(ModelConfig.preset("toy", **TINY)), x, x)
    model = DeepSeekV3(ModelConfig.preset("toy", **TINY, aux_loss_alpha=0.01))
    rows = gate_gradient_interference(model, x, x.roll(-1, 1))
    assert len(rows) == 2 and all(r["ratio"] > 0 and -1 <= r["cosine"] <= 1 for r in rows)
    assert all(g.expert_balance_loss is None for g in model.gates())


def test_plot_gate_decision_draws_a_token():
    model = DeepSeekV3(ModelConfig.preset("toy", **{**TINY, "n_expert_groups": 4, "n_limited_groups": 2}))
    fig = plot_gate_decision(model.layers[1].mlp.gate, torch.randn(32))
    assert len(fig.axes) == 3
