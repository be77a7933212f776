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
from .compile import MaybeCompiled
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
        # torch.compile'd methods by name, each built at its first use: generate(compile=True) and loss(compile=True)
        self._compiled: dict[str, MaybeCompiled] = {}
        self.apply(self._init_weights)

    def __getstate__(self) -> dict:
        """What copy.deepcopy and pickle copy: everything but the compiled functions, which are bound to this model
        (a copy that kept them would run the original's weights); a copy compiles its own at its first call."""
        return {**self.__dict__, "_compiled": {}}

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(module, (nn.Linear, nn.Embedding, Gate)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RoutedExperts):
            nn.init.normal_(module.w_gate_up, mean=0.0, std=std)
            nn.init.normal_(module.w_down, mean=0.0, std=std)

    # --- forward -----------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, start_pos: int = 0, cache: list[dict] | None = None,
                return_mtp: bool = False, attention_mask: torch.Tensor | None = None):
        """input_ids [B, T] at positions start_pos.. -> logits [B, T, vocab] (float32 for the loss).

        With return_mtp, also a list of MTP logits, depth k giving [B, T-k, vocab] (predicting token i+k+1 at i;
        [B, 0, vocab] when T <= k).

        attention_mask [B, S] (1 or True = token, 0 or False = padding), covering every key position: S = start_pos
        + T with a cache (the cached positions too), S = T without. Padding keys are masked in every attention
        layer (attention_ops.attention_mask) and padding tokens count in no routing statistics. Each row's tokens
        must be contiguous, the padding at the left and/or the right (e.g. left-padded prompts followed by
        right-padded completions, as GRPO scores them): RoPE is relative, so a row that starts p positions later
        gives the logits it would give alone, up to float rounding. Logits at padding positions mean nothing.
        """
        B, T = self._check_ids(input_ids, start_pos)
        if cache is not None and len(cache) != len(self.layers):
            raise ValueError(f"cache has {len(cache)} layers, the model {len(self.layers)}; use model.new_cache()")
        padding = self._padding(attention_mask, B, start_pos + T if cache is not None else T)
        return self._forward(input_ids, start_pos, cache, padding, None, return_mtp)

    def _forward(self, input_ids: torch.Tensor, start_pos: int, cache: list[dict] | None,
                 padding: torch.Tensor | None, target_mask: torch.Tensor | None, return_mtp: bool):
        """forward, with padding [B, S] (True = padding key) and target_mask [B, T] (False where the target is -100:
        those positions count in no routing statistics)."""
        T = input_ids.shape[1]
        counted = _both(None if padding is None else ~padding[:, -T:], target_mask)  # [B, T] or None
        freqs = self.rope(start_pos, start_pos + T, input_ids.device)
        h = self._hidden(input_ids, freqs, start_pos, cache, padding, counted)  # [B, T, dim]
        logits = self.lm_head(h).float()
        if not return_mtp:
            return logits
        if start_pos != 0 or cache is not None:
            raise ValueError("MTP logits need the whole sequence: call with start_pos=0 and no cache")
        return logits, self._mtp_logits(input_ids, h, freqs, padding, target_mask, logits[:, :0])

    def _hidden(self, input_ids: torch.Tensor, freqs: torch.Tensor, start_pos: int, cache: list[dict] | None,
                padding: torch.Tensor | None, counted: torch.Tensor | None) -> torch.Tensor:
        """Embedding, blocks, final norm: input_ids [B, T] -> h [B, T, dim]."""
        h = self.embed_tokens(input_ids)  # [B, T, dim]
        for i, layer in enumerate(self.layers):
            h = layer(h, freqs, start_pos, None if cache is None else cache[i], padding, counted)
        return self.norm(h)  # what the output head reads, and h^0 of the MTP modules (mtp.py)

    def hidden_states(self, input_ids: torch.Tensor, start_pos: int = 0,
                      cache: list[dict] | None = None) -> torch.Tensor:
        """input_ids [B, T] at positions start_pos.. -> h^0 [B, T, dim], the main model's output after its final
        norm: forward's logits are lm_head(h^0), and the MTP modules read h^0 (speculative.py drafts from it)."""
        _, T = self._check_ids(input_ids, start_pos)
        if cache is not None and len(cache) != len(self.layers):
            raise ValueError(f"cache has {len(cache)} layers, the model {len(self.layers)}; use model.new_cache()")
        return self._hidden(input_ids, self.rope(start_pos, start_pos + T, input_ids.device), start_pos, cache,
                            None, None)

    def _mtp_logits(self, input_ids: torch.Tensor, h: torch.Tensor, freqs: torch.Tensor, padding: torch.Tensor | None,
                    target_mask: torch.Tensor | None, no_logits: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every MTP depth from h = h^0 [B, T, dim]; no_logits [B, 0, vocab] for depths with no position."""
        T = input_ids.shape[1]
        out = []
        for k, module in enumerate(self.mtp, start=1):
            n = T - k  # positions i whose token i+k is known
            if n <= 0:  # too short a sequence for this depth (and the deeper ones)
                out.append(no_logits)
                continue
            # position i mixes h^{k-1}_i and token i+k: padding if either is
            pad = None if padding is None else padding[:, :n] | padding[:, k:]  # [B, n]
            counted = _both(None if pad is None else ~pad, None if target_mask is None else target_mask[:, k:])
            h = module(h[:, :n], self.embed_tokens(input_ids[:, k:]), freqs[:n], pad, counted)  # h^k: [B, n, dim]
            out.append(self.lm_head(h).float())
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

    @staticmethod
    def _padding(attention_mask: torch.Tensor | None, B: int, S: int) -> torch.Tensor | None:
        """attention_mask [B, S] of 1/0 -> padding [B, S] bool (True = padding), or None when there is none."""
        if attention_mask is None:
            return None
        real = _tokens_of(attention_mask, (B, S), "one entry per key position: start_pos + T with a cache, T without")
        if bool(real.all()):
            return None
        count = real.sum(dim=1)
        first = real.int().argmax(dim=1)
        last = S - 1 - real.flip(1).int().argmax(dim=1)
        if bool(((count > 0) & (last - first + 1 != count)).any()):
            raise ValueError("attention_mask has padding between the tokens of a row; pad only at the left and the "
                             "right (positions would otherwise leave a gap that RoPE sees)")
        return ~real

    # --- training ----------------------------------------------------------------------------------------------
    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor,
             compile: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
        """Next-token loss + mtp_loss_weight * mean MTP loss + the balance losses that are switched on.

        Returns (total, parts): parts holds each term by name as a float, "lm", "mtp" (before its weight),
        "seq_balance" (sequence-wise, seq_aux_alpha) and "expert_balance" (expert-level, aux_loss_alpha); a term
        that is off (or has no target to count) is absent. Targets of -100 are ignored everywhere: in the
        cross-entropies and in the routing statistics (the load the bias update reads, and both balance losses).
        An MTP depth with no target left (all -100, or T <= k) adds nothing: the MTP loss is the mean over the
        depths that have targets, and is absent if none has. compile=True computes the terms through torch.compile
        (TrainConfig(compile=True); compile.py): the checks here read token values, so they stay outside the graph.
        """
        if targets.shape != input_ids.shape:
            raise ValueError(f"targets {tuple(targets.shape)} must match input_ids {tuple(input_ids.shape)}")
        self._check_ids(input_ids, 0)
        target_mask = targets != -100  # [B, T]
        if not bool(target_mask.any()):
            raise ValueError("every target is -100: the batch has nothing to learn from")
        # depth k at position i predicts token i+k+1 = targets[i+k]
        mtp_depths = tuple(k for k in range(1, len(self.mtp) + 1) if bool(target_mask[:, k:].any()))
        loss_terms = self._compiled_method(self.loss_terms, "TrainConfig(compile=True)") if compile else self.loss_terms
        total, terms = loss_terms(input_ids, targets, target_mask, mtp_depths)
        return total, {name: term.item() for name, term in terms.items()}

    def loss_terms(self, input_ids: torch.Tensor, targets: torch.Tensor, target_mask: torch.Tensor,
                   mtp_depths: tuple[int, ...]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """loss() on checked inputs, as tensors: (total, {name: term}); mtp_depths: the MTP depths with targets.
        No value of a tensor decides anything here, so torch.compile traces it as one graph."""
        if self.mtp:
            logits, mtp_logits = self._forward(input_ids, 0, None, None, target_mask, return_mtp=True)
        else:
            logits, mtp_logits = self._forward(input_ids, 0, None, None, target_mask, return_mtp=False), []
        lm = _cross_entropy(logits, targets)
        total, terms = lm, {"lm": lm}
        if mtp_depths:
            mtp = torch.stack([_cross_entropy(mtp_logits[k - 1], targets[:, k:]) for k in mtp_depths]).mean()
            total = total + self.config.mtp_loss_weight * mtp
            terms["mtp"] = mtp
        gates = self.gates()
        for name, attribute in (("seq_balance", "balance_loss"), ("expert_balance", "expert_balance_loss")):
            losses = [getattr(g, attribute) for g in gates if getattr(g, attribute) is not None]
            for gate in gates:
                setattr(gate, attribute, None)  # handed over: the module keeps no reference to this step's graph
            if losses:  # summed over the MoE layers (main model and MTP modules), each already times its alpha
                layer_sum = torch.stack(losses).sum()
                total = total + layer_sum
                terms[name] = layer_sum
        return total, terms

    def gates(self) -> list[Gate]:
        """Every MoE gate, main layers first, then the MTP modules'."""
        return [m for m in self.modules() if isinstance(m, Gate)]

    def expert_load(self) -> torch.Tensor | None:
        """Tokens routed per expert in the last forward: [n_moe_layers (main model), n_routed_experts]."""
        loads = [layer.mlp.gate.last_load for layer in self.layers if layer.routed]
        if not loads or any(load is None for load in loads):
            return None
        return torch.stack(loads)

    def update_routing_bias(self) -> None:
        """Apply the auxiliary-loss-free bias update to every gate; call after each optimizer step."""
        for gate in self.gates():
            gate.update_bias()

    def set_mla_mode(self, mode: str) -> None:
        """Switch every MLA layer (MTP modules too) to "auto", "naive" or "absorb" (config.MLA_MODES): the same
        weights and outputs; a KV cache built before the switch may no longer fit (new_cache)."""
        self.config = self.config.replace(mla_mode=mode)  # validates the mode
        if self.config.attn_type == "mla":
            for block in [*self.layers, *self.mtp]:
                block.self_attn.mode = mode

    # --- generation --------------------------------------------------------------------------------------------
    def new_cache(self, batch_size: int, max_len: int | None = None) -> list[dict[str, torch.Tensor]]:
        """Empty KV caches for every layer, each [batch_size, ..., max_len, ...] in the model's dtype."""
        max_len = self.config.max_seq_len if max_len is None else max_len
        w = self.embed_tokens.weight
        return [layer.self_attn.new_cache(batch_size, max_len, w.dtype, w.device) for layer in self.layers]

    def check_generation(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float, top_p: float,
                         caller: str) -> tuple[int, int]:
        """The arguments generate and speculative_generate share, checked; returns (B, T) of input_ids."""
        if max_new_tokens < 0 or temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need max_new_tokens >= 0, temperature >= 0 and 0 < top_p <= 1; got "
                             f"{max_new_tokens}, {temperature}, {top_p}")
        B, T = self._check_ids(input_ids, 0)
        if T == 0:
            raise ValueError(f"{caller} needs a prompt of at least one token")
        if T + max_new_tokens > self.config.max_seq_len:
            raise ValueError(f"prompt {T} + {max_new_tokens} new tokens exceed max_seq_len = {self.config.max_seq_len}")
        return B, T

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 use_cache: bool = True, eos_id: int | None = None, generator: torch.Generator | None = None,
                 attention_mask: torch.Tensor | None = None, pad_id: int | None = None,
                 compile: bool = False) -> torch.Tensor:
        """Append max_new_tokens to input_ids [B, T]: greedy at temperature 0, else nucleus (top_p) sampling.

        With use_cache the prompt is prefilled once and each new token attends to the KV cache; without, every
        step recomputes the whole sequence (same tokens, much slower). MLA runs absorbed with the cache in the
        default mla_mode "auto" (mla.py). compile=True runs the cached decoding steps through torch.compile
        (compile.py: built at the first call and kept; eager, with a warning, where no compiler is available).
        Prompts of different lengths: pad them on the LEFT and give attention_mask [B, T] (1 = token, 0 =
        padding). Padding keys are masked in every layer, and RoPE being relative, each row decodes as it would
        alone. A row that emitted eos_id continues with pad_id (default: eos_id) only; generation stops once every
        row has. Non-finite logits raise a RuntimeError. Returns [B, T + new tokens].
        """
        B, T = self.check_generation(input_ids, max_new_tokens, temperature, top_p, "generate")
        pad_id = eos_id if pad_id is None else pad_id
        for name, token in (("eos_id", eos_id), ("pad_id", pad_id)):
            if token is not None and not 0 <= token < self.config.vocab_size:
                raise ValueError(f"{name} = {token} is not a token id in [0, {self.config.vocab_size})")
        mask = self._left_padding_mask(attention_mask, B, T)  # [B, T] bool (True = token), or None
        was_training = self.training
        self.eval()
        try:
            tokens = self._decode(input_ids, max_new_tokens, temperature, top_p, use_cache, eos_id, pad_id, generator,
                                  mask, self._compiled_method(self._forward, "generate(compile=True)")
                                  if compile and use_cache else self._forward)
        finally:
            self.train(was_training)
        return tokens

    def _decode(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float, top_p: float,
                use_cache: bool, eos_id: int | None, pad_id: int | None, generator: torch.Generator | None,
                mask: torch.Tensor | None, step_forward) -> torch.Tensor:
        """generate's loop, on checked arguments; step_forward: _forward or its compiled version for cached steps."""
        B, T = input_ids.shape
        cache = self.new_cache(B, T + max_new_tokens) if use_cache else None
        # Every buffer allocated once: the tokens, and the padding of every position (new tokens are real tokens;
        # a finished row's are never read). Each step takes views of them.
        tokens = input_ids.new_empty(B, T + max_new_tokens)
        tokens[:, :T] = input_ids
        padding = None
        if mask is not None and not bool(mask.all()):
            padding = torch.cat([~mask, mask.new_zeros(B, max_new_tokens)], dim=1)  # [B, T + max_new_tokens]
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        logits = self(input_ids, cache=cache, attention_mask=mask)[:, -1]
        n = T
        for step in range(max_new_tokens):
            next_token = sample_next_token(logits, temperature, top_p, generator)  # [B]
            if eos_id is not None:
                next_token = next_token.masked_fill(done, pad_id)  # finished rows emit padding only
                done |= next_token == eos_id
            tokens[:, n] = next_token
            n += 1
            if bool(done.all()) or step + 1 == max_new_tokens:
                break
            pad = None if padding is None else padding[:, :n]
            if use_cache:  # the ids are sampled in range and the length was checked: no per-step checks
                logits = step_forward(tokens[:, n - 1:n], n - 1, cache, pad, None, False)[:, -1]
            else:
                logits = self._forward(tokens[:, :n], 0, None, pad, None, False)[:, -1]
        return tokens[:, :n].contiguous()

    def _compiled_method(self, method, what: str) -> MaybeCompiled:
        """method (one of this model's) through torch.compile, built at its first use and kept (compile.py); what:
        the option that asked for it, named in MaybeCompiled's warnings."""
        if method.__name__ not in self._compiled:
            self._compiled[method.__name__] = MaybeCompiled(method, self.embed_tokens.weight.device, what)
        return self._compiled[method.__name__]

    @staticmethod
    def _left_padding_mask(attention_mask: torch.Tensor | None, B: int, T: int) -> torch.Tensor | None:
        """generate's attention_mask [B, T] -> bool [B, T] (True = token): padding only on the left."""
        if attention_mask is None:
            return None
        real = _tokens_of(attention_mask, (B, T), "one entry per prompt token")
        if bool((real[:, 1:] < real[:, :-1]).any()) or not bool(real[:, -1].all()):
            raise ValueError("attention_mask: generate needs prompts padded on the LEFT (each row 0..0 1..1, ending "
                             "with a token), since the new tokens are appended on the right")
        return real


def _tokens_of(attention_mask: torch.Tensor, shape: tuple[int, int], what: str) -> torch.Tensor:
    """An attention_mask of 1 (token) and 0 (padding), bool or integer, checked -> bool, True for tokens."""
    if tuple(attention_mask.shape) != shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {shape} ({what})")
    if attention_mask.is_floating_point() or attention_mask.is_complex():
        raise ValueError(f"attention_mask must be bool or integer (1 = token, 0 = padding), got {attention_mask.dtype}")
    if attention_mask.dtype != torch.bool and bool(((attention_mask != 0) & (attention_mask != 1)).any()):
        raise ValueError("attention_mask must hold only 1 (token) and 0 (padding)")
    return attention_mask.bool()


def _both(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """a & b for bool masks where None means all True."""
    return b if a is None else a if b is None else a & b


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def sample_next_token(logits: torch.Tensor, temperature: float, top_p: float,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, vocab] -> token ids [B]: argmax at temperature 0, else sample from the top_p nucleus."""
    check_finite(logits)
    if temperature == 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(sampling_probs(logits, temperature, top_p), 1, generator=generator).squeeze(-1)


def sampling_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """logits [..., vocab] -> the distribution sample_next_token draws from at temperature > 0, [..., vocab] float32:
    softmax(logits / temperature), cut to the top_p nucleus and renormalized to sum to one."""
    probs = (logits.float() / temperature).softmax(dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def check_finite(logits: torch.Tensor) -> None:
    """Raise a RuntimeError naming the rows of logits [B, ..., vocab] that hold NaN or inf."""
    if not bool(torch.isfinite(logits).all()):
        rows = (~torch.isfinite(logits)).flatten(1).any(dim=-1).nonzero().flatten().tolist()
        raise RuntimeError(f"the next-token logits of rows {rows} are not finite (NaN or inf): the model's weights "
                           "or activations overflowed; nothing can be sampled from them")
