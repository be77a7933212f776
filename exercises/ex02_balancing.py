"""Exercise set 02: MoE load balancing. The expert-level auxiliary loss, DeepSeek-V3's sequence-wise loss, the
auxiliary-loss-free bias update, group-limited top-k routing, and MaxVio (notebooks/02_moe_load_balancing.ipynb).

Replace each `raise NotImplementedError` with your implementation, then grade it in a notebook with
`check("update_bias")` or from the shell with `make grade`. Reference answers: solutions/ex02_balancing.py.
Shapes use N tokens, B sequences of T tokens, E routed experts, k experts per token (top-k).
"""

import torch


def expert_balance_loss(scores: torch.Tensor, indices: torch.Tensor, alpha: float) -> torch.Tensor:
    """The expert-level auxiliary loss over all N tokens of a batch (DeepSeek-V2 eqs. 21-23; Switch Transformer).

    scores [N, E]: the affinities s_{i,t} (sigmoid, or softmax for V2); indices [N, k]: the k experts each token
    was routed to. With s'_{i,t} = s_{i,t} / sum_j s_{j,t} (affinities normalized over all experts):
        f_i = E / (k N) * (number of tokens routed to expert i)     (1 for every expert under perfect balance)
        P_i = 1/N * sum_t s'_{i,t}
        loss = alpha * sum_i f_i P_i
    Returns a 0-dim tensor that carries the gradient to `scores` (only through P: f counts, it is not differentiable).
    """
    raise NotImplementedError("Exercise expert_balance_loss: alpha * sum_i f_i P_i over all tokens of the batch")


def sequence_balance_loss(scores: torch.Tensor, k: int, alpha: float) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss (V3 report, eqs. 17-20), averaged over the batch.

    scores [B, T, E]: the unbiased affinities s_{i,t} of B sequences of T tokens. For each sequence separately:
        f_i = E / (k T) * sum_t 1(s_{i,t} is among the k largest of s_{1,t} .. s_{E,t})   (eq. 18: top-k of the
              unbiased affinities, whatever the bias did to the actual routing)
        P_i = 1/T * sum_t s'_{i,t},  with s'_{i,t} = s_{i,t} / sum_j s_{j,t}
        L_seq = alpha * sum_i f_i P_i
    Returns the mean of L_seq over the B sequences (a 0-dim tensor, differentiable through P).
    A batch can be balanced as a whole while every sequence is not: this loss sees the difference.
    """
    raise NotImplementedError("Exercise sequence_balance_loss: alpha * sum_i f_i P_i within each sequence")


def update_bias(bias: torch.Tensor, load: torch.Tensor, gamma: float) -> torch.Tensor:
    """One step of auxiliary-loss-free balancing (DeepSeek-V3 section 2.1.2; Wang et al. 2024, arXiv 2408.15664).

    bias [E]: the routing bias b_i; load [E]: tokens routed to each expert in the last batch; gamma: update speed.
    An overloaded expert (load above the mean load) has its bias decreased by gamma, an underloaded one increased
    by gamma, one exactly at the mean keeps its bias:
        b_i <- b_i + gamma * sign(mean(load) - load_i)
    Returns the new bias as a new tensor (leave `bias` unchanged).
    """
    raise NotImplementedError("Exercise update_bias: b_i + gamma * sign(mean load - load_i)")


def group_limited_topk(scores: torch.Tensor, bias: torch.Tensor, k: int, n_groups: int, topk_groups: int
                       ) -> torch.Tensor:
    """DeepSeek-V3's expert selection: group (node) limited top-k on the biased affinities.

    scores [N, E]: affinities s_{i,t}; bias [E]. The E experts form n_groups consecutive groups of E / n_groups.
        1. biased = scores + bias (used for selection only)
        2. each group's score = the sum of its two largest biased values (V3; V2 used the largest alone)
        3. keep the topk_groups best groups of each token; every expert of another group is out of the race:
           set its biased value to -inf (not 0: biased values can be negative, and 0 would then win)
        4. return the indices [N, k] (int64) of the k largest remaining biased values, largest first
    n_groups == 1 is plain top-k of scores + bias.
    """
    raise NotImplementedError("Exercise group_limited_topk: best groups by their top-2 sum, then top-k inside them")


def max_violation(load: torch.Tensor) -> torch.Tensor:
    """MaxVio (Wang et al. 2024, arXiv 2408.15664): how far the busiest expert is above a fair share.

    load [..., E]: tokens per expert, for any leading dimensions (e.g. [n_layers, E], or [E]).
        MaxVio = max_i load_i / mean_i load_i - 1     over the experts (the last dimension)
    Returns a float tensor of shape load.shape[:-1] (0-dim for a single [E] load). 0 is perfect balance; 1 means
    the busiest expert gets twice its share. The load of one batch gives MaxVio_batch; the load summed over a whole
    validation set gives MaxVio_global.
    """
    raise NotImplementedError("Exercise max_violation: max load / mean load - 1 over the experts")
