"""Expert parallelism over 2 and 4 spawned processes (gloo): outputs and gradients equal the single-process MoE
layer, uneven and empty exchanges work, and bad setups raise clear errors on every rank (run_processes itself is
tested in test_distributed.py). NCCL runs the same workers when there are enough GPUs.
"""

import copy

import pytest
import torch
import torch.distributed as dist

from mini_deepseek import ModelConfig
from mini_deepseek.distributed import run_processes
from mini_deepseek.expert_parallel import ExpertParallelMoE
from mini_deepseek.moe import MoE

# 8 routed experts (top-2) in 2 groups with 1 kept, a shared expert: every routing mechanism on.
TINY = dict(dim=32, moe_inter_dim=16, n_routed_experts=8, n_activated_experts=2, n_expert_groups=2,
            n_limited_groups=1, n_shared_experts=1, route_scale=2.5)
BATCH, SEQ = 3, 10  # tokens per rank: 30
TIMEOUT_S = 120


def make_moe(seed: int = 0, **overrides) -> MoE:
    """The same weights in every process that calls it with the same seed."""
    torch.manual_seed(seed)
    moe = MoE(ModelConfig.preset("toy", **{**TINY, **overrides}))
    with torch.no_grad():
        for param in moe.parameters():
            param.normal_(0, 0.3)
        moe.gate.e_score_correction_bias.uniform_(-0.1, 0.1)
    return moe


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def equivalence_worker(rank: int, world_size: int, bias_changes: dict[int, float], device: str) -> dict:
    """Run one ExpertParallelMoE step on this rank's tokens and compare with one process over all ranks' tokens."""
    device = torch.device(device, rank) if device == "cuda" else torch.device(device)
    moe = make_moe().to(device)
    for expert, value in bias_changes.items():
        moe.gate.e_score_correction_bias[expert] = value
    torch.manual_seed(1)  # every rank draws all inputs, then keeps its own slice
    x_all = torch.randn(world_size * BATCH, SEQ, TINY["dim"], device=device)
    grad_all = torch.randn_like(x_all)
    counted_all = torch.rand(world_size * BATCH, SEQ, device=device) > 0.2  # e.g. targets of -100 left out
    mine = slice(rank * BATCH, (rank + 1) * BATCH)

    reference = copy.deepcopy(moe)
    x_ref = x_all.clone().requires_grad_(True)
    y_ref = reference(x_ref, counted_all)
    (y_ref * grad_all).sum().backward()

    layer = ExpertParallelMoE(moe)
    x = x_all[mine].clone().requires_grad_(True)
    y = layer(x, counted_all[mine])
    (y * grad_all[mine]).sum().backward()

    local = slice(layer.first_expert, layer.first_expert + layer.n_local)
    replicated = {name: p.grad.clone() for name, p in [("gate", layer.gate.weight),
                                                       *layer.shared_experts.named_parameters()]}
    for grad in replicated.values():
        dist.all_reduce(grad)  # each rank holds its tokens' share of the replicated weights' gradient
    shared_ref = dict(reference.shared_experts.named_parameters())
    return {  # largest differences, relative to the largest reference value (float32 sums in other orders)
        "y": relative(y, y_ref[mine]),
        "x_grad": relative(x.grad, x_ref.grad[mine]),
        "w_gate_up_grad": relative(layer.experts.w_gate_up.grad, reference.experts.w_gate_up.grad[local]),
        "w_down_grad": relative(layer.experts.w_down.grad, reference.experts.w_down.grad[local]),
        "gate_grad": relative(replicated["gate"], reference.gate.weight.grad),
        "shared_grad": max(relative(replicated[n], shared_ref[n].grad) for n in shared_ref),
        "load": layer.gate.last_load,  # all-reduced: the load over every rank's counted tokens
        "load_ref": reference.gate.last_load,
        "slots_ref": torch.bincount(reference.gate(x_all.flatten(0, 1), seq_len=SEQ)[1].flatten(),
                                    minlength=TINY["n_routed_experts"]),  # every token's k copies, counted or not
        "stats": layer.gather_stats(),
        "expert_grad_norm": layer.experts.w_gate_up.grad.norm(),
    }


def bad_setup_worker(rank: int, world_size: int) -> dict:
    """Mismatched weights, and an expert count the world size does not divide: every rank must raise."""
    errors = {}
    moe = make_moe()
    if rank == 1:
        with torch.no_grad():
            moe.experts.w_down[3, 0, 0] += 1e-4  # one weight differs on one rank
    try:
        ExpertParallelMoE(moe)
    except ValueError as error:
        errors["mismatch"] = str(error)
    try:
        ExpertParallelMoE(make_moe(n_routed_experts=6, n_expert_groups=1, n_limited_groups=1))
    except ValueError as error:
        errors["indivisible"] = str(error)
    return errors


def check_equivalence(results: list[dict], world_size: int) -> None:
    for rank, result in enumerate(results):
        for key in ("y", "x_grad", "w_gate_up_grad", "w_down_grad", "gate_grad", "shared_grad"):
            assert result[key] < 1e-6, f"rank {rank} of {world_size}: {key} differs by {result[key]:.2e} (relative)"
        assert torch.equal(result["load"], result["load_ref"])
    stats = results[0]["stats"]
    assert [s["rank"] for s in stats] == list(range(world_size))
    received = torch.cat([torch.tensor(s["tokens_per_expert"]) for s in stats])  # [E], ranks in order
    assert torch.equal(received, results[0]["slots_ref"])  # every token copy arrived at its expert's rank
    assert all(s["calls"] == 1 and s["exchange_seconds"] > 0 for s in stats)


@pytest.mark.parametrize("world_size", [2, 4])
def test_expert_parallel_matches_one_process(world_size):
    results = run_processes(equivalence_worker, world_size, {}, "cpu", timeout_s=TIMEOUT_S)
    check_equivalence(results, world_size)
    loads = [sum(s["tokens_per_expert"]) for s in results[0]["stats"]]
    assert len(set(loads)) > 1, f"the splits were even ({loads}): this test needs uneven exchanges"


def test_expert_parallel_with_idle_experts_and_an_idle_rank():
    # Experts 4..7 (all of rank 1's) sink below every other: their group is never kept, so rank 1 receives no
    # rows at all, and expert 1 is never chosen either. Rank 1 still joins every exchange, backward included.
    changes = {1: -50.0, 4: -100.0, 5: -100.0, 6: -100.0, 7: -100.0}
    results = run_processes(equivalence_worker, 2, changes, "cpu", timeout_s=TIMEOUT_S)
    check_equivalence(results, 2)
    stats = results[0]["stats"]
    assert stats[1]["tokens"] == 0 and stats[0]["tokens_per_expert"][1] == 0
    assert results[1]["expert_grad_norm"] == 0


def test_bad_setups_raise_on_every_rank():
    results = run_processes(bad_setup_worker, 4, timeout_s=TIMEOUT_S)
    for rank, errors in enumerate(results):
        assert "differ between rank 0 and rank 1" in errors["mismatch"] and "w_down" in errors["mismatch"], rank
        assert "n_routed_experts = 6 is not divisible by the world size 4" in errors["indivisible"], rank


def test_needs_an_initialized_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        ExpertParallelMoE(make_moe())


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL expert parallelism needs two GPUs")
def test_expert_parallel_on_nccl():
    results = run_processes(equivalence_worker, 2, {}, "cuda", backend="nccl", timeout_s=TIMEOUT_S)
    check_equivalence(results, 2)
