"""The MoE layer against DeepSeek-V3's equation written out token by token (section 2.1.2, eq. 12):

    h'_t = sum_i FFN^(s)_i(u_t) + sum_i g_{i,t} FFN^(r)_i(u_t)

with the routed experts' weights read from the stacked tensors, one expert and one token at a time.
"""

import pytest
import torch
import torch.nn.functional as F

from mini_deepseek import ModelConfig
from mini_deepseek import moe as moe_module
from mini_deepseek.moe import MoE, grouped_matmul


def test_moe_adds_the_shared_experts_to_the_routed_ones():
    cfg = ModelConfig.preset("toy", n_shared_experts=2)
    torch.manual_seed(0)
    moe = MoE(cfg).eval()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(std=0.2)
        moe.gate.e_score_correction_bias.uniform_(-0.1, 0.1)
    x = torch.randn(2, 5, cfg.dim)
    with torch.no_grad():
        out = moe(x)
        weights, indices = moe.gate(x.view(-1, cfg.dim), seq_len=5)  # the routing is tested in test_model.py
        I = cfg.moe_inter_dim
        expected = []
        for t, u in enumerate(x.view(-1, cfg.dim)):
            shared = moe.shared_experts
            h = shared.down_proj.weight @ (F.silu(shared.gate_proj.weight @ u) * (shared.up_proj.weight @ u))
            for g, e in zip(weights[t], indices[t], strict=True):
                w_gate, w_up = moe.experts.w_gate_up[e, :I], moe.experts.w_gate_up[e, I:]
                h = h + g * (moe.experts.w_down[e] @ (F.silu(w_gate @ u) * (w_up @ u)))
            expected.append(h)
    expected = torch.stack(expected).view_as(x)
    # float32 sums in another order: a few units in the last place of the largest terms
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("grouped_mm", [True, False])
def test_grouped_matmul_runs_each_block_of_rows_through_its_own_matrix(grouped_mm, monkeypatch):
    """Blocks of 3, 0, 6 and 2 rows (an empty one, and the last expert used) against one F.linear per block."""
    monkeypatch.setattr(moe_module, "_grouped_mm_fits", lambda rows, w: grouped_mm and hasattr(torch, "_grouped_mm"))
    torch.manual_seed(0)
    rows, w = torch.randn(11, 16, requires_grad=True), torch.randn(4, 8, 16, requires_grad=True)
    ends = torch.tensor([3, 3, 9, 11], dtype=torch.int32)
    grad = torch.randn(11, 8)
    out = grouped_matmul(rows, w, ends)
    ours = [out, *torch.autograd.grad(out, (rows, w), grad)]
    bounds = [0, 3, 3, 9, 11]
    expected = torch.cat([F.linear(rows[a:b], w[e]) for e, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))])
    theirs = [expected, *torch.autograd.grad(expected, (rows, w), grad)]
    for name, a, b in zip(["out", "rows", "w"], ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    assert ours[2][1].abs().max() == 0  # the expert without rows gets a zero gradient


@pytest.mark.parametrize("grouped_mm", [True, False])
def test_the_grouped_operator_for_torch_compile_gives_the_eager_bits_and_gradients(grouped_mm, monkeypatch):
    """grouped_matmul as a custom operator (what a compiled graph calls): the eager code's output and gradients,
    bit for bit; its fake (shape) and autograd registrations pass
    torch.library.opcheck."""
    monkeypatch.setattr(moe_module, "_grouped_mm_fits", lambda rows, w: grouped_mm and hasattr(torch, "_grouped_mm"))
    torch.manual_seed(0)
    # blocks long enough that a sum in another order (the weight gradient as one padded bmm) changes some bits
    rows, w = torch.randn(1000, 64, requires_grad=True), torch.randn(4, 32, 64, requires_grad=True)
    ends, grad = torch.tensor([200, 200, 500, 1000], dtype=torch.int32), torch.randn(1000, 32)
    results = []
    for fn in (moe_module._grouped_matmul_eager, moe_module._grouped_matmul_op):
        out = fn(rows, w, ends)
        results.append([out, *torch.autograd.grad(out, (rows, w), grad)])
    for name, eager, op in zip(["out", "rows", "w"], *results, strict=True):
        assert torch.equal(eager, op), name
    torch.library.opcheck(moe_module._grouped_matmul_op, (rows, w, ends))


def test_expert_load_counts_only_the_counted_tokens():
    """last_load (what the bias update reads) counts each routed (token, expert) pair of the counted tokens once."""
    cfg = ModelConfig.preset("toy")
    torch.manual_seed(0)
    gate = MoE(cfg).gate
    x, counted = torch.randn(6, cfg.dim), torch.tensor([True, False, True, True, False, True])
    _, indices = gate(x, seq_len=6, counted=counted)
    assert torch.equal(gate.last_load, torch.bincount(indices[counted].flatten(), minlength=cfg.n_routed_experts).float())
    gate(x, seq_len=6)
    assert torch.equal(gate.last_load, torch.bincount(indices.flatten(), minlength=cfg.n_routed_experts).float())
