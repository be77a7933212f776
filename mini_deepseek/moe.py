"""DeepSeekMoE (DeepSeek-V3 section 2.1.2): shared experts plus fine-grained routed experts.

    h'_t = u_t + sum_i FFN^(s)_i(u_t) + sum_i g_{i,t} FFN^(r)_i(u_t)

The gate (DeepSeek-V3 eqs. 13-16, and section 2.1.2 "Auxiliary-Loss-Free Load Balancing"):
- affinities s_{i,t} = sigmoid(u_t . e_i) (V2: softmax over experts);
- a per-expert bias b_i is added for *selection only*: the top-k picks experts by s_{i,t} + b_i, but the gating
  weights come from the unbiased s_{i,t}, normalized over the chosen k, times the routed scaling factor;
- group-limited routing: experts are split into n_group groups (nodes); a group scores the sum of its top-2
  biased affinities (V2 used the max), only the best topk_group groups stay eligible;
- after each training step b_i moves by gamma towards balance: down if expert i was overloaded, up if underloaded;
- a complementary sequence-wise balance loss alpha * sum_i f_i P_i guards against extreme imbalance within one
  sequence.
The classic alternative, DeepSeek-V2's expert-level auxiliary loss (section 2.2.1; Switch Transformer's load
balancing loss), is the same alpha * sum_i f_i P_i over all tokens of the batch (`aux_loss_alpha`). It can replace
the bias or run beside it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kernels

from .config import ModelConfig
from .kernel_switch import use_kernels
from .mlp import MLP


class Gate(nn.Module):
    """Routes each token to top-k experts; `weight` and `e_score_correction_bias` as in the checkpoints."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.topk, self.n_experts = cfg.n_activated_experts, cfg.n_routed_experts
        self.n_groups, self.topk_groups = cfg.n_expert_groups, cfg.n_limited_groups
        self.score_func, self.route_scale, self.norm_topk_prob = cfg.score_func, cfg.route_scale, cfg.norm_topk_prob
        self.bias_update_speed, self.seq_aux_alpha = cfg.bias_update_speed, cfg.seq_aux_alpha
        self.aux_loss_alpha = cfg.aux_loss_alpha
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        # A buffer, not a parameter: the bias is moved by the balancing rule, never by gradients. V2's softmax
        # gate has none (and neither do its checkpoints).
        bias = torch.zeros(cfg.n_routed_experts, dtype=torch.float32) if cfg.score_func == "sigmoid" else None
        self.register_buffer("e_score_correction_bias", bias)
        self.last_load: torch.Tensor | None = None  # tokens routed per expert in the last forward, [E]
        self.balance_loss: torch.Tensor | None = None  # sequence-wise balance loss of the last training forward
        self.expert_balance_loss: torch.Tensor | None = None  # expert-level auxiliary loss of the last training forward

    def _apply(self, fn, recurse: bool = True):
        """Module.to(dtype), .half() and .bfloat16() cast every floating buffer; the routing bias stays float32 (only
        its device follows), as transformers keeps it (`_keep_in_fp32_modules_strict`). In bfloat16 the bias could
        not move: around 0.5 its spacing is 2^-8, so +gamma (0.001) rounds away and -gamma becomes -0.00195."""
        bias = self.e_score_correction_bias
        super()._apply(fn, recurse)
        if bias is not None:
            self.e_score_correction_bias = bias.to(self.e_score_correction_bias.device)
        return self

    def forward(self, x: torch.Tensor, seq_len: int,
                counted: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, dim] (N = batch * seq_len tokens) -> gating weights [N, k] (x's dtype), expert ids [N, k].

        counted [N] bool: the tokens that enter the routing statistics (last_load, which the bias update reads,
        and the sequence-wise loss); padding and positions whose target is -100 do not. None: every token.
        """
        with torch.autocast(x.device.type, enabled=False):  # routing in float32, as the reference does, even under
            logits = F.linear(x.float(), self.weight.float())  # autocast (DeepSeek-V3 keeps the gate out of BF16/FP8)
        scores = logits.sigmoid() if self.score_func == "sigmoid" else logits.softmax(dim=-1)  # [N, E]
        bias = self.e_score_correction_bias
        biased = scores if bias is None else scores + bias
        if self.n_groups > 1:
            biased = self._mask_groups(biased)
        indices = biased.topk(self.topk, dim=-1).indices  # [N, k]
        weights = scores.gather(1, indices)  # unbiased affinities of the chosen experts
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * self.route_scale
        with torch.no_grad():  # a count per expert as a sum of ones (not bincount: its shape would depend on the
            # data for torch.compile), over the counted tokens only
            ones = torch.ones_like(weights) if counted is None else counted[:, None].expand_as(weights).float()
            self.last_load = weights.new_zeros(self.n_experts).index_add_(0, indices.flatten(), ones.flatten())
        self.balance_loss = self._sequence_balance_loss(scores, seq_len, counted) \
            if self.training and self.seq_aux_alpha > 0 else None
        self.expert_balance_loss = self._expert_balance_loss(scores, counted) \
            if self.training and self.aux_loss_alpha > 0 else None
        return weights.to(x.dtype), indices

    def _mask_groups(self, biased: torch.Tensor) -> torch.Tensor:
        N = biased.shape[0]
        grouped = biased.view(N, self.n_groups, -1)  # [N, G, E/G]
        if self.score_func == "sigmoid":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [N, G]
        else:
            group_scores = grouped.amax(dim=-1)
        keep = group_scores.topk(self.topk_groups, dim=-1).indices  # [N, topk_groups]
        dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
        # -inf, not 0: biased scores can be negative, and a masked expert must never win the top-k.
        # (DeepSeek's inference code and transformers 5's DeepSeek-V3 do the same; transformers 4.x filled 0.0, which
        # agrees only while the kept experts' biased scores stay positive.)
        return grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).view(N, -1)

    def _sequence_balance_loss(self, scores: torch.Tensor, seq_len: int,
                               counted: torch.Tensor | None) -> torch.Tensor:
        """alpha * sum_i f_i P_i per sequence (DeepSeek-V3 eqs. 17-20), averaged over the sequences.

        T of eqs. 18 and 20 is the number of counted tokens of each sequence; a sequence with none adds nothing
        (0 when no sequence has any). The indicator of eq. 18 is TopK of the unbiased affinities s_{i,t}, as the
        report writes it, not the biased, group-limited choice that routes the token.
        """
        E, k = self.n_experts, self.topk
        probs = scores / scores.sum(dim=-1, keepdim=True)  # s'_{i,t}: affinities normalized over all experts
        in_topk = torch.zeros_like(scores).scatter_(1, scores.topk(k, dim=-1).indices, 1.0)  # [N, E], eq. 18
        w = torch.ones_like(scores[:, :1]) if counted is None else counted.float()[:, None]  # [N, 1]
        w = w.view(-1, seq_len, 1)  # [B, T, 1]
        tokens = w.sum(dim=1)  # [B, 1]: T of each sequence
        per_token = tokens.clamp(min=1)  # no 0/0 (its gradient would be NaN) for a sequence without tokens
        f = (in_topk.view(-1, seq_len, E) * w).sum(dim=1) * (E / k) / per_token  # [B, E]: N_r / (K_r T) * count
        P = (probs.view(-1, seq_len, E) * w).sum(dim=1) / per_token  # [B, E]
        has_tokens = (tokens.squeeze(1) > 0).to(f.dtype)  # [B]
        # The mean over the sequences that have tokens as a masked sum: no branch on a value and no shape that
        # depends on one, so torch.compile keeps it in the graph (the same bits as .mean() when all have tokens).
        per_sequence = (f * P).sum(dim=-1) * has_tokens  # [B]
        return self.seq_aux_alpha * (per_sequence.sum() / has_tokens.sum().clamp(min=1))

    def _expert_balance_loss(self, scores: torch.Tensor, counted: torch.Tensor | None) -> torch.Tensor:
        """alpha * sum_i f_i P_i over the N counted tokens of the batch (DeepSeek-V2 eqs. 21-23, expert-level).

        f_i = E / (k N) * (tokens routed to expert i): 1 for every expert under perfect balance. It counts the
        experts actually chosen (with the bias, when both methods run), and is a constant: the gradient flows
        through P_i = mean affinity of expert i, normalized over all experts as the sequence-wise loss does (V2's
        softmax scores already sum to one). It falls when the affinities of the overloaded experts fall. 0 when
        no token is counted.
        """
        E = self.n_experts
        w = torch.ones_like(scores[:, 0]) if counted is None else counted.to(scores.dtype)  # [N]: 1 = counted
        # Means over the counted tokens as masked sums: no shape or branch depends on a value, so torch.compile
        # keeps them in the graph (the same bits as .mean(dim=0) when every token counts).
        n = w.sum().clamp(min=1)  # N
        probs = scores / scores.sum(dim=-1, keepdim=True)  # [N, E]
        counts = self.last_load.to(probs.dtype)  # [E]: the forward's count of the counted tokens; no gradient (top-k)
        f = counts * E / (self.topk * n)  # [E]
        P = (probs * w[:, None]).sum(dim=0) / n  # [E]
        return self.aux_loss_alpha * (f * P).sum()

    @torch.no_grad()
    def update_bias(self) -> None:
        """Auxiliary-loss-free balancing: b_i += gamma * sign(mean load - load_i), from the last forward."""
        if self.last_load is None or self.bias_update_speed == 0 or self.e_score_correction_bias is None:
            return
        self.e_score_correction_bias += self.bias_update_speed * torch.sign(self.last_load.mean() - self.last_load)


class RoutedExperts(nn.Module):
    """All routed experts' SwiGLU weights stacked, as fused MoE kernels want them.

    w_gate_up [E, 2I, dim] holds each expert's gate rows then up rows; w_down [E, dim, I]. The published
    checkpoints store per-expert `experts.{e}.gate_proj/up_proj/down_proj`; the checkpoint loader stacks them.
    With the kernel switch on (kernel_switch.py) they run as `kernels.fused_moe`, else as two grouped matrix
    products below (kernels/reference.py holds the kernels' own plain-PyTorch specification, a loop over experts as
    DeepSeek's inference/model.py MoE.forward writes it; a test checks that the two agree, gradients included);
    fp8.FP8RoutedExperts holds them in FP8.
    """

    def __init__(self, n_experts: int, dim: int, inter_dim: int):
        super().__init__()
        self.n_experts, self.inter_dim = n_experts, inter_dim
        self.w_gate_up = nn.Parameter(torch.empty(n_experts, 2 * inter_dim, dim))
        self.w_down = nn.Parameter(torch.empty(n_experts, dim, inter_dim))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x [N, dim], weights/indices [N, k] -> sum_j weights[:, j] * expert_{indices[:, j]}(x), [N, dim]."""
        # The fused kernel has no autograd: while gradients flow to these weights (training), take the grouped path.
        if use_kernels(x) and not (torch.is_grad_enabled() and self.w_gate_up.requires_grad):
            return kernels.fused_moe(x, self.w_gate_up, self.w_down, weights, indices)
        # The N*k (token, expert) pairs sorted by expert: each expert's tokens become one contiguous block of rows,
        # so every expert runs in two grouped matrix products, with no Python loop over experts (or per token).
        k = indices.shape[1]
        expert_of_pair, pair = indices.flatten().sort(stable=True)  # [N*k]; pair p is token p // k, slot p % k
        ends = torch.searchsorted(expert_of_pair, torch.arange(self.n_experts, device=x.device), right=True,
                                  out_int32=True)  # [E]: row after expert e's block
        token = pair // k
        gate, up = grouped_matmul(x[token], self.w_gate_up, ends).chunk(2, dim=-1)  # [N*k, I] each
        out = grouped_matmul(F.silu(gate) * up, self.w_down, ends)  # [N*k, dim]
        out = out * weights.flatten()[pair, None]  # scaled by each pair's gating weight
        return torch.zeros_like(x).index_add_(0, token, out.to(x.dtype))  # y[token] += out, over its k experts


def grouped_matmul(rows: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """rows [M, K] in E blocks (block e: rows ends[e-1]..ends[e]-1, int32 [E]) times w [E, out, K] -> [M, out]:
    block e through w[e], as F.linear. torch._grouped_mm where this torch has it for the device and dtype, else
    the blocks padded to the longest one and one batched matmul (bmm). Under torch.compile: the same, as one
    opaque operator (below)."""
    if torch.compiler.is_compiling():
        return _grouped_matmul_op(rows, w, ends)
    return _grouped_matmul_eager(rows, w, ends)


def _grouped_matmul_eager(rows: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    if _grouped_mm_fits(rows, w):
        return torch._grouped_mm(rows, w.transpose(1, 2), offs=ends)
    (padded,), expert, slot = _pad_blocks(ends, rows)  # [E, longest, K]
    return torch.bmm(padded, w.transpose(1, 2))[expert, slot]  # [E, longest, out] -> [M, out]


def _pad_blocks(ends: torch.Tensor, *tensors: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """tensors [M, ·] whose rows form E blocks (ends as in grouped_matmul) -> each with its blocks padded by zero
    rows to the longest, [E, longest, ·], and each row's block [M] and slot in it [M]."""
    E, M = ends.shape[0], tensors[0].shape[0]
    starts = torch.cat([ends.new_zeros(1), ends[:-1]]).long()  # [E]
    counts = ends.long() - starts
    longest = int(counts.max()) if M else 0
    expert = torch.repeat_interleave(torch.arange(E, device=ends.device), counts, output_size=M)  # [M]
    slot = torch.arange(M, device=ends.device) - starts[expert]  # [M]: position of each row within its block
    padded = [t.new_zeros(E, longest, t.shape[1]).index_put((expert, slot), t) for t in tensors]
    return padded, expert, slot


def _grouped_mm_fits(rows: torch.Tensor, w: torch.Tensor) -> bool:
    """torch._grouped_mm runs on CPU (float32, bfloat16) and on CUDA GPUs from compute capability 9.0 (bfloat16),
    with rows of a multiple of 16 bytes."""
    if not hasattr(torch, "_grouped_mm") or rows.dtype != w.dtype:
        return False
    aligned = all(n * rows.element_size() % 16 == 0 for n in (rows.shape[1], w.shape[1]))
    if rows.device.type == "cpu":
        return aligned and rows.dtype in (torch.float32, torch.bfloat16)
    if rows.device.type == "cuda":
        return aligned and rows.dtype == torch.bfloat16 and torch.cuda.get_device_capability(rows.device) >= (9, 0)
    return False


# torch.compile cannot trace the grouped product itself: torch._grouped_mm's shape rule (torch 2.13) accepts
# bfloat16 only, and the padded fallback's shape depends on the data (a graph break each). As custom operators the
# product and its gradients are opaque calls in the compiled graph, run by the eager code above.
@torch.library.custom_op("mini_deepseek::grouped_matmul", mutates_args=())
def _grouped_matmul_op(rows: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    return _grouped_matmul_eager(rows, w, ends)


@_grouped_matmul_op.register_fake
def _(rows: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    return rows.new_empty(rows.shape[0], w.shape[1])


@torch.library.custom_op("mini_deepseek::grouped_matmul_grads", mutates_args=())
def _grouped_matmul_grads(grad: torch.Tensor, rows: torch.Tensor, w: torch.Tensor,
                          ends: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """grouped_matmul's gradients for grad [M, out]: to the rows, grad through each block's w[e] transposed [M, K];
    to the weights, block e's grad^T rows [E, out, K]: torch._grouped_mm grouped along the contraction (M), as
    eager autograd of torch._grouped_mm computes it (the same bits), else one batched product of the padded blocks."""
    grad_rows = _grouped_matmul_eager(grad, w.transpose(1, 2), ends)
    if _grouped_mm_fits(rows, w):
        return grad_rows, torch._grouped_mm(grad.t(), rows, offs=ends)
    (padded_grad, padded_rows), _, _ = _pad_blocks(ends, grad, rows)  # [E, longest, out], [E, longest, K]
    return grad_rows, torch.bmm(padded_grad.transpose(1, 2), padded_rows)


@_grouped_matmul_grads.register_fake
def _(grad: torch.Tensor, rows: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(rows), torch.empty_like(w)


def _save_grouped_inputs(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _grouped_matmul_backward(ctx, grad: torch.Tensor):
    rows, w, ends = ctx.saved_tensors
    # contiguous: the gradient of a sum arrives as an expanded (stride 0) tensor, which _grouped_mm refuses
    return (*_grouped_matmul_grads(grad.contiguous(), rows, w, ends), None)


_grouped_matmul_op.register_autograd(_grouped_matmul_backward, setup_context=_save_grouped_inputs)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Gate(cfg)
        self.experts = RoutedExperts(cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim)
        # The shared experts always run on every token, so they are one MLP of n_shared * moe_inter_dim width.
        self.shared_experts = MLP(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim) if cfg.n_shared_experts else None

    def forward(self, x: torch.Tensor, counted: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, dim] -> [B, T, dim]; counted [B, T] bool: the tokens that enter the routing statistics (Gate)."""
        B, T, D = x.shape
        flat = x.view(B * T, D)
        weights, indices = self.gate(flat, seq_len=T, counted=None if counted is None else counted.reshape(B * T))
        y = self.experts(flat, weights, indices)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        return y.view(B, T, D)
