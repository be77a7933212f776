"""The DeepSeek-R1 recipe in miniature: sampling, scoring, a GRPO trainer, rejection sampling and distillation.

DeepSeek-R1 (arXiv 2501.12948) trains in stages, each of which is a function here or in train.py:
- R1-Zero (section 2.2): GRPO straight on the base model with rule rewards (accuracy + format): `grpo_train`.
- R1 (section 2.3): a cold start (SFT on a few thousand long, readable reasoning examples: `train` on a
  data.PairDataset); reasoning RL with a language-consistency reward added (`grpo_train` again); rejection
  sampling from that checkpoint and SFT on the kept samples (`rejection_sample`, then `train`).
- Distillation (section 2.4): SFT of smaller models on the samples of the larger one (`distill`).

The pure pieces (advantages, KL, loss, rewards) live in grpo.py. Completions are lists of token ids; a model is
sampled in chunks of at most `sample_batch_size` rows and scored in micro-batches, so memory stays bounded however
many completions a step draws.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .data import NUMERAL, PairDataset, WordProblem, check_answer, numeral_language
from .grpo import LOSS_TYPES, REWARD_NAMES, group_advantages, grpo_loss, reasoning_of, rule_rewards
from .params import count_params
from .progress import progress_bar
from .tokenizer import ByteTokenizer
from .train import History, TrainConfig, lr_at, make_optimizer, train

# ----------------------------------------------------------------------------------------------------------------
# Sampling and scoring

def check_prompt_lengths(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    """Raise a ValueError naming the first prompt that leaves no room for max_new_tokens in the context."""
    limit = model.config.max_seq_len
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty: a completion needs at least one prompt token before it")
        if len(prompt) + max_new_tokens > limit:
            raise ValueError(f"prompt {i} has {len(prompt)} tokens; with max_new_tokens = {max_new_tokens} that "
                             f"exceeds the model's context, max_seq_len = {limit}")


@torch.no_grad()
def generate_completions(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_id: int,
                         temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None,
                         batch_size: int = 128) -> list[list[int]]:
    """One completion per prompt (token ids): the new tokens up to and including the first eos_id, or
    max_new_tokens of them if it never comes. Prompts are sampled batch_size rows at a time with the KV cache,
    so the cache never holds more than batch_size x (longest prompt + max_new_tokens) positions."""
    check_prompt_lengths(model, prompts, max_new_tokens)
    device = next(model.parameters()).device
    completions: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        # One call per chunk: prompts padded on the LEFT, padding keys masked, so each row decodes as it would alone.
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), eos_id, dtype=torch.long)  # [b, width]
        attention_mask = torch.zeros(len(chunk), width, dtype=torch.bool)  # [b, width], True = prompt token
        for i, prompt in enumerate(chunk):
            ids[i, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
            attention_mask[i, width - len(prompt):] = True
        out = model.generate(ids.to(device), max_new_tokens, temperature=temperature, top_p=top_p, eos_id=eos_id,
                             generator=generator, attention_mask=attention_mask.to(device))  # [b, width + new]
        rows = [row[:row.index(eos_id) + 1] if eos_id in row else row for row in out[:, width:].tolist()]
        completions += rows
    return completions


def completion_logprobs(model: nn.Module, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                        pad_id: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(token) of every completion token given its prompt and the completion before it.

    Each row is prompt + completion, right-padded: causal attention never lets a token see the padding after
    it, so no attention mask is needed. Returns logp [N, L] (L = longest completion; differentiable if
    gradients are enabled) and mask [N, L] (True on completion tokens).
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    device = next(model.parameters()).device
    width = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # [N, T]
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        ids[i, :len(p) + len(c)] = torch.tensor(list(p) + list(c), dtype=torch.long)
    ids = ids.to(device)
    logits = model(ids[:, :-1])  # [N, T-1, vocab]: position t predicts token t+1
    if temperature <= 0:
        raise ValueError(f"temperature = {temperature}: log-probabilities need a temperature > 0")
    # The distribution the completions were sampled from: logits / temperature (as TRL scores them).
    token_logp = torch.gather(F.log_softmax(logits.float() / temperature, dim=-1), 2, ids[:, 1:, None]).squeeze(2)
    prompt_len = torch.tensor([len(p) for p in prompts], device=device)  # [N]
    completion_len = torch.tensor([len(c) for c in completions], device=device)  # [N]
    L = max(1, int(completion_len.max()))
    offsets = torch.arange(L, device=device)  # [L]
    # completion token j of row i is ids[i, P_i + j], predicted at position P_i + j - 1
    positions = (prompt_len[:, None] - 1 + offsets).clamp(max=token_logp.shape[1] - 1)  # [N, L]
    return torch.gather(token_logp, 1, positions), offsets < completion_len[:, None]


# ----------------------------------------------------------------------------------------------------------------
# GRPO

@dataclass
class GRPOConfig:
    steps: int = 50  # GRPO steps; each samples a batch from the current policy, then optimizes on it
    prompts_per_step: int = 16  # prompts drawn per step
    group_size: int = 8  # G: completions sampled per prompt (DeepSeekMath: 64; TRL's default: 8)
    updates_per_batch: int = 2  # mu: optimizer steps on each batch of samples (DeepSeekMath Algorithm 1)
    lr: float = 1e-4  # peak learning rate; far below pretraining's, as Adam moves every weight by about lr a step
    warmup_steps: int = 0  # linear warmup over the first GRPO steps
    min_lr_ratio: float = 1.0  # cosine decay to lr * min_lr_ratio at the last step (1.0: constant)
    weight_decay: float = 0.0  # AdamW weight decay on matrices
    betas: tuple[float, float] = (0.9, 0.99)  # AdamW moment decay rates
    grad_clip: float = 1.0  # clip the global gradient norm (0 disables)
    clip_eps: float = 0.2  # epsilon of the clipped ratio
    beta: float = 0.04  # KL coefficient (DeepSeekMath 0.04; R1 0.001; TRL's current default 0)
    loss_type: str = "grpo"  # "grpo": token mean per completion, then mean; "dapo": mean over all tokens
    reward_weights: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "format": 1.0})
    temperature: float = 1.0  # sampling temperature of the rollouts
    top_p: float = 1.0  # nucleus of the rollouts
    max_new_tokens: int = 64  # longest completion; one cut off there earns what its text earns (usually 0)
    sample_batch_size: int = 128  # rows per generate call: bounds the KV cache while sampling
    micro_batch_size: int = 64  # completions per forward/backward: bounds activations while optimizing
    eval_every: int = 10  # accuracy on the eval problems every this many steps and at the end (0: never)
    eval_temperature: float = 0.0  # 0: greedy; R1 reports pass@1 over samples at 0.6 (section 3)
    eval_top_p: float = 1.0  # nucleus of the eval samples (R1: 0.95)
    eval_samples: int = 1  # completions per eval problem (more than one needs eval_temperature > 0)
    seed: int = 0  # seeds torch, the prompt order and the sampling

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        for name in ("steps", "prompts_per_step", "updates_per_batch", "max_new_tokens", "sample_batch_size",
                     "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"GRPOConfig.{name} = {getattr(self, name)}: must be at least 1")
        if self.group_size < 2:
            raise ValueError(f"GRPOConfig.group_size = {self.group_size}: GRPO needs at least 2 samples per prompt "
                             f"(the advantage compares samples within a group)")
        for name in ("warmup_steps", "eval_every", "weight_decay", "grad_clip", "clip_eps", "beta", "eval_temperature"):
            if getattr(self, name) < 0:
                raise ValueError(f"GRPOConfig.{name} = {getattr(self, name)}: must not be negative")
        if self.eval_samples < 1 or (self.eval_samples > 1 and self.eval_temperature == 0) or \
                not 0 < self.eval_top_p <= 1:
            raise ValueError(f"GRPOConfig: eval_samples = {self.eval_samples} needs eval_temperature > 0 when above 1, "
                             f"and 0 < eval_top_p <= 1 (got {self.eval_temperature}, {self.eval_top_p})")
        if self.temperature <= 0:
            raise ValueError(f"GRPOConfig.temperature = {self.temperature}: the G samples of a group must differ, so "
                             f"sampling needs a temperature > 0")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"GRPOConfig.loss_type = {self.loss_type!r}: choose one of {LOSS_TYPES}")
        unknown = set(self.reward_weights) - set(REWARD_NAMES)
        if unknown or not self.reward_weights:
            raise ValueError(f"GRPOConfig.reward_weights = {self.reward_weights}: name rewards from {REWARD_NAMES}")
        if not 0 < self.top_p <= 1 or self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"GRPOConfig: need 0 < top_p <= 1, lr > 0, 0 <= min_lr_ratio <= 1; got {self.top_p}, "
                             f"{self.lr}, {self.min_lr_ratio}")


def grpo_train(policy: nn.Module, reference: nn.Module, tokenizer: ByteTokenizer, problems: Sequence[WordProblem],
               cfg: GRPOConfig, eval_problems: Sequence[WordProblem] = (),
               callback: Callable[[History], None] | None = None) -> History:
    """Train policy with GRPO on problems (their prompts; their answers and languages feed the rule rewards).

    reference: the frozen model of the KL term (usually a copy of the policy before RL); it is never updated.
    Each step draws prompts_per_step problems, samples group_size completions of each with the KV cache,
    scores them by the weighted rule rewards, normalizes the rewards within each group, and takes
    updates_per_batch optimizer steps on the clipped objective. History.train holds per step: reward (and each
    reward), accuracy and length (mean completion tokens) of the samples, KL, clip fraction, mean ratio, seconds;
    History.evals the accuracy on eval_problems, greedy or pass@1 over eval_samples ("val_accuracy",
    "val_length", ...). callback(history) runs after every step.

    The policy runs in eval mode throughout (grads still flow): RL here adds no MoE balance loss and leaves the
    routing bias where pretraining put it. The reference model of DeepSeekMath's iterative GRPO is refreshed
    from the policy every few hundred steps; these runs are too short to need that.
    """
    if len(problems) < cfg.prompts_per_step:
        raise ValueError(f"{len(problems)} problems, fewer than prompts_per_step = {cfg.prompts_per_step}")
    torch.manual_seed(cfg.seed)
    generator = torch.Generator(device=next(policy.parameters()).device).manual_seed(cfg.seed)
    optimizer = make_optimizer(policy, cfg)  # reads lr, weight_decay and betas, which GRPOConfig shares
    reference.eval().requires_grad_(False)
    policy.eval()
    prompt_ids = [tokenizer.encode(p.prompt) for p in problems]
    check_prompt_lengths(policy, prompt_ids, cfg.max_new_tokens)
    history = History()
    with progress_bar(total=cfg.steps, desc="grpo", unit="step") as bar:
        for step in range(1, cfg.steps + 1):
            started = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            # 1. prompts of this step, a pure function of (seed, step), and G samples of each from pi_old
            chosen = random.Random(f"{cfg.seed}/{step}").sample(range(len(problems)), cfg.prompts_per_step)
            prompts = [prompt_ids[i] for i in chosen for _ in range(cfg.group_size)]  # [P*G], prompt-major
            completions = generate_completions(policy, prompts, cfg.max_new_tokens, tokenizer.eos_id,
                                               cfg.temperature, cfg.top_p, generator, cfg.sample_batch_size)
            # 2. rule rewards on the text, advantages within each group
            scores = [rule_rewards(tokenizer.decode(c, skip_special=True), problems[i].answer, problems[i].language)
                      for i, c in zip((i for i in chosen for _ in range(cfg.group_size)), completions, strict=True)]
            rewards = torch.tensor([sum(w * s[name] for name, w in cfg.reward_weights.items()) for s in scores])
            advantages = group_advantages(rewards.view(cfg.prompts_per_step, cfg.group_size)).flatten()  # [P*G]
            # 3. mu optimizer steps on this batch
            stats = _optimize_on_batch(policy, reference, optimizer, prompts, completions, advantages, cfg,
                                       tokenizer.pad_id)
            record = {"step": step, "reward": rewards.mean().item(),
                      **{name: sum(s[name] for s in scores) / len(scores) for name in REWARD_NAMES},
                      "length": sum(map(len, completions)) / len(completions), **stats,
                      "seconds": time.perf_counter() - started}
            history.train.append(record)
            if cfg.eval_every and eval_problems and (step % cfg.eval_every == 0 or step == cfg.steps):
                result = evaluate(policy, tokenizer, eval_problems, cfg.max_new_tokens, cfg.sample_batch_size,
                                  temperature=cfg.eval_temperature, top_p=cfg.eval_top_p, samples=cfg.eval_samples,
                                  seed=cfg.seed)
                history.evals.append({"step": step, **{f"val_{k}": v for k, v in result.metrics.items()}})
            postfix = {"reward": f"{record['reward']:.2f}", "acc": f"{record['accuracy']:.2f}",
                       "kl": f"{record['kl']:.3f}", "len": f"{record['length']:.0f}"}
            if history.evals:
                postfix["val_acc"] = f"{history.evals[-1]['val_accuracy']:.2f}"
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
            if callback is not None:
                callback(history)
    return history


def _optimize_on_batch(policy: nn.Module, reference: nn.Module, optimizer: torch.optim.Optimizer,
                       prompts: list[list[int]], completions: list[list[int]], advantages: torch.Tensor,
                       cfg: GRPOConfig, pad_id: int) -> dict[str, float]:
    """updates_per_batch optimizer steps on one batch, micro-batch by micro-batch. Each micro-batch's loss is
    weighted so that the accumulated gradient is exactly that of grpo_loss over the whole batch. pi_old's
    log-probs are the policy's own in the first pass (before any update), the reference's are computed once.

    The logged "kl" is the mean k3 of the first pass only: there the tokens are samples of the policy being scored,
    so k3 estimates KL(pi_theta || pi_ref) without bias. After an update they are samples of pi_old, and k3 =
    pi_ref/pi_theta - log(...) - 1 on a token the update made unlikely is unbounded: in notebook 06 one token whose
    log-prob fell from -0.22 to -12.6 in one update gave k3 = 1.5e5 and a logged mean of 41
    (the other 1,795 tokens averaged 0.14; the exact KL at that position was 1.4 nats).
    The loss still uses k3 on every pass, as DeepSeekMath (eq. 3) and TRL do."""
    N = len(completions)
    micro = [slice(s, min(s + cfg.micro_batch_size, N)) for s in range(0, N, cfg.micro_batch_size)]
    n_tokens = [sum(len(c) for c in completions[m]) for m in micro]
    old_logp: list[torch.Tensor] = []
    ref_logp: list[torch.Tensor] = []
    totals = {"kl": 0.0, "clip_fraction": 0.0, "ratio": 0.0}
    for update in range(cfg.updates_per_batch):
        optimizer.zero_grad(set_to_none=True)
        for k, m in enumerate(micro):
            logp, mask = completion_logprobs(policy, prompts[m], completions[m], pad_id, cfg.temperature)  # [n, L]
            if update == 0:
                old_logp.append(logp.detach())
                with torch.no_grad():
                    ref_logp.append(completion_logprobs(reference, prompts[m], completions[m], pad_id,
                                                          cfg.temperature)[0])
            loss, stats = grpo_loss(logp, old_logp[k], ref_logp[k], advantages[m].to(logp.device), mask,
                                    cfg.clip_eps, cfg.beta, cfg.loss_type)
            # grpo averages over completions, dapo over tokens: weigh each micro-batch by its share of either
            share = (m.stop - m.start) / N if cfg.loss_type == "grpo" else n_tokens[k] / max(1, sum(n_tokens))
            (loss * share).backward()
            for key in totals:  # token means, averaged over the passes they count in (kl: the first only)
                passes = 1 if key == "kl" else cfg.updates_per_batch
                if update < passes:
                    totals[key] += stats[key] * n_tokens[k] / max(1, sum(n_tokens)) / passes
        nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip if cfg.grad_clip else math.inf)
        optimizer.step()
    return totals


# ----------------------------------------------------------------------------------------------------------------
# Evaluation, rejection sampling, distillation

@dataclass
class EvalResult:
    metrics: dict[str, float]  # accuracy, format, language, length, and accuracy per level and per language
    completions: list[str]  # the decoded completion of each problem, in order


def evaluate(model: nn.Module, tokenizer: ByteTokenizer, problems: Sequence[WordProblem], max_new_tokens: int,
             batch_size: int = 128, plain_format: bool = False, temperature: float = 0.0, top_p: float = 1.0,
             samples: int = 1, seed: int = 0) -> EvalResult:
    """Accuracy on problems, with the rule rewards of grpo.py: greedy by default; with temperature > 0, the mean
    over `samples` sampled completions per problem (R1's pass@1, section 3: temperature 0.6, top-p 0.95, k samples),
    drawn from torch.Generator().manual_seed(seed) so that evaluations compare. plain_format: score the answer the
    reasoning reaches, in either format ("...; so 9" on the first line, or inside <think>...</think>), with
    data.check_answer instead; format and language are then not measured. completions: `samples` per problem,
    problem-major."""
    if samples < 1 or (samples > 1 and temperature == 0):
        raise ValueError(f"samples = {samples}: need samples >= 1, and temperature > 0 for more than one")
    eos = tokenizer.eos_id
    problems = [p for p in problems for _ in range(samples)]  # each problem `samples` times, problem-major
    ids = [tokenizer.encode(p.prompt) for p in problems]
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    completions = generate_completions(model, ids, max_new_tokens, eos, temperature, top_p, generator, batch_size)
    texts = [tokenizer.decode(c, skip_special=True) for c in completions]
    if plain_format:
        # the reasoning's own conclusion, in either format: the think block if there is one, else the first line
        scores = [{"accuracy": float(check_answer(reasoning_of(t) or t, p.answer))}
                  for t, p in zip(texts, problems, strict=True)]
    else:
        scores = [rule_rewards(t, p.answer, p.language) for t, p in zip(texts, problems, strict=True)]
    metrics = {name: sum(s[name] for s in scores) / len(scores) for name in scores[0]}
    metrics["length"] = sum(map(len, completions)) / len(completions)
    metrics.update(reasoning_styles(problems, texts))
    for key, value in [("level", lvl) for lvl in sorted({p.level for p in problems})] + \
                      [("language", lang) for lang in sorted({p.language for p in problems})]:
        picked = [s["accuracy"] for s, p in zip(scores, problems, strict=True) if getattr(p, key) == value]
        metrics[f"accuracy_{key}_{value}"] = sum(picked) / len(picked)
    return EvalResult(metrics=metrics, completions=texts)


def reasoning_styles(problems: Sequence[WordProblem], completions: Sequence[str]) -> dict[str, float]:
    """How the completions reason: "step_by_step", the share of multi-step problems whose reasoning writes more
    than one result ("7+5=12; 12-3=9", not "7+5-3=9"); "mixed_language", the share of completions whose
    reasoning holds numerals of both languages. The reasoning is the think block, or the first line without one."""
    multi_step, mixed = [], []
    for problem, text in zip(problems, completions, strict=True):
        reasoning = reasoning_of(text)
        reasoning = text.lstrip().split("\n", 1)[0] if reasoning is None else reasoning
        if problem.level > 1:
            multi_step.append(reasoning.count("=") > 1)
        mixed.append(len({numeral_language(n) for n in NUMERAL.findall(reasoning)}) > 1)
    return {"step_by_step": sum(multi_step) / max(1, len(multi_step)), "mixed_language": sum(mixed) / len(mixed)}


@dataclass
class RejectionSample:
    pairs: list[tuple[str, str]]  # (prompt, completion) kept, at most one copy of each
    drawn: int  # completions sampled
    prompts_with_a_keeper: int  # prompts with at least one kept completion


def rejection_sample(model: nn.Module, tokenizer: ByteTokenizer, problems: Sequence[WordProblem], n_samples: int,
                     max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                     require: Sequence[str] = REWARD_NAMES, generator: torch.Generator | None = None,
                     batch_size: int = 128) -> RejectionSample:
    """Sample n_samples completions per problem and keep those that earn the full reward of every rule in
    require (R1 section 2.3.3 keeps only correct answers and filters out mixed languages): an SFT set."""
    if n_samples < 1:
        raise ValueError(f"n_samples = {n_samples}: must be at least 1")
    unknown = set(require) - set(REWARD_NAMES)
    if unknown:
        raise ValueError(f"require = {tuple(require)}: name rewards from {REWARD_NAMES}")
    ids = [tokenizer.encode(p.prompt) for p in problems for _ in range(n_samples)]
    completions = generate_completions(model, ids, max_new_tokens, tokenizer.eos_id, temperature, top_p,
                                       generator, batch_size)
    pairs, seen, hit = [], set(), set()
    for k, c in enumerate(completions):
        problem = problems[k // n_samples]
        text = tokenizer.decode(c, skip_special=True)
        scores = rule_rewards(text, problem.answer, problem.language)
        if all(scores[name] == 1.0 for name in require) and (problem.prompt, text) not in seen:
            seen.add((problem.prompt, text))
            pairs.append((problem.prompt, text))
            hit.add(k // n_samples)
    return RejectionSample(pairs=pairs, drawn=len(completions), prompts_with_a_keeper=len(hit))


def distill(teacher: nn.Module, student: nn.Module, tokenizer: ByteTokenizer, problems: Sequence[WordProblem],
            n_samples: int, max_new_tokens: int, cfg: TrainConfig, generator: torch.Generator | None = None,
            ) -> tuple[History, RejectionSample]:
    """R1's distillation (section 2.4): the teacher's correct, well-formed samples, then plain SFT of the
    student on them (no RL on the student). Returns the student's training history and the samples."""
    samples = rejection_sample(teacher, tokenizer, problems, n_samples, max_new_tokens, generator=generator)
    if not samples.pairs:
        raise ValueError("the teacher produced no completion that passed every rule: nothing to distill")
    history = train(student, PairDataset(samples.pairs, tokenizer, seed=cfg.seed), cfg)
    return history, samples


# ----------------------------------------------------------------------------------------------------------------
# Why GRPO drops PPO's value model: the models each method holds in memory

BYTES_TRAINED = 16  # per trained parameter with mixed-precision Adam: bf16 weight + grad, fp32 master + 2 moments
BYTES_FROZEN = 2  # per parameter of a frozen bf16 model


def rl_memory(config: ModelConfig) -> dict[str, dict[str, float]]:
    """Parameters and bytes of the models PPO and GRPO keep for RL on `config` with rule rewards.

    PPO (as in InstructGPT and DeepSeekMath's figure 4) trains the policy and a value model of about the same size
    (the transformer with a scalar head instead of the vocabulary head) and keeps a frozen reference; GRPO trains
    only the policy and keeps the reference. The MTP modules are left out (they do not take part in RL).
    """
    policy = count_params(config).total
    value = policy - config.vocab_size * config.dim + config.dim  # scalar head [dim -> 1] replaces lm_head
    models = {"PPO": {"policy": (policy, True), "value model": (value, True), "reference": (policy, False)},
              "GRPO": {"policy": (policy, True), "reference": (policy, False)}}
    out = {}
    for method, held in models.items():
        out[method] = {name: params for name, (params, _) in held.items()}
        out[method]["parameters"] = sum(params for params, _ in held.values())
        out[method]["bytes"] = sum(params * (BYTES_TRAINED if trained else BYTES_FROZEN)
                                   for params, trained in held.values())
    return out
