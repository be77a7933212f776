"""Decode and training-step speed of mini_deepseek against Hugging Face transformers, on the same weights, beside
the memory-bandwidth floor of decoding.

    python benchmarks/decode_vs_hf.py [--quick] [--threads N] [--repeats R] [--compile]

A mid-size random checkpoint (hidden 512, 4 layers, 16 routed experts) is written by our save_pretrained and read
back by our from_pretrained (the path a user takes) and by transformers' DeepseekV3ForCausalLM.from_pretrained, so
both hold identical weights (the logits are compared first). Then:
- decode: a 1024-token prompt, 128 greedy new tokens, each implementation with its KV cache. Ours on the default
  path (mla_mode "auto": a naive prefill that caches the latent, absorbed decoding), on naive MLA throughout (the
  default before issue 13), and with
  --compile on the compiled decoding step (generate(compile=True); the first call, which compiles, is not timed);
- the roofline: at batch 1 a decoding step reads every weight it uses once (attention, dense MLP and shared
  experts of each layer, the k routed experts the token picks, the head, one embedding row) and the whole KV
  cache; it cannot take less than those bytes divided by the memory bandwidth. The bandwidth is measured in this
  run: a matrix-vector product over a float32 matrix of the same size (on a CPU whose caches hold the whole
  model, that is the caches' bandwidth), and, for comparison, over 1 GiB (main memory);
- train: one forward + backward + AdamW step on a batch of 4 x 256 tokens (with --compile also through
  torch.compile, as TrainConfig(compile=True) runs it).
Each figure is the median of --repeats runs. This is a benchmark that prints figures, not a timed test.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from functools import partial

import torch

from mini_deepseek import DeepSeekV3, ModelConfig
from mini_deepseek.checkpoint import from_pretrained, save_pretrained

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


def decode_bytes(model: DeepSeekV3, context: float) -> tuple[int, int]:
    """(weight bytes, KV-cache bytes) that one decoding step at batch 1 reads with `context` cached positions."""
    cfg = model.config
    weights = 0
    for name, p in model.named_parameters():
        if name.startswith("mtp."):  # the MTP modules do not run while decoding
            continue
        size = p.numel() * p.element_size()
        if name == "embed_tokens.weight":
            size = cfg.dim * p.element_size()  # one row
        elif ".experts." in name:
            size = size * cfg.n_activated_experts // cfg.n_routed_experts  # the k experts the token picks
        weights += size
    cache = model.new_cache(1, 1)  # the cache of one position, in the model's mode and dtype
    per_position = sum(t.numel() * t.element_size() for layer in cache for t in layer.values())
    return weights, round(per_position * context)


def read_bandwidth(nbytes: int, repeats: int = 30) -> float:
    """Bytes per second: the best rate at which a matrix-vector product (a decoding step's own access pattern)
    reads a float32 matrix of nbytes."""
    matrix, vector = torch.ones(max(nbytes // 4096, 1), 1024), torch.ones(1024)
    torch.mv(matrix, vector)
    best = min(median_time(lambda: torch.mv(matrix, vector), 1) for _ in range(repeats))
    return matrix.numel() * 4 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 128-token prompt and 16 new tokens")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true",
                        help="also the torch.compile paths (compiling takes minutes on a laptop CPU)")
    args = parser.parse_args()
    try:
        import transformers
    except ImportError:
        raise SystemExit("this benchmark compares against transformers: pip install -e '.[hf]'") from None
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    prompt_len, new_tokens = (128, 16) if args.quick else (1024, 128)

    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(DeepSeekV3(ModelConfig.preset("toy", **BENCH_CONFIG)), tmp)
        ours = from_pretrained(tmp)  # the user's path: mla_mode "auto"
        naive = from_pretrained(tmp, mla_mode="naive")
        hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    prompt = torch.randint(0, BENCH_CONFIG["vocab_size"], (1, prompt_len))
    with torch.no_grad():
        parity = (ours(prompt[:, :256]) - hf(prompt[:, :256]).logits).abs().max().item()
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, {args.threads} threads; "
          f"max |logits ours - transformers| = {parity:.2e}")

    # --- the roofline ----------------------------------------------------------------------------------------
    weight_bytes, cache_bytes = decode_bytes(ours, prompt_len + new_tokens / 2)  # the mean context while decoding
    step_bytes = weight_bytes + cache_bytes
    bandwidth, dram_bandwidth = read_bandwidth(step_bytes), read_bandwidth(2**30)
    floor_ms = 1e3 * step_bytes / bandwidth
    print(f"\nRoofline of one decoding step (batch 1, {prompt_len + new_tokens // 2} cached positions on average): "
          f"{weight_bytes / 1e6:.1f} MB of weights + {cache_bytes / 1e6:.1f} MB of KV cache (absorbed MLA)")
    print(f"  read bandwidth (torch.mv, {args.threads} threads): {bandwidth / 1e9:.1f} GB/s over {step_bytes / 1e6:.0f} "
          f"MB -> floor {floor_ms:.2f} ms/token ({1e3 / floor_ms:.0f} tok/s); over 1 GiB (main memory) "
          f"{dram_bandwidth / 1e9:.1f} GB/s -> {1e3 * step_bytes / dram_bandwidth:.2f} ms/token")

    # --- generation ------------------------------------------------------------------------------------------
    def hf_generate(n: int = new_tokens):
        return hf_greedy(hf, prompt, n)

    paths = [("transformers (caches the latent, re-expands K/V each step)", hf_generate),
             ("mini_deepseek default (from_pretrained, then generate)", lambda n=new_tokens: ours.generate(prompt, n)),
             ("mini_deepseek, naive MLA (caches decompressed K/V)", lambda n=new_tokens: naive.generate(prompt, n))]
    if args.compile:
        paths.append(("mini_deepseek, compiled decode step (generate(compile=True))",
                      lambda n=new_tokens: ours.generate(prompt, n, compile=True)))

    # Prefill is timed apart (a 1-token generation), so that the decode rate counts only the cached steps.
    rows = []
    ref_tokens = hf_generate()
    for name, generate in paths:
        same = torch.equal(generate(), ref_tokens)  # also the warm-up (and the compilation of the compiled path)
        total = median_time(generate, args.repeats)
        prefill = median_time(lambda g=generate: g(1), args.repeats)
        rows.append((name, total, prefill, (new_tokens - 1) / (total - prefill), same))
    base_rate = rows[0][3]
    print(f"\nGenerate: prompt {prompt_len} tokens + {new_tokens} new tokens (greedy), median of {args.repeats}")
    print(f"{'path':<66}{'total s':>8}{'prefill s':>10}{'decode tok/s':>13}{'ms/token':>9}{'x transformers':>15}"
          f"{'x floor':>8}  same tokens")
    for name, total, prefill, rate, same in rows:
        print(f"{name:<66}{total:>8.2f}{prefill:>10.2f}{rate:>13.1f}{1e3 / rate:>9.2f}{rate / base_rate:>14.2f}x"
              f"{1e3 / rate / floor_ms:>7.1f}x  {same}")
    print(f"{'memory-bandwidth floor':<66}{'':>18}{1e3 / floor_ms:>13.1f}{floor_ms:>9.2f}"
          f"{1e3 / floor_ms / base_rate:>14.2f}x{1.0:>7.1f}x")
    # These random weights carry no MTP module worth drafting with: speculative.py trains one on this geometry.
    print("speculative decoding (MTP drafts, notebook 03): python benchmarks/speculative.py")

    # --- one training step -----------------------------------------------------------------------------------
    batch = torch.randint(0, BENCH_CONFIG["vocab_size"], (4, 257))
    x, y = batch[:, :-1], batch[:, 1:]
    ours.train()  # mla_mode "auto" trains naive: no cache
    hf.train()
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-4)

    def our_step(loss_fn=ours.loss):
        loss, _ = loss_fn(x, y)
        opt_ours.zero_grad()
        loss.backward()
        opt_ours.step()

    def hf_step():
        # transformers shifts labels itself: passing the whole batch gives the same next-token pairs as (x, y)
        loss = hf(batch, labels=batch).loss
        opt_hf.zero_grad()
        loss.backward()
        opt_hf.step()

    steps = [("transformers", hf_step), ("mini_deepseek", our_step)]
    if args.compile:
        steps.append(("mini_deepseek, torch.compile (TrainConfig(compile=True))",
                      lambda: our_step(partial(ours.loss, compile=True))))
    print("\nTraining step: batch 4 x 256 tokens, forward + backward + AdamW, median of", args.repeats)
    times = []
    for name, step in steps:
        step()  # warm-up (and compilation)
        times.append(median_time(step, args.repeats))
        print(f"{name:<66}{times[-1]:>9.3f} s   ({times[0] / times[-1]:.2f}x transformers)")


if __name__ == "__main__":
    main()
