"""Decode and training-step speed of mini_deepseek against Hugging Face transformers, on the same weights.

    python benchmarks/decode_vs_hf.py [--quick] [--threads N] [--repeats R]

A mid-size random checkpoint (hidden 512, 4 layers, 16 routed experts) is written by our save_pretrained and
read by transformers' DeepseekV3ForCausalLM.from_pretrained, so both models hold identical weights (the logits
are compared first). Then:
- decode: a 1024-token prompt, 128 greedy new tokens, with each implementation's KV cache; ours in both MLA
  modes (absorbed: only the latent is cached; naive: decompressed K/V are cached);
- train: one forward + backward + AdamW step on a batch of 4 x 256 tokens.
Each figure is the median of --repeats runs. This is a benchmark that prints figures, not a timed test.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from mini_deepseek import DeepSeekV3, ModelConfig
from mini_deepseek.checkpoint import save_pretrained

BENCH_CONFIG = dict(
    vocab_size=4096, dim=512, n_layers=4, n_dense_layers=1, inter_dim=1536, moe_inter_dim=256, n_heads=8,
    q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
    n_routed_experts=16, n_shared_experts=1, n_activated_experts=4, n_expert_groups=4, n_limited_groups=2,
    route_scale=2.5, max_seq_len=2048,
    # transformers has neither MTP nor the sequence-wise balance loss: leave both out so the work is the same.
    n_mtp_modules=0, seq_aux_alpha=0.0,
)


def load_in_transformers(model: DeepSeekV3, transformers):
    """The same weights in transformers' DeepseekV3ForCausalLM: written by our save_pretrained, read by theirs."""
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        return transformers.DeepseekV3ForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()


def hf_greedy(hf, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """transformers' greedy generate of exactly n new tokens (it would stop at its eos token otherwise)."""
    return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False)


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 128-token prompt and 16 new tokens")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    try:
        import transformers
    except ImportError:
        raise SystemExit("this benchmark compares against transformers: pip install -e '.[hf]'") from None
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    prompt_len, new_tokens = (128, 16) if args.quick else (1024, 128)

    ours = DeepSeekV3(ModelConfig.preset("toy", **BENCH_CONFIG)).eval()
    hf = load_in_transformers(ours, transformers)
    prompt = torch.randint(0, BENCH_CONFIG["vocab_size"], (1, prompt_len))
    with torch.no_grad():
        parity = (ours(prompt[:, :256]) - hf(prompt[:, :256]).logits).abs().max().item()
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, {args.threads} threads; "
          f"max |logits ours - transformers| = {parity:.2e}")

    def hf_generate(n: int = new_tokens):
        return hf_greedy(hf, prompt, n)

    def our_generate(n: int = new_tokens):
        return ours.generate(prompt, n)

    # Prefill is timed apart (a 1-token generation), so that the decode rate counts only the cached steps.
    rows = []
    ref_tokens = hf_generate()
    for name, generate in [("transformers (caches the latent, re-expands K/V each step)", hf_generate),
                           ("mini_deepseek, MLA absorb (caches the latent)", our_generate),
                           ("mini_deepseek, MLA naive (caches decompressed K/V)", our_generate)]:
        if "absorb" in name or "naive" in name:
            ours.set_mla_mode("absorb" if "absorb" in name else "naive")
        same = torch.equal(generate(), ref_tokens)
        total = median_time(generate, args.repeats)
        prefill = median_time(lambda g=generate: g(1), args.repeats)
        rows.append((name, total, prefill, (new_tokens - 1) / (total - prefill), same))
    base_total, base_rate = rows[0][1], rows[0][3]
    print(f"\nGenerate: prompt {prompt_len} tokens + {new_tokens} new tokens (greedy), median of {args.repeats}")
    print(f"{'implementation':<60}{'total s':>8}{'prefill s':>10}{'decode tok/s':>13}{'decode x':>9}"
          f"{'total x':>8}  same tokens")
    for name, total, prefill, rate, same in rows:
        print(f"{name:<60}{total:>8.2f}{prefill:>10.2f}{rate:>13.1f}{rate / base_rate:>8.2f}x"
              f"{base_total / total:>7.2f}x  {same}")

    # --- one training step -----------------------------------------------------------------------------------
    batch = torch.randint(0, BENCH_CONFIG["vocab_size"], (4, 257))
    x, y = batch[:, :-1], batch[:, 1:]
    ours.set_mla_mode("naive")
    ours.train()
    hf.train()
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-4)

    def our_step():
        loss, _ = ours.loss(x, y)
        opt_ours.zero_grad()
        loss.backward()
        opt_ours.step()

    def hf_step():
        # transformers shifts labels itself: passing the whole batch gives the same next-token pairs as (x, y)
        loss = hf(batch, labels=batch).loss
        opt_hf.zero_grad()
        loss.backward()
        opt_hf.step()

    our_step(), hf_step()  # warm up
    t_ours, t_hf_train = median_time(our_step, args.repeats), median_time(hf_step, args.repeats)
    print("\nTraining step: batch 4 x 256 tokens, forward + backward + AdamW, median of", args.repeats)
    print(f"{'transformers':<58}{t_hf_train:>9.3f} s")
    print(f"{'mini_deepseek':<58}{t_ours:>9.3f} s   ({t_hf_train / t_ours:.2f}x)")


if __name__ == "__main__":
    main()
