"""Cut a DeepSeekV3 into pipeline stages: consecutive blocks, the embedding on stage 0, the final norm and the
output head on the last stage.

A stage module holds the model's own submodules (no copies), under the model's parameter names, so
`stage.named_parameters()` says "layers.2.self_attn.kv_b_proj.weight" just as the whole model does, and a
stage's gradients can be compared name by name with single-process training.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from ..model import DeepSeekV3


def pipeline_config(config: ModelConfig) -> ModelConfig:
    """The config a pipeline trains here: `config` without MTP, the sequence-wise balance loss and the routing-bias
    update, each of which reaches across stages or batches:
    - MTP needs stage 0's embedding of later tokens on the last stage (DeepSeek-V3 places the shallowest and the
      deepest layers on one rank for this, section 2.2); the loss here is the next-token loss alone;
    - the balance loss is a second output of every MoE layer, which the pipeline's one activation tensor per
      stage does not carry;
    - the bias update reads the expert load of the last forward, which in a pipeline is one micro-batch's.
    Without them, the pipeline computes exactly the gradients of single-process training on the same batch."""
    return config.replace(n_mtp_modules=0, seq_aux_alpha=0.0, bias_update_speed=0.0)


def stage_layers(n_layers: int, stages: int) -> list[range]:
    """The blocks of each stage: n_layers / stages consecutive ones per stage."""
    if stages < 1 or n_layers % stages:
        raise ValueError(f"the pipeline splits n_layers = {n_layers} blocks evenly over stages = {stages}: "
                         f"stages must divide n_layers (try stages in "
                         f"{[s for s in range(1, n_layers + 1) if n_layers % s == 0]})")
    per = n_layers // stages
    return [range(s * per, (s + 1) * per) for s in range(stages)]


class StageModule(nn.Module):
    """Stage `stage` of `stages` of a DeepSeekV3: input_ids [B, T] (stage 0) or hidden states [B, T, dim] in,
    hidden states [B, T, dim] or, on the last stage, float32 logits [B, T, vocab] out."""

    def __init__(self, model: DeepSeekV3, stage: int, stages: int):
        super().__init__()
        config = model.config
        if config.tie_embeddings and stages > 1:
            raise ValueError("ModelConfig.tie_embeddings = True: the embedding (stage 0) and the head (last "
                             "stage) would share one weight across devices; pipeline an untied model")
        if not 0 <= stage < stages:
            raise ValueError(f"stage = {stage} outside 0 .. stages-1 = {stages - 1}")
        self.stage, self.is_first, self.is_last = stage, stage == 0, stage == stages - 1
        self.embed_tokens = model.embed_tokens if self.is_first else None
        # A ModuleDict keyed by layer number keeps the model's names: layers.{i}.*
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in stage_layers(config.n_layers, stages)[stage]})
        self.norm = model.norm if self.is_last else None
        self.lm_head = model.lm_head if self.is_last else None
        # The model's complex RoPE table, shared, not a buffer (see DeepSeekV3.__init__ for why).
        self.freqs_cis = model.freqs_cis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(x) if self.is_first else x  # [B, T, dim]
        T = h.shape[1]
        if self.freqs_cis.device != h.device:
            self.freqs_cis = self.freqs_cis.to(h.device)
        freqs = self.freqs_cis[:T]
        for layer in self.layers.values():
            h = layer(h, freqs)
        return self.lm_head(self.norm(h)).float() if self.is_last else h


def split_model(model: DeepSeekV3, stages: int, keep: list[int] | None = None) -> dict[int, StageModule]:
    """Stage modules of `model` (all of them, or those in `keep`): stage index -> module."""
    stage_layers(model.config.n_layers, stages)  # validates the split
    return {s: StageModule(model, s, stages) for s in (range(stages) if keep is None else keep)}
