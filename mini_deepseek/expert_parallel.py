"""Expert parallelism: the routed experts of one MoE layer spread over W processes, tokens sent to them and back.

DeepSeek-V3 trains with 64-way expert parallelism over 8 nodes (V3 report section 3.2) and serves with 32- and
320-way (section 3.4): every GPU holds a few routed experts, and each token's hidden state travels to the GPUs of
the k experts it chose (dispatch) and the expert outputs travel back (combine), both as all-to-all exchanges. The
gate and the shared experts are replicated: each process routes and runs the shared experts on its own tokens.

    rank r:  tokens [N, dim] --gate--> (expert ids, weights) [N, k]
             slots sorted by expert (= by owning rank) --all-to-all--> rows for r's experts, from every rank
             local experts r*E/W .. (r+1)*E/W - 1 on those rows
             --all-to-all back--> each slot's expert output at its token's rank; y = sum_j weight_j * output_j

A rank whose experts are popular receives more rows and computes longer, and every other rank waits for it in the
combine exchange: this is what imbalance costs under expert parallelism, and what the per-rank counters measure.

`ExpertParallelMoE(moe)` wraps an existing `moe.MoE` built with the same weights on every rank (checked). Its
forward on each rank's own tokens returns what `moe(x)` returns, and its backward gives each local expert the
gradient it would get in one process over all ranks' tokens; the gate and shared-expert gradients are each
rank's share (sum them over ranks, as data parallelism does). Works with gloo (CPU processes) and NCCL (one GPU
per process). `distributed.run_processes` starts W local processes in a process group, for tests and the notebook.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .moe import MoE, RoutedExperts


@dataclasses.dataclass
class ExpertParallelStats:
    """Counters of one rank, summed over forward (and backward) calls since the last reset."""

    tokens_per_expert: torch.Tensor  # [E/W] token copies (slots) received per local expert, from every rank
    expert_seconds: float = 0.0  # time computing the local experts
    exchange_seconds: float = 0.0  # time inside the all-to-all exchanges, waiting for the slowest rank included
    calls: int = 0  # forward calls

    def as_dict(self) -> dict[str, Any]:
        return {"tokens_per_expert": self.tokens_per_expert.tolist(), "tokens": int(self.tokens_per_expert.sum()),
                "expert_seconds": self.expert_seconds, "exchange_seconds": self.exchange_seconds,
                "calls": self.calls}


@dataclasses.dataclass
class _Plan:
    """Who sends how many rows to whom in one forward (all lists have one entry per rank)."""

    send_splits: list[int]  # rows this rank sends to each rank (its slots, sorted by expert)
    recv_splits: list[int]  # rows this rank receives from each rank
    local_ids: torch.Tensor  # [R] local expert of each received row (source-major, then expert-minor)


class ExpertParallelMoE(nn.Module):
    """An `MoE` layer whose routed experts are split over the ranks of a process group.

    moe: the layer to distribute, with identical weights on every rank (checked here: a mismatch raises on every
    rank). Rank r keeps copies of routed experts r*E/W .. (r+1)*E/W - 1 (self.experts), shares the gate and the
    shared experts with `moe`, and keeps no reference to the other experts. group: the process group (None: the
    default group; torch.distributed must be initialized). sync_load: all-reduce the gate's last_load over the
    ranks, so the bias update (Gate.update_bias) sees the whole batch's load and keeps the biases equal on every
    rank, as DeepSeek-V3 balances over the global batch.
    """

    def __init__(self, moe: MoE, group: dist.ProcessGroup | None = None, sync_load: bool = True):
        super().__init__()
        if not isinstance(moe, MoE) or type(moe.experts) is not RoutedExperts:
            raise TypeError(f"ExpertParallelMoE wraps a mini_deepseek.moe.MoE with plain RoutedExperts, got "
                            f"{type(moe).__name__} with {type(getattr(moe, 'experts', None)).__name__}")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ExpertParallelMoE needs a process group: call torch.distributed.init_process_group "
                               "(e.g. backend='gloo' on CPUs, 'nccl' on GPUs) in every process first")
        self.group = group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        n_experts = moe.experts.w_gate_up.shape[0]
        if n_experts % self.world_size:
            raise ValueError(f"n_routed_experts = {n_experts} is not divisible by the world size {self.world_size}: "
                             f"every rank must hold the same number of experts")
        _check_same_weights(moe, group)
        self.n_experts, self.n_local = n_experts, n_experts // self.world_size
        self.first_expert = self.rank * self.n_local
        self.sync_load = sync_load
        self.gate = moe.gate
        self.shared_experts = moe.shared_experts
        inter_dim, dim = moe.experts.inter_dim, moe.experts.w_down.shape[1]
        w = moe.experts.w_gate_up
        with torch.device(w.device):
            self.experts = RoutedExperts(self.n_local, dim, inter_dim).to(w.dtype)
        local = slice(self.first_expert, self.first_expert + self.n_local)
        with torch.no_grad():
            self.experts.w_gate_up.copy_(moe.experts.w_gate_up[local])
            self.experts.w_down.copy_(moe.experts.w_down[local])
        self.stats = ExpertParallelStats(torch.zeros(self.n_local, dtype=torch.long))

    # --- forward -----------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, counted: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, dim] (this rank's tokens) -> [B, T, dim], equal to the wrapped moe(x, counted). Every rank must
        call. counted [B, T] bool: the tokens that enter the routing statistics (as MoE.forward)."""
        if x.dim() != 3 or x.shape[-1] != self.gate.weight.shape[1]:
            raise ValueError(f"ExpertParallelMoE expects x [batch, seq, {self.gate.weight.shape[1]}], "
                             f"got {tuple(x.shape)}")
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        weights, indices = self.gate(flat, seq_len=T, counted=None if counted is None else counted.reshape(B * T))
        if self.sync_load:
            dist.all_reduce(self.gate.last_load, group=self.group)  # [E] tokens per expert over all ranks
        k = indices.shape[1]
        flat_ids = indices.flatten()  # [N*k]: slot s is token s // k's (s % k)-th expert
        order = flat_ids.argsort(stable=True)  # slots grouped by expert, hence by the rank that owns it
        tokens = order // k  # [N*k] token of each sorted slot
        plan = self._plan(flat_ids)
        if torch.is_grad_enabled():
            expert_out = _ExchangeAndRun.apply(self, plan, flat[tokens], *self.experts.parameters())
        else:  # inference: the same three steps, no graph to keep
            expert_out = self._exchange_and_run(flat[tokens], plan)
        # [N*k, D] expert outputs in sorted-slot order, back at this rank. Added in that order (expert by expert),
        # as the single-process loop does, so the sums agree to the last bit when the matmuls do.
        y = torch.zeros_like(flat).index_add_(0, tokens, expert_out * weights.flatten()[order, None])
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        self.stats.calls += 1
        return y.view(B, T, D)

    def _plan(self, flat_ids: torch.Tensor) -> _Plan:
        """Exchange the slot counts per expert, so every rank knows how many rows it sends and receives."""
        W, E_local = self.world_size, self.n_local
        send_per_expert = torch.bincount(flat_ids, minlength=self.n_experts)  # [E], expert e lives on rank e // E_local
        recv_per_expert = torch.empty_like(send_per_expert)
        started = self._now()
        # Equal splits of E_local: recv_per_expert[s * E_local + e] = slots rank s sends to my local expert e.
        dist.all_to_all_single(recv_per_expert, send_per_expert, group=self.group)
        self.stats.exchange_seconds += self._now() - started
        recv = recv_per_expert.view(W, E_local)  # [W, E_local]
        self.stats.tokens_per_expert += recv.sum(dim=0).cpu()
        local_ids = torch.arange(E_local, device=flat_ids.device).repeat(W).repeat_interleave(recv.flatten())  # [R]
        return _Plan(send_splits=send_per_expert.view(W, E_local).sum(dim=1).tolist(),
                     recv_splits=recv.sum(dim=1).tolist(), local_ids=local_ids)

    def _exchange_and_run(self, x_slots: torch.Tensor, plan: _Plan) -> torch.Tensor:
        """Dispatch x_slots [N*k, D] to the experts' ranks, run the local experts, send the outputs back."""
        received = self._exchange(x_slots, plan.recv_splits, plan.send_splits)  # [R, D]
        out = self._run_experts(received, plan)
        return self._exchange(out, plan.send_splits, plan.recv_splits)  # [N*k, D]

    def _run_experts(self, rows: torch.Tensor, plan: _Plan) -> torch.Tensor:
        """rows [R, D] -> each row through its local expert, unweighted (the gating weight is applied at home)."""
        started = self._now()
        ones = torch.ones(rows.shape[0], 1, dtype=rows.dtype, device=rows.device)
        out = self.experts(rows, ones, plan.local_ids[:, None])  # the library's grouped experts, one expert per row
        self.stats.expert_seconds += self._now() - started
        return out

    def _exchange(self, rows: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
        """all_to_all_single: rows [sum(in_splits), D] -> [sum(out_splits), D]; in_splits[r] rows go to rank r."""
        out = rows.new_empty(sum(out_splits), rows.shape[1])
        started = self._now()
        dist.all_to_all_single(out, rows.contiguous(), out_splits, in_splits, group=self.group)
        self.stats.exchange_seconds += self._now() - started
        return out

    def _now(self) -> float:
        # GPU work is asynchronous: wait for it, or the clock measures only the launches.
        if self.gate.weight.is_cuda:
            torch.cuda.synchronize(self.gate.weight.device)
        return time.perf_counter()

    # --- counters ----------------------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        self.stats = ExpertParallelStats(torch.zeros(self.n_local, dtype=torch.long))

    def gather_stats(self) -> list[dict[str, Any]]:
        """Every rank's counters, in rank order (a collective: every rank must call)."""
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, {"rank": self.rank, "first_expert": self.first_expert,
                                          **self.stats.as_dict()}, group=self.group)
        return gathered


class _ExchangeAndRun(torch.autograd.Function):
    """Dispatch, local experts, combine, with a backward that mirrors it: output gradients travel back to the
    experts' ranks, through the local experts, and the input gradients travel home.

    One Function for all three steps makes every rank run both backward exchanges in the same order, even a
    rank that received no rows at all (an autograd graph through separate exchanges would skip that rank's
    backward there and leave the others waiting in the collective).
    """

    @staticmethod
    def forward(ctx, layer: ExpertParallelMoE, plan: _Plan, x_slots: torch.Tensor, *params: torch.Tensor):
        received = layer._exchange(x_slots.detach(), plan.recv_splits, plan.send_splits)  # [R, D]
        with torch.enable_grad():  # a local graph from the received rows and the expert weights to their outputs
            received.requires_grad_(True)
            out = layer._run_experts(received, plan)  # [R, D]
        ctx.layer, ctx.plan, ctx.params = layer, plan, params
        ctx.received, ctx.out = received, out
        return layer._exchange(out.detach(), plan.send_splits, plan.recv_splits)  # [N*k, D]

    @staticmethod
    def backward(ctx, grad_slots: torch.Tensor):
        layer, plan = ctx.layer, ctx.plan
        grad_out = layer._exchange(grad_slots, plan.recv_splits, plan.send_splits)  # [R, D] back to the experts
        started = layer._now()
        if ctx.out.requires_grad:  # some rows arrived: backward through the local experts
            grads = torch.autograd.grad(ctx.out, (ctx.received, *ctx.params), grad_out, allow_unused=True)
        else:  # no row arrived here: no gradient for these experts, nothing to send back
            grads = (torch.zeros_like(ctx.received), *(None,) * len(ctx.params))
        layer.stats.expert_seconds += layer._now() - started
        grad_params = [torch.zeros_like(p) if g is None else g for g, p in zip(grads[1:], ctx.params, strict=True)]
        grad_x = layer._exchange(grads[0], plan.send_splits, plan.recv_splits)  # [N*k, D] home again
        ctx.received = ctx.out = None
        return None, None, grad_x, *grad_params


def _fingerprint(tensor: torch.Tensor) -> torch.Tensor:
    """Three float64 numbers that differ, in practice, whenever two tensors differ (a permutation included)."""
    flat = tensor.detach().double().flatten()
    position = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
    return torch.stack([flat.sum(), (flat * flat).sum(), (flat * position.sqrt()).sum()])


def _check_same_weights(moe: MoE, group: dist.ProcessGroup | None) -> None:
    """Raise on every rank (so none is left waiting) if any parameter or buffer of moe differs between ranks."""
    names, fingerprints = zip(*[(name, _fingerprint(t)) for name, t in
                                [*moe.named_parameters(), *moe.named_buffers()]], strict=True)
    mine = torch.stack(fingerprints)  # [n_tensors, 3]
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)  # the list form: gloo has no stacked all_gather_into_tensor
    for rank, theirs in enumerate(everyone):
        differs = ~torch.isclose(theirs, everyone[0], rtol=1e-12, atol=0).all(dim=1)
        if differs.any():
            bad = [names[i] for i in differs.nonzero().flatten().tolist()]
            raise ValueError(f"ExpertParallelMoE: the MoE weights differ between rank 0 and rank {rank} in {bad}; "
                             f"build the layer from the same seed or checkpoint on every rank")


def profile_expert_parallel(rank: int, world_size: int, layers: dict[str, tuple[dict, dict, torch.Tensor]],
                            repeats: int = 5) -> dict[str, dict[str, Any]]:
    """A run_processes worker: time trained MoE layers under expert parallelism.

    layers: name -> (ModelConfig.to_dict(), MoE state_dict, inputs [W * B, T, dim]); rank r takes input rows
    r*B .. (r+1)*B - 1. For each layer: check the expert-parallel output against the whole layer on this rank's
    tokens, then run `repeats` forward passes (no gradients) and return, per layer, the largest difference, the
    wall time per forward and every rank's counters (summed over the repeats: divide by "calls").
    """
    from .config import ModelConfig

    profiles = {}
    for name, (config, state, inputs) in layers.items():
        batch = inputs.shape[0] // world_size
        x = inputs[rank * batch:(rank + 1) * batch]
        moe = MoE(ModelConfig(**config))
        moe.load_state_dict(state)
        moe.eval()
        with torch.no_grad():
            expected = moe(x)
            layer = ExpertParallelMoE(moe, sync_load=False)
            difference = (layer(x) - expected).abs().max().item()
            layer.reset_stats()
            dist.barrier()
            started = time.perf_counter()
            for _ in range(repeats):
                layer(x)
            wall = (time.perf_counter() - started) / repeats
        profiles[name] = {"max_difference": difference, "seconds_per_forward": wall, "ranks": layer.gather_stats()}
    return profiles
