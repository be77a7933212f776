"""The DeepSeek-V3 model: embedding, blocks (MLA + dense or MoE FFN), final norm, output head, MTP modules.

Parameter names follow the published Hugging Face checkpoints without the "model." prefix, except the routed
experts, which are stacked (see moe.RoutedExperts), and the MTP modules, which live under `mtp.{k}` here and
under `model.layers.{n_layers + k}` in checkpoints (checkpoint.py maps both).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .block import Block
from .config import ModelConfig
from .moe import Gate, RoutedExperts
from .mtp import MTPModule
from .norm import RMSNorm
from .rope import precompute_freqs_cis


class DeepSeekV3(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(i, config) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.mtp = nn.ModuleList(MTPModule(config.n_layers + k, config) for k in range(config.n_mtp_modules))
        # Complex rotations [max_seq_len, rope_dim/2]. A plain attribute, not a buffer: Module.to(bfloat16) would
        # cast a complex buffer to a real dtype and silently drop its imaginary part.
        self.freqs_cis = precompute_freqs_cis(config)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(module, (nn.Linear, nn.Embedding, Gate)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RoutedExperts):
            nn.init.normal_(module.w_gate_up, mean=0.0, std=std)
            nn.init.normal_(module.w_down, mean=0.0, std=std)

    # --- forward -----------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, start_pos: int = 0, cache: list[dict] | None = None,
                return_mtp: bool = False):
        """input_ids [B, T] at positions start_pos.. -> logits [B, T, vocab] (float32 for the loss).

        With return_mtp, also a list of MTP logits, depth k giving [B, T-k, vocab] (predicting token i+k+1 at i).
        """
        B, T = self._check_ids(input_ids, start_pos)
        if cache is not None and len(cache) != len(self.layers):
            raise ValueError(f"cache has {len(cache)} layers, the model {len(self.layers)}; use model.new_cache()")
        freqs = self.rope(start_pos, start_pos + T, input_ids.device)
        h = self.embed_tokens(input_ids)  # [B, T, dim]
        for i, layer in enumerate(self.layers):
            h = layer(h, freqs, start_pos, None if cache is None else cache[i])
        logits = self.lm_head(self.norm(h)).float()
        if not return_mtp:
            return logits
        if start_pos != 0 or cache is not None:
            raise ValueError("MTP logits need the whole sequence: call with start_pos=0 and no cache")
        return logits, self._mtp_logits(input_ids, h, freqs)

    def _mtp_logits(self, input_ids: torch.Tensor, h: torch.Tensor, freqs: torch.Tensor) -> list[torch.Tensor]:
        T = input_ids.shape[1]
        out = []
        for k, module in enumerate(self.mtp, start=1):
            n = T - k  # positions whose token i+k is known
            h = module(h[:, :n], self.embed_tokens(input_ids[:, k:]), freqs[:n])  # h^k: [B, n, dim]
            out.append(self.lm_head(module.shared_head.norm(h)).float())
        return out

    def rope(self, start: int, end: int, device: torch.device) -> torch.Tensor:
        if self.freqs_cis.device != device:
            self.freqs_cis = self.freqs_cis.to(device)
        return self.freqs_cis[start:end]

    def _check_ids(self, input_ids: torch.Tensor, start_pos: int) -> tuple[int, int]:
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor [batch, seq], got {input_ids.dtype} "
                             f"{tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if start_pos + T > self.config.max_seq_len:
            raise ValueError(f"positions up to {start_pos + T} exceed max_seq_len = {self.config.max_seq_len}")
        if T and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}), got "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        return B, T

    # --- training ----------------------------------------------------------------------------------------------
    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Next-token loss + mtp_loss_weight * mean MTP loss + the balance losses that are switched on.

        Returns (total, parts): parts holds each term by name as a float, "lm", "mtp" (before its weight),
        "seq_balance" (sequence-wise, seq_aux_alpha) and "expert_balance" (expert-level, aux_loss_alpha); a term
        that is off is absent. Targets -100 are ignored."""
        if targets.shape != input_ids.shape:
            raise ValueError(f"targets {tuple(targets.shape)} must match input_ids {tuple(input_ids.shape)}")
        if self.mtp:
            logits, mtp_logits = self(input_ids, return_mtp=True)
        else:
            logits, mtp_logits = self(input_ids), []
        lm = _cross_entropy(logits, targets)
        total, parts = lm, {"lm": lm.item()}
        if mtp_logits:
            # depth k at position i predicts token i+k+1 = targets[i+k]
            mtp = torch.stack([_cross_entropy(lg, targets[:, k:]) for k, lg in enumerate(mtp_logits, start=1)]).mean()
            total = total + self.config.mtp_loss_weight * mtp
            parts["mtp"] = mtp.item()
        gates = self.gates()
        for name, attribute in (("seq_balance", "balance_loss"), ("expert_balance", "expert_balance_loss")):
            losses = [getattr(g, attribute) for g in gates if getattr(g, attribute) is not None]
            for gate in gates:
                setattr(gate, attribute, None)  # handed over: the module keeps no reference to this step's graph
            if losses:  # summed over the MoE layers (main model and MTP modules), each already times its alpha
                layer_sum = torch.stack(losses).sum()
                total = total + layer_sum
                parts[name] = layer_sum.item()
        return total, parts

    def gates(self) -> list[Gate]:
        """Every MoE gate, main layers first, then the MTP modules'."""
        return [m for m in self.modules() if isinstance(m, Gate)]

    def expert_load(self) -> torch.Tensor | None:
        """Tokens routed per expert in the last forward: [n_moe_layers (main model), n_routed_experts]."""
        loads = [layer.mlp.gate.last_load for layer in self.layers if hasattr(layer.mlp, "gate")]
        if not loads or any(load is None for load in loads):
            return None
        return torch.stack(loads)

    def update_routing_bias(self) -> None:
        """Apply the auxiliary-loss-free bias update to every gate; call after each optimizer step."""
        for gate in self.gates():
            gate.update_bias()

    def set_mla_mode(self, mode: str) -> None:
        """Switch every MLA layer between "naive" and "absorb" (same weights, same outputs)."""
        self.config = self.config.replace(mla_mode=mode)
        for m in self.modules():
            if hasattr(m, "kv_b_proj"):
                m.mode = mode

    # --- generation --------------------------------------------------------------------------------------------
    def new_cache(self, batch_size: int, max_len: int | None = None) -> list[dict[str, torch.Tensor]]:
        """Empty KV caches for every layer, each [batch_size, ..., max_len, ...] in the model's dtype."""
        max_len = self.config.max_seq_len if max_len is None else max_len
        w = self.embed_tokens.weight
        return [layer.self_attn.new_cache(batch_size, max_len, w.dtype, w.device) for layer in self.layers]

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 use_cache: bool = True, eos_id: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Append max_new_tokens to input_ids [B, T]: greedy at temperature 0, else nucleus (top_p) sampling.

        With use_cache the prompt is prefilled once and each new token attends to the KV cache; without, every
        step recomputes the whole sequence (same tokens, much slower). Stops early once every row emitted eos_id.
        """
        if max_new_tokens < 0 or temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need max_new_tokens >= 0, temperature >= 0 and 0 < top_p <= 1; got "
                             f"{max_new_tokens}, {temperature}, {top_p}")
        B, T = self._check_ids(input_ids, 0)
        if T == 0:
            raise ValueError("generate needs a prompt of at least one token")
        if T + max_new_tokens > self.config.max_seq_len:
            raise ValueError(f"prompt {T} + {max_new_tokens} new tokens exceed max_seq_len = {self.config.max_seq_len}")
        was_training = self.training
        self.eval()
        cache = self.new_cache(B, T + max_new_tokens) if use_cache else None
        tokens = input_ids
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        logits = self(input_ids, cache=cache)[:, -1]
        for step in range(max_new_tokens):
            next_token = sample_next_token(logits, temperature, top_p, generator)  # [B]
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            if eos_id is not None:
                done |= next_token == eos_id
                if bool(done.all()):
                    break
            if step + 1 < max_new_tokens:
                if use_cache:
                    logits = self(next_token[:, None], start_pos=T + step, cache=cache)[:, -1]
                else:
                    logits = self(tokens)[:, -1]
        self.train(was_training)
        return tokens


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def sample_next_token(logits: torch.Tensor, temperature: float, top_p: float,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, vocab] -> token ids [B]: argmax at temperature 0, else sample from the top_p nucleus."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = (logits.float() / temperature).softmax(dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
