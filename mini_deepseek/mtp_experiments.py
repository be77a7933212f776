"""The experiments of notebook 03 (multi-token prediction) and of benchmarks/speculative.py: the toy recipe, a few
measurements, and the figures, drawn from code.

The toy. DeepSeek-V3's one MTP module is one transformer block next to 61: drafting costs little beside a step of
the main model. The toy keeps that proportion roughly (TOY_OVERRIDES: 12 thin layers, one block per MTP module), so
that drafting pays at toy scale too, where a decoding step costs mostly per-layer overhead, not arithmetic. It is
trained on a mix of the Python standard library's code and arithmetic with worked steps (mixed_text), the two
kinds of text whose acceptance the notebook compares.

The figures are in mtp_plots.py (matplotlib is a course dependency, not a library one).
"""

from __future__ import annotations

import html
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .config import ModelConfig
from .data import TokenDataset, arithmetic_problems, arithmetic_text, stdlib_corpus
from .model import DeepSeekV3
from .speculative import speculative_generate
from .tokenizer import ByteTokenizer
from .train import History, TrainConfig, train

# The notebook's toy: the "toy" preset made deeper and thinner, so that one MTP block is small beside the main model
# (V3: 1 block beside 61) while training costs about what the 4-layer toy costs (12 x 64^2 against 4 x 128^2 per
# token in the matrices).
TOY_OVERRIDES = dict(n_layers=12, n_dense_layers=1, dim=64, inter_dim=192, moe_inter_dim=32, n_heads=4,
                     q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                     max_seq_len=384)
CHECKPOINT_DIR = Path(__file__).resolve().parents[1] / "runs" / "03_mtp" / "toy-mtp2"  # the notebook's D = 2 toy
CODE_BYTES = 1_000_000  # standard-library text for training; the next HELDOUT_BYTES are held out for prompts
HELDOUT_BYTES = 100_000
KINDS = ("arithmetic", "code")


def toy_config(n_mtp_modules: int, **overrides) -> ModelConfig:
    """The notebook's toy with n_mtp_modules MTP depths (0: no MTP at all)."""
    return ModelConfig.preset("toy", **{**TOY_OVERRIDES, "n_mtp_modules": n_mtp_modules, **overrides})


def mixed_text(code_bytes: int = CODE_BYTES, chunk: int = 2048, seed: int = 0) -> str:
    """Python standard-library code and as many bytes of arithmetic with worked steps, in alternating chunks of
    about `chunk` bytes cut at line ends: every part of the stream (the held-out tail too) holds both kinds."""
    code = stdlib_corpus(max_bytes=code_bytes)
    n_problems = code_bytes // 30 + 1  # a problem with its worked steps takes about 45 bytes
    arithmetic = arithmetic_text(n_problems, seed=seed)[:len(code)]
    pieces = []
    for text in (code, arithmetic):
        lines = text.splitlines(keepends=True)
        blocks, current = [], ""
        for line in lines:
            current += line
            if len(current) >= chunk:
                blocks.append(current)
                current = ""
        pieces.append(blocks + ([current] if current else []))
    out = []
    for i in range(max(len(p) for p in pieces)):
        out += [p[i] for p in pieces if i < len(p)]
    return "".join(out)


def heldout_prompts(kind: str, n: int, seed: int = 123, code_chars: int = 80) -> list[str]:
    """n prompts of one kind, from text the toy never trained on: arithmetic questions drawn with another seed
    ("Q: 37+48=? A:"), or the first code_chars characters of lines of the standard library beyond CODE_BYTES."""
    if kind == "arithmetic":
        return [p.prompt for p in arithmetic_problems(n, seed=seed)]
    if kind != "code":
        raise ValueError(f"kind = {kind!r}: choose one of {KINDS}")
    trained_on = len(stdlib_corpus(max_bytes=CODE_BYTES))  # characters of the training prefix
    heldout = stdlib_corpus(max_bytes=CODE_BYTES + HELDOUT_BYTES)[trained_on:]
    starts = [i + 1 for i, c in enumerate(heldout) if c == "\n" and heldout[i + 1:i + 2] not in ("", "\n", " ")]
    step = max(1, len(starts) // n)
    return [heldout[s:s + code_chars] for s in starts[::step][:n]]


def train_config(steps: int, seed: int, **overrides) -> TrainConfig:
    """How the notebook trains every variant (the same batches for a given seed, whatever the depth D)."""
    return TrainConfig(**{"steps": steps, "batch_size": 8, "seq_len": 128, "lr": 3e-3,
                          "warmup_steps": max(1, steps // 15), "eval_every": max(1, steps // 4), "eval_batches": 4,
                          "log_every": 10, "seed": seed, **overrides})


def train_toy(n_mtp_modules: int, steps: int, seed: int = 0, dataset: TokenDataset | None = None,
              **train_overrides) -> tuple[DeepSeekV3, History]:
    """The notebook's toy with n_mtp_modules MTP depths, initialized from seed and trained on mixed_text()."""
    dataset = dataset if dataset is not None else TokenDataset.from_text(mixed_text(), seed=seed)
    torch.manual_seed(seed)
    model = DeepSeekV3(toy_config(n_mtp_modules))
    history = train(model, dataset, train_config(steps, seed, **train_overrides))
    return model.eval(), history


def encode(prompts: Sequence[str]) -> list[torch.Tensor]:
    """Byte-tokenized prompts, one [1, T] tensor each."""
    tokenizer = ByteTokenizer()
    return [torch.tensor([tokenizer.encode(p)]) for p in prompts]


# ----------------------------------------------------------------------------------------------------------------
# Measurements
@torch.no_grad()
def causal_reach(model: DeepSeekV3, T: int = 10, seed: int = 0) -> list[torch.Tensor]:
    """Which input tokens each prediction depends on, found by changing one token at a time: one bool matrix
    [positions, T] per head (the main model, then MTP depths 1..D), True where changing input token j moves the
    logits at position i."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(0, model.config.vocab_size, (1, T), generator=generator)
    logits, mtp = model(x, return_mtp=True)
    base = [logits, *mtp]
    reach = [torch.zeros(b.shape[1], T, dtype=torch.bool) for b in base]
    for j in range(T):
        y = x.clone()
        y[0, j] = (y[0, j] + 1) % model.config.vocab_size
        changed_logits, changed_mtp = model(y, return_mtp=True)
        for r, a, b in zip(reach, base, [changed_logits, *changed_mtp], strict=True):
            r[:, j] = (a[0] - b[0]).abs().amax(dim=-1) > 1e-5
    return reach


def acceptance_by_temperature(model: DeepSeekV3, prompts: Sequence[torch.Tensor], temperatures: Sequence[float],
                              max_new_tokens: int, seed: int = 0) -> dict[float, dict]:
    """speculative_generate over every prompt at each temperature: {temperature: {"acceptance": per depth,
    "tokens_per_forward"}}, counts summed over the prompts; sampling is seeded."""
    out = {}
    for temperature in temperatures:
        generator = torch.Generator().manual_seed(seed)
        proposed, accepted, forwards = [0] * len(model.mtp), [0] * len(model.mtp), 0
        for prompt in prompts:
            _, stats = speculative_generate(model, prompt, max_new_tokens, temperature, generator=generator)
            proposed = [a + b for a, b in zip(proposed, stats["proposed"], strict=True)]
            accepted = [a + b for a, b in zip(accepted, stats["accepted"], strict=True)]
            forwards += stats["forwards"]
        out[temperature] = {"acceptance": [a / p if p else float("nan") for a, p in zip(accepted, proposed, strict=True)],
                            "tokens_per_forward": len(prompts) * max_new_tokens / forwards}
    return out


@torch.no_grad()
def round_cost_parts(model: DeepSeekV3, prompt: torch.Tensor, repeats: int = 30) -> dict:
    """Where a speculative round's time goes, timed piece by piece after prefilling prompt [1, T] (seconds, the
    median of `repeats` calls each, the pieces timed in turns so that all meet the same load): "step", one main-model forward of one position with the KV cache and the head
    (what model.generate pays per token); "verify", the same over 1 + g positions for g = 1 .. D (the
    verification); "draft", one position of MTP module k over its own cache and the head, k = 1 .. D. Each call
    rewrites the same cache positions, so every repeat sees the same cache length."""
    T = prompt.shape[1]
    D = len(model.mtp)
    device, w = prompt.device, model.embed_tokens.weight
    cache = model.new_cache(1, T + D + 1)
    h = model.hidden_states(prompt, 0, cache)  # prefill: [1, T, dim]
    caches = [m.self_attn.new_cache(1, T + D + 1, w.dtype, device) for m in model.mtp]
    states = [h]
    for k, module in enumerate(model.mtp, start=1):  # prefill each module's cache over the positions it can see
        n = T - k
        states.append(module(states[-1][:, :n], model.embed_tokens(prompt[:, k:]), model.rope(0, n, device),
                             start_pos=0, cache=caches[k - 1]))

    last = prompt[:, -1:].expand(1, D + 1)  # any tokens do: the cost does not depend on which

    def draft(k: int) -> None:
        n = T - k  # module k rewrites its last prefilled position, n - 1
        module = model.mtp[k - 1]
        out = module(states[k - 1][:, n - 1:n], model.embed_tokens(prompt[:, -1:]), model.rope(n - 1, n, device),
                     start_pos=n - 1, cache=caches[k - 1])
        model.lm_head(out[:, -1]).float().argmax(dim=-1)

    def forward(n: int) -> None:  # the main model over n positions, then its head
        model.lm_head(model.hidden_states(last[:, :n], T, cache)).float().argmax(dim=-1)

    pieces = [("step", lambda: forward(1))]
    pieces += [("verify", lambda g=g: forward(g + 1)) for g in range(1, D + 1)]
    pieces += [("draft", lambda k=k: draft(k)) for k in range(1, D + 1)]
    times = [[] for _ in pieces]
    for _ in range(repeats):
        for (_, fn), spent in zip(pieces, times, strict=True):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    medians = [statistics.median(spent) for spent in times]
    return {"step": medians[0], "verify": medians[1:D + 1], "draft": medians[D + 1:]}


def expected_tokens_per_round(acceptance: Sequence[float]) -> float:
    """Tokens one verification round yields when draft k is accepted with probability acceptance[k-1] given the
    drafts before it were: 1 + a_1 + a_1 a_2 + ... (with one rate a for g drafts: (1 - a^(g+1)) / (1 - a))."""
    total, reach = 1.0, 1.0
    for a in acceptance:
        reach *= a
        total += reach
    return total


def repeated_fraction(tokens: Sequence[int], n: int = 8) -> float:
    """The share of the n-token windows of tokens that already occurred earlier in it: near 1 for text caught in a
    loop (which any draft predicts easily), near 0 for text that keeps saying new things."""
    windows = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    seen, repeats = set(), 0
    for window in windows:
        repeats += window in seen
        seen.add(window)
    return repeats / len(windows) if windows else float("nan")


# ----------------------------------------------------------------------------------------------------------------
# Text with its drafted tokens marked
DEPTH_COLORS = ("#ffffff", "#c6e5ff", "#ffd9a8", "#d5f5c8", "#f2c6f0")  # main-model token, then draft depth 1, 2, ...


def highlight_drafts(tokens: Sequence[int], draft_depth: Sequence[int]) -> str:
    """HTML of byte tokens, each new token shaded by the draft depth that produced it (0: the main model's own)."""
    tokenizer = ByteTokenizer()
    spans = []
    for token, depth in zip(tokens, draft_depth, strict=True):
        text = html.escape(tokenizer.decode([token])).replace("\n", "&#8629;<br>")
        color = DEPTH_COLORS[min(depth, len(DEPTH_COLORS) - 1)]
        spans.append(f'<span style="background:{color}">{text}</span>')
    return '<div style="font-family:monospace;white-space:pre-wrap;line-height:1.6">' + "".join(spans) + "</div>"


def legend_html(n_depths: int) -> str:
    cells = [f'<span style="background:{DEPTH_COLORS[0]};border:1px solid #ccc">main model</span>']
    cells += [f'<span style="background:{DEPTH_COLORS[k]}">draft depth {k}</span>' for k in range(1, n_depths + 1)]
    return "<div>" + " &nbsp; ".join(cells) + "</div>"
