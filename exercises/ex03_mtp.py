"""Exercise set 03: multi-token prediction and speculative decoding with the MTP modules
(notebooks/03_multi_token_prediction.ipynb).

Replace each `raise NotImplementedError` with your implementation, then grade it in a notebook with
`check("mtp_combine")` or from the shell with `make grade`. Reference answers: solutions/ex03_mtp.py.
Shapes use B batch, T sequence length, V vocabulary, D MTP depths, g drafts in one round.
"""

import torch

from mini_deepseek.mtp import MTPModule


def mtp_combine(module: MTPModule, h_prev: torch.Tensor, emb_next: torch.Tensor) -> torch.Tensor:
    """The input of MTP module k at every position i (DeepSeek-V3 eq. 21), before its transformer block:

        h'^k_i = M_k [ RMSNorm(Emb(t_{i+k})) ; RMSNorm(h^{k-1}_i) ]

    module: a mini_deepseek MTPModule (use its weights: module.enorm, module.hnorm, module.eh_proj);
    h_prev: [B, n, dim] the previous depth's states h^{k-1}_i (h^0: the main model's output after its final norm);
    emb_next: [B, n, dim] the embeddings Emb(t_{i+k}) of the token k places ahead.
        1. normalize the embedding with module.enorm and the state with module.hnorm (two different RMSNorms);
        2. concatenate them along the last dim, [B, n, 2*dim], in the order of the published checkpoints: the
           EMBEDDING FIRST, then the state (the paper's eq. 21 writes the state first; eh_proj's weights were
           trained the other way round, and a model loaded from them would silently read garbage);
        3. project back to dim with module.eh_proj (M_k, no bias).
    Returns h'^k [B, n, dim]: what the module's transformer block then reads.
    """
    raise NotImplementedError("Exercise mtp_combine: eh_proj([enorm(embedding) ; hnorm(state)])")


def mtp_loss(mtp_logits: list[torch.Tensor], targets: torch.Tensor, weight: float) -> torch.Tensor | None:
    """The MTP training loss (DeepSeek-V3 eqs. 24-25): weight * the mean over depths of each depth's cross-entropy.

    mtp_logits: one tensor per depth k = 1 .. D, depth k being [B, T-k, V]: at position i it predicts token
    i + k + 1 (the main model predicts token i + 1 there). targets: [B, T] the main model's next-token targets,
    targets[:, i] = token i + 1, with -100 where a position has no target (padding, a prompt masked out).
        1. depth k's targets are targets shifted by k: position i of depth k is graded by targets[:, i + k];
        2. its loss L^k is the mean cross-entropy over the positions whose target is not -100;
        3. a depth with no target left (all -100, or T <= k) has no loss and is left out of the mean: it must
           neither add 0 nor NaN;
        4. return weight * mean_k L^k (weight = lambda: 0.3 early in V3's training, 0.1 later), a 0-dim tensor
           that gradients flow through; None when no depth has a target.
    Note the mean of per-depth means: depths with fewer valid targets weigh as much as the others.
    """
    raise NotImplementedError("Exercise mtp_loss: mean over depths of cross-entropy against targets shifted by k")


def greedy_accept(target_logits: torch.Tensor, drafts: torch.Tensor) -> tuple[int, int]:
    """Verify one round of greedy speculative decoding for one sequence.

    drafts: [g] the draft tokens d_1 .. d_g proposed after the last accepted token; target_logits: [g+1, V] the
    main model's logits from ONE forward over [last token, d_1, .., d_g]: row j predicts the token after the first
    j drafts (row 0 checks d_1, row g is the token after d_g).
        1. d_j is accepted when it equals the argmax of row j - 1 AND every earlier draft was accepted: count the
           leading matches n (0 <= n <= g); a later match after a mismatch does not count;
        2. the round's next token is the argmax of row n: the correction of the first rejected draft, or, when all
           g passed, the bonus token the main model predicts after d_g.
    Returns (n, next_token) as Python ints. The round yields n + 1 tokens: d_1 .. d_n, then next_token.
    """
    raise NotImplementedError("Exercise greedy_accept: count the leading drafts that equal the argmax, then argmax")


def sampled_accept(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor,
                   generator: torch.Generator | None = None) -> tuple[int, int]:
    """Verify one round of speculative sampling for one sequence (Leviathan et al. 2023, Chen et al. 2023).

    p: [g+1, V] the target's probabilities at the g drafted positions and the one after them (rows sum to 1);
    q: [g, V] the draft probabilities each d_j was sampled from; drafts: [g].
        for j = 1 .. g: accept d_j with probability min(1, p_{j-1}(d_j) / q_{j-1}(d_j)) (draw u ~ U[0, 1) with
            torch.rand(generator=generator) and accept when u < p/q); at the first rejection stop and sample the
            next token from the residual normalize(max(0, p_{j-1} - q_{j-1}));
        if all g drafts pass, sample the next token from p_g (the bonus token).
    Sample with torch.multinomial(..., generator=generator). Returns (n accepted, next_token) as Python ints.
    The rule makes every emitted token distributed exactly as p, whatever q is: nothing is lost.
    """
    raise NotImplementedError("Exercise sampled_accept: accept with min(1, p/q), else sample max(0, p - q)")
