"""Multi-token prediction (DeepSeek-V3 section 2.2).

D sequential modules extend the prediction to tokens t+2 .. t+D+1 while keeping the causal chain: module k
combines, at position i, the previous depth's representation h^{k-1}_i with the embedding of token i+k,

    h'^k_i = M_k [RMSNorm(h^{k-1}_i) ; RMSNorm(Emb(t_{i+k}))],    h^k = TRM_k(h'^k),    P^k = OutHead(h^k)

and predicts token i+k+1. The embedding and the output head are shared with the main model; each module owns
its projection M_k (`eh_proj`), one transformer block, and the RMSNorm in front of the shared head.

Order of the concatenation: the paper writes the hidden state first, but the published checkpoints' `eh_proj`
expects the normalized embedding first (`enorm`), then the hidden state (`hnorm`). We follow the checkpoints.

Which state is h^0, and which one chains: the paper says h^0 is "the representation given by the main model".
The engines that serve the published MTP weights feed the main model's output AFTER its final RMSNorm
(`model.norm`): vLLM's DeepseekV2Model.forward returns `self.norm(hidden_states, residual)`, and its MTP proposer
hands exactly that to `DeepSeekMultiTokenPredictorLayer.forward` as `previous_hidden_states`
(vllm/model_executor/models/deepseek_mtp.py, v1/spec_decode/eagle.py). So h^0 = model.norm(h_L) here too. For the
next depth, SGLang's NextN layer (sglang/srt/models/deepseek_nextn.py) and Megatron-LM's
MultiTokenPredictionLayer (which ends with its own final_layernorm) pass on the module's output after that norm,
`shared_head.norm`: the state the shared output head reads. We chain that, so that every depth reads a state of
the same kind: h^k = shared_head.norm(TRM_k(h'^k)) and P^k = lm_head(h^k). (vLLM, which runs the one published
module for several draft steps, feeds h^0 again instead; with the published D = 1 every choice agrees.)
Training (`DeepSeekV3.loss`) runs this same forward, so what it trains is what the published weights expect.
"""

from __future__ import annotations

import torch
from torch import nn

from .block import Block
from .config import ModelConfig
from .norm import RMSNorm


class MTPModule(Block):
    """One MTP depth: a Block plus enorm, hnorm, eh_proj and shared_head.norm (checkpoint names)."""

    def __init__(self, layer_id: int, cfg: ModelConfig):
        super().__init__(layer_id, cfg)
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)
        self.shared_head = nn.Module()  # the head's weight is the main model's; only its norm is per module
        self.shared_head.norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, h_prev: torch.Tensor, emb_next: torch.Tensor, freqs_cis: torch.Tensor,
                padding: torch.Tensor | None = None, counted: torch.Tensor | None = None, start_pos: int = 0,
                cache: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """h_prev [B, n, dim] = h^{k-1} at positions 0..n-1 (h^0: the main model's output after its final norm);
        emb_next [B, n, dim] = Emb(t_{i+k}) -> h^k [B, n, dim], normalized by shared_head.norm: the state the shared
        output head and the next depth read. padding [B, n] and counted [B, n] as in Block.forward.
        With a KV cache of its own (self_attn.new_cache), the n positions are start_pos.. and attend to the cached
        ones before them, as the main model's blocks do: speculative.py drafts this way, one new position at a time."""
        h = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))  # [B, n, 2*dim] -> [B, n, dim]
        return self.shared_head.norm(super().forward(h, freqs_cis, start_pos, cache, padding, counted))
