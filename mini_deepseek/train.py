"""The training loop shared by the notebooks: AdamW, warmup + cosine schedule, a live progress bar, evaluation,
and checkpoints that resume exactly.

Exact resume means: train N steps straight, or train k steps, save, rebuild everything from scratch, load and
train on to N - the losses of steps k+1..N are bit-identical. Everything that decides a later loss is either
saved or a pure function of the step number:
- the model's parameters and buffers (including the MoE routing bias)      -> model.safetensors
- AdamW's moments and step counts, and torch's RNG state                   -> optimizer.safetensors
- the step, the configs, the hyperparameters of each param group, history  -> trainer.json
- the learning rate of step s                                              -> lr_at(s, cfg)
- the batch of step s                                                      -> dataset.get_batch(s, ...)

Checkpoints hold safetensors and JSON only. torch.save pickles, and unpickling a file can run arbitrary code.

The model is trained through three methods (mini_deepseek.model.DeepSeekV3 has them):
    loss, parts = model.loss(input_ids, targets)  # parts: {"lm": float, "mtp": ..., "seq_balance": ...}
    model.update_routing_bias()                   # auxiliary-loss-free balancing, after each optimizer step
    model.expert_load()                           # [n_moe_layers, n_routed_experts] tokens per expert, or None
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from .data import TokenDataset
from .progress import progress_bar


@dataclass
class TrainConfig:
    steps: int = 300  # optimizer steps in the whole run (a resumed run continues up to this step)
    batch_size: int = 16  # sequences per step
    seq_len: int = 128  # tokens per sequence
    lr: float = 3e-3  # peak learning rate, reached at the end of warmup
    warmup_steps: int = 20  # linear warmup from lr/warmup_steps to lr
    min_lr_ratio: float = 0.1  # the cosine decay ends at lr * min_lr_ratio on the last step
    weight_decay: float = 0.1  # AdamW decoupled weight decay, applied to matrices only (not norms or biases)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW moment decay rates
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 disables clipping)
    seed: int = 0  # seeds torch's RNG at the start of a fresh run (the batches have the dataset's own seed)
    eval_every: int = 100  # evaluate on the val split every this many steps and after the last (0 disables)
    eval_batches: int = 4  # val batches per evaluation (always the same ones, so evaluations compare)
    log_every: int = 10  # refresh the progress bar and call the callback every this many steps
    checkpoint_every: int = 0  # save a checkpoint every this many steps (0: only the last step, if out_dir)
    out_dir: str | None = None  # where checkpoints go, as out_dir/step-000300/ (None: save nothing)
    compile: bool = False  # run the model's loss (forward and backward) through torch.compile (compile.py)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # JSON gives back a list
        for name in ("steps", "batch_size", "seq_len", "eval_batches", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} = {getattr(self, name)}: must be at least 1")
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} = {getattr(self, name)}: must not be negative")
        if not 0 <= self.min_lr_ratio <= 1 or self.lr <= 0:
            raise ValueError(f"TrainConfig: need lr > 0 and 0 <= min_lr_ratio <= 1, got {self.lr}, {self.min_lr_ratio}")


@dataclass
class History:
    """Per step: loss and its parts, lr, grad_norm, tokens_per_s and, for MoE models, maxvio (MaxVio_batch) and
    expert_load (tokens per expert per MoE layer). Per evaluation: val_loss and its parts and, for MoE models,
    val_maxvio_global, val_maxvio_batch and val_expert_load (see evaluate)."""

    train: list[dict[str, Any]] = field(default_factory=list)  # one record per optimizer step
    evals: list[dict[str, Any]] = field(default_factory=list)  # one record per evaluation

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one metric for plotting, e.g. plt.plot(*history.series("loss")); val_* keys
        come from the evaluations."""
        records = self.evals if key.startswith("val_") else self.train
        pairs = [(r["step"], r[key]) for r in records if key in r]
        return [s for s, _ in pairs], [v for _, v in pairs]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of step (1-based): linear warmup to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio."""
    if step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)  # 0 -> 1 over the decay
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))  # 1 -> 0
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (>= 2 dims) only: decaying norm gains and biases towards zero only
    hurts, as nanoGPT and most LLM recipes note."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # foreach=False: the same arithmetic on every platform, one parameter at a time.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, foreach=False)


def max_violation(expert_load: torch.Tensor) -> float:
    """MaxVio (Wang et al., 2024, arXiv 2408.15664): max_i load_i / mean load - 1 per MoE layer, averaged over
    layers. 0 is perfect balance; 1 means the busiest expert gets twice its fair share. Given one batch's load it
    is MaxVio_batch; given the load summed over a whole validation set, MaxVio_global."""
    load = expert_load.float()  # [n_moe_layers, n_routed_experts]
    return (load.amax(dim=-1) / load.mean(dim=-1).clamp_min(1e-9) - 1).mean().item()


@torch.no_grad()
def evaluate(model: nn.Module, dataset: TokenDataset, cfg: TrainConfig) -> dict[str, Any]:
    """Mean loss (and its parts) over cfg.eval_batches fixed batches of the val split, and for MoE models the
    load statistics over those batches: val_expert_load [n_moe_layers][n_routed_experts] tokens summed over
    all of them, val_maxvio_global (MaxVio of that sum) and val_maxvio_batch (mean of each batch's MaxVio)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    totals: dict[str, Any] = {}
    load_sum, batch_maxvio = None, 0.0
    for i in range(cfg.eval_batches):
        x, y = dataset.get_batch(i, cfg.batch_size, cfg.seq_len, split="val")
        loss, parts = model.loss(x.to(device), y.to(device))
        for key, value in {"val_loss": loss.item(), **{f"val_{k}_loss": v for k, v in parts.items()}}.items():
            totals[key] = totals.get(key, 0.0) + value / cfg.eval_batches
        load = model.expert_load()
        if load is not None:
            load_sum = load if load_sum is None else load_sum + load
            batch_maxvio += max_violation(load) / cfg.eval_batches
    if load_sum is not None:
        totals.update(val_maxvio_global=max_violation(load_sum), val_maxvio_batch=batch_maxvio,
                      val_expert_load=load_sum.int().tolist())
    model.train(was_training)
    return totals


# Fields that change what a step computes; the others (logging, evaluation, saving) leave the losses alone.
_HARMLESS_FIELDS = {"eval_every", "eval_batches", "log_every", "checkpoint_every", "out_dir"}


def train(model: nn.Module, dataset: TokenDataset, cfg: TrainConfig,
          callback: Callable[[History], None] | None = None, resume_from: str | os.PathLike | None = None,
          stop_at_step: int | None = None, progress: bool = True) -> History:
    """Train model on dataset for cfg.steps steps and return the history.

    resume_from: a checkpoint folder to continue from (see latest_checkpoint); with the same cfg, the later
    losses are exactly those of an uninterrupted run. stop_at_step: stop (and save, if cfg.out_dir) after this
    step while the schedule still spans cfg.steps, as an interruption would. callback(history) runs every
    cfg.log_every steps, e.g. to redraw a live loss plot. progress=False hides the progress bar (e.g. when a
    grid of runs shows one bar of its own).
    """
    device = next(model.parameters()).device
    optimizer = make_optimizer(model, cfg)
    history, start_step = History(), 0
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer)
        history, start_step = state["history"], state["step"]
        _warn_if_changed(state["train_config"], cfg)
    else:
        torch.manual_seed(cfg.seed)
    last_step = cfg.steps if stop_at_step is None else min(stop_at_step, cfg.steps)
    if cfg.eval_every:  # fail now, not at the first evaluation, if the val split is too short
        dataset.get_batch(0, cfg.batch_size, cfg.seq_len, split="val")

    model.train()
    # compiled: the same losses up to float rounding (inductor fuses and reorders float operations)
    loss_fn = partial(model.loss, compile=True) if cfg.compile else model.loss
    tokens_per_step = cfg.batch_size * cfg.seq_len
    window_loss, window_time, window_steps = 0.0, 0.0, 0
    with progress_bar(total=cfg.steps, initial=start_step, desc="train", unit="step", disable=not progress) as bar:
        for step in range(start_step + 1, last_step + 1):
            started = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = dataset.get_batch(step, cfg.batch_size, cfg.seq_len)  # [B, T] each
            loss, parts = loss_fn(x.to(device), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip else math.inf)
            optimizer.step()
            model.update_routing_bias()
            record = {"step": step, "loss": loss.item(), **{f"{k}_loss": v for k, v in parts.items()},
                      "lr": lr, "grad_norm": grad_norm.item()}
            load = model.expert_load()  # this step's batch, routed with the biases before this step's update
            if load is not None:
                record["maxvio"] = max_violation(load)  # MaxVio_batch
                record["expert_load"] = load.int().tolist()  # [n_moe_layers][n_routed_experts] tokens
            elapsed = time.perf_counter() - started  # .item() above waited for the device
            record["tokens_per_s"] = tokens_per_step / elapsed
            history.train.append(record)
            window_loss += record["loss"]  # the bar shows means over the steps since it was last refreshed
            window_time += elapsed
            window_steps += 1

            last = step == last_step
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                history.evals.append({"step": step, **evaluate(model, dataset, cfg)})
            if step % cfg.log_every == 0 or last:
                postfix = {"loss": f"{window_loss / window_steps:.3f}",
                           "tok/s": f"{tokens_per_step * window_steps / window_time:,.0f}"}
                if "maxvio" in record:
                    postfix["maxvio"] = f"{record['maxvio']:.2f}"
                if history.evals:
                    postfix["val"] = f"{history.evals[-1]['val_loss']:.3f}"
                bar.set_postfix(postfix, refresh=False)
                window_loss, window_time, window_steps = 0.0, 0.0, 0
                if callback is not None:
                    callback(history)
            if cfg.out_dir and ((cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or last):
                save_checkpoint(os.path.join(cfg.out_dir, f"step-{step:06d}"), model, optimizer, step,
                                train_config=cfg, history=history)
            bar.update(1)
    return history


def _warn_if_changed(saved: TrainConfig | None, cfg: TrainConfig) -> None:
    if saved is None:
        return
    changed = [f"{f.name}: {getattr(saved, f.name)!r} -> {getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg)
               if f.name not in _HARMLESS_FIELDS and getattr(saved, f.name) != getattr(cfg, f.name)]
    if changed:
        warnings.warn("resuming with a different TrainConfig, so later losses will differ from the uninterrupted "
                      "run: " + "; ".join(changed), stacklevel=3)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: safetensors + JSON, never pickle

MODEL_FILE, OPTIMIZER_FILE, TRAINER_FILE = "model.safetensors", "optimizer.safetensors", "trainer.json"


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the optimizer's parameters in its own order (the order of the indices in its state_dict)."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _model_config(model: nn.Module) -> dict[str, Any] | None:
    """DeepSeekV3's ModelConfig as a dict, so a checkpoint says what model it holds."""
    config = getattr(model, "config", None)
    return config.to_dict() if hasattr(config, "to_dict") else None


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    train_config: TrainConfig | None = None, history: History | None = None) -> str:
    """Write a checkpoint folder: model.safetensors, optimizer.safetensors (AdamW state per parameter name plus
    torch's RNG state as uint8 tensors) and trainer.json. Written beside and renamed into place, so an
    interrupted save never leaves a half-written checkpoint under path. Returns path."""
    path = os.fspath(path)
    names = _param_names(model, optimizer)
    optimizer_state = optimizer.state_dict()
    tensors = {}
    for index, state in optimizer_state["state"].items():
        for key, value in state.items():  # AdamW: step, exp_avg, exp_avg_sq
            tensors[f"{names[index]}.{key}"] = value.detach().contiguous().cpu()
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = rng
    param_groups = [{**{k: v for k, v in group.items() if k != "params"},
                     "params": [names[i] for i in group["params"]]} for group in optimizer_state["param_groups"]]
    trainer = {
        "step": step,
        "train_config": dataclasses.asdict(train_config) if train_config else None,
        "model_config": _model_config(model),
        "param_groups": param_groups,
        "history": dataclasses.asdict(history) if history else None,
    }

    staging = path + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    save_model(model, os.path.join(staging, MODEL_FILE))  # save_model handles tied (shared) weights
    save_file(tensors, os.path.join(staging, OPTIMIZER_FILE))
    with open(os.path.join(staging, TRAINER_FILE), "w", encoding="utf-8") as f:
        json.dump(trainer, f, indent=1)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(staging, path)
    return path


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    restore_rng: bool = True) -> dict[str, Any]:
    """Load a checkpoint folder into model (and optimizer, and torch's RNG). Returns the trainer state:
    {"step", "train_config" (TrainConfig or None), "model_config" (dict or None), "history" (History)}."""
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, TRAINER_FILE)):
        raise FileNotFoundError(f"{path} is not a checkpoint folder (no {TRAINER_FILE} in it)")
    with open(os.path.join(path, TRAINER_FILE), encoding="utf-8") as f:
        trainer = json.load(f)
    device = next(model.parameters()).device
    missing, unexpected = load_model(model, os.path.join(path, MODEL_FILE), strict=False, device=str(device))
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not fit this model: missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}")

    tensors = load_file(os.path.join(path, OPTIMIZER_FILE))
    if optimizer is not None:
        index_of = {name: i for i, name in enumerate(_param_names(model, optimizer))}
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("rng."):
                continue
            name, slot = key.rsplit(".", 1)
            state.setdefault(index_of[name], {})[slot] = value
        param_groups = [{**group, "params": [index_of[name] for name in group["params"]], "betas": tuple(group["betas"])}
                        for group in trainer["param_groups"]]  # JSON gives betas back as a list
        # load_state_dict moves each moment to its parameter's device and dtype.
        optimizer.load_state_dict({"state": state, "param_groups": param_groups})
    if restore_rng:
        torch.set_rng_state(tensors["rng.cpu"])
        n_cuda = sum(k.startswith("rng.cuda.") for k in tensors)
        cuda_states = [tensors[f"rng.cuda.{i}"] for i in range(n_cuda)]
        if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)

    history = trainer["history"] or {}
    return {"step": trainer["step"],
            "train_config": TrainConfig(**trainer["train_config"]) if trainer["train_config"] else None,
            "model_config": trainer["model_config"],
            "history": History(train=history.get("train", []), evals=history.get("evals", []))}


def latest_checkpoint(out_dir: str | os.PathLike) -> str | None:
    """The checkpoint folder of the highest step in out_dir (as train() names them), or None."""
    if not os.path.isdir(out_dir):
        return None
    steps = sorted(name for name in os.listdir(out_dir) if re.fullmatch(r"step-\d+", name)
                   and os.path.isfile(os.path.join(out_dir, name, TRAINER_FILE)))
    return os.path.join(out_dir, steps[-1]) if steps else None
