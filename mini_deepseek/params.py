"""Parameter counts without allocating a single weight: the model is built on PyTorch's meta device."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig
from .model import DeepSeekV3


@dataclass(frozen=True)
class ParamCount:
    total: int  # every parameter of the main model (embedding and output head included, MTP excluded)
    activated: int  # parameters one token passes through: all but the routed experts it is not sent to
    mtp: int  # unique parameters of the MTP modules (their embedding and head are the main model's)


def count_params(config: ModelConfig) -> ParamCount:
    with torch.device("meta"):
        model = DeepSeekV3(config)
    mtp = sum(p.numel() for p in model.mtp.parameters())
    total = sum(p.numel() for p in model.parameters()) - mtp
    idle_experts = 0
    for layer in model.layers:
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None:
            per_expert = (experts.w_gate_up.numel() + experts.w_down.numel()) // experts.w_gate_up.shape[0]
            idle_experts += (config.n_routed_experts - config.n_activated_experts) * per_expert
    return ParamCount(total=total, activated=total - idle_experts, mtp=mtp)
